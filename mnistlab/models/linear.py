"""Softmax regression: one linear map from pixels to class scores, the baseline of baselines."""

from __future__ import annotations

import torch
import torch.nn as nn

from mnistlab.models.registry import check_positive, register_model


@register_model("linear", "softmax regression: one linear map from 784 pixels to 10 logits")
class SoftmaxRegression(nn.Module):
    def __init__(self, in_chans: int = 1, num_classes: int = 10, img_size: int = 28):
        super().__init__()
        check_positive(img_size=img_size)
        self.fc = nn.Linear(in_chans * img_size * img_size, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)  # (B, C*H*W): the features are the pixels themselves

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))  # (B, num_classes)
