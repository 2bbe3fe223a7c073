"""Multi-layer perceptron: linear maps with a nonlinearity between them (notes: activations)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from mnistlab.models.layers import make_activation
from mnistlab.models.registry import check_arg, check_positive, register_model


@register_model("mlp", "multi-layer perceptron; hidden sizes and activation configurable")
class MLP(nn.Module):
    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 10,
        img_size: int = 28,
        hidden: Sequence[int] = (256, 128),
        activation: str = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        check_positive(img_size=img_size)
        # no hidden layer at all is the linear model, where activation and dropout would do nothing
        check_arg(
            len(hidden) > 0 and all(h >= 1 for h in hidden),
            "hidden",
            "a non-empty list of positive integers (for none, use the linear model)",
            hidden,
        )
        check_arg(0 <= dropout < 1, "dropout", "a probability in [0, 1)", dropout)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_chans * img_size * img_size
        for h in hidden:
            layers += [nn.Linear(width, h), make_activation(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, hidden[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
