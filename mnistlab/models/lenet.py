"""LeNet-5 in its classic form (LeCun, Bottou, Bengio, Haffner 1998, "Gradient-based learning
applied to document recognition").

C1 conv 5x5 -> 6 maps, S2 2x2 average pooling, C3 conv 5x5 -> 16 maps, S4 average pooling,
C5 conv 5x5 -> 120 (a full connection on the 5x5 maps), F6 84 units, output 10, with tanh
squashing. The paper's 32x32 input is MNIST's 28x28 padded by 2, done here by C1's padding.
Simplifications, as in most modern reproductions: the paper's sparse C3 connection table becomes
a full one, trainable subsampling coefficients become plain averaging, and the RBF output layer
becomes a linear one trained with cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mnistlab.models.registry import register_model


@register_model("lenet5", "LeNet-5 (LeCun et al. 1998): tanh convs, average pooling, 120-84-10")
class LeNet5(nn.Module):
    def __init__(self, in_chans: int = 1, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 6, 5, padding=2), nn.Tanh(),  # (B, 6, 28, 28)
            nn.AvgPool2d(2),  # (B, 6, 14, 14)
            nn.Conv2d(6, 16, 5), nn.Tanh(),  # (B, 16, 10, 10)
            nn.AvgPool2d(2),  # (B, 16, 5, 5)
            nn.Conv2d(16, 120, 5), nn.Tanh(),  # (B, 120, 1, 1): C5
            nn.Flatten(),
            nn.Linear(120, 84), nn.Tanh(),  # F6
        )
        self.head = nn.Linear(84, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, 84)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
