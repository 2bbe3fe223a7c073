"""A modern small CNN: conv-BN-ReLU stages, max-pooling, and a small head.

Three stages at 28 (or 14), 14 and 7 pixels, each `depth` conv-BN-ReLU blocks wide `widths[i]`.
BatchNorm lets a one-cycle schedule use large learning rates, so a few epochs suffice. The options
and why they exist (measurements in docs/experiments.md; speed from bench/speed.py):
- `stem_stride=2` runs the first conv at stride 2 instead of conv + max-pool at full resolution:
  on a CPU the 28x28 stage costs more in memory traffic than it gives in accuracy.
- `stage1_stride=2` does the same for the second stage: its first conv at stride 2 (7x7 out) instead of
  conv at 14x14 + max-pool, a quarter of that conv's multiplications.
- `head="flatten"` keeps the final 3x3 map's layout (max-pool 7 -> 3, flatten) instead of global
  averaging, which throws away where things are.
- `hidden` adds one fully connected layer before the classifier, a cheap gain (0: none).
- `pool_first=True` max-pools a stage's last conv output before its BatchNorm and ReLU (conv -> pool ->
  BN -> ReLU) rather than after: ReLU commutes with max-pooling, BatchNorm then normalizes the pooled
  values, and both run on a quarter of the numbers. BatchNorm and ReLU (forward and backward) are memory
  passes, a third of a CPU training step at these widths: a step of the fast recipe's CNN (then widths
  16-32-64) took 28% less time in fp32 and 19% less in bf16 (docs/experiments.md).
- `whiten=True` makes the first conv a fixed one, not learned (airbench's idea, Keller Jordan 2024): its
  filters are the principal directions of the training images' 3x3 patches (the eigenvectors of their
  9x9 covariance with the largest variances), each scaled by 1/sqrt(its variance) and paired with its
  negative, so the stem's outputs are decorrelated from the first step on. `widths[0]` is then 2 x
  the number of directions kept: 18 keeps all 9, 16 drops the one of least variance. Set by
  `init_from_data` before training.
- `bn_momentum` is BatchNorm's running-statistics momentum (PyTorch's default 0.1): how fast the
  statistics that evaluation uses follow the changing weights.
No hard-coded flatten size: it follows from the widths (the 9216 of pytorch/examples is a wart).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from mnistlab.models.registry import check_arg, check_positive, register_model


def conv_bn(cin: int, cout: int, stride: int = 1, pool: bool = False, bn_momentum: float = 0.1) -> nn.Sequential:
    """conv 3x3 -> BatchNorm -> ReLU; with pool, conv -> max-pool 2 -> BatchNorm -> ReLU (half the side)."""
    # bias=False: BatchNorm's shift makes a conv bias redundant
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    return nn.Sequential(conv, *([nn.MaxPool2d(2)] if pool else []), nn.BatchNorm2d(cout, momentum=bn_momentum),
                         nn.ReLU(inplace=True))


WHITEN_EPS = 1e-3  # added to each patch variance before 1/sqrt: a direction with (almost) no variance stays finite


@register_model("cnn", "modern small CNN: conv-BN-ReLU stages, max-pool, 3x3 flatten head (the default)")
class SmallCNN(nn.Module):
    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (32, 64, 128),
        depth: int = 1,
        stem_stride: Literal[1, 2] = 1,
        stage1_stride: Literal[1, 2] = 1,
        head: Literal["flatten", "avg"] = "flatten",
        hidden: int = 256,
        dropout: float = 0.0,
        pool_first: bool = False,
        whiten: bool = False,
        bn_momentum: float = 0.1,
    ):
        super().__init__()
        check_arg(
            len(widths) == 3 and all(w >= 1 for w in widths),
            "widths",
            "a list of 3 positive integers, one per stage",
            widths,
        )
        check_positive(depth=depth)
        check_arg(hidden >= 0, "hidden", "a non-negative integer (0: no hidden layer)", hidden)
        check_arg(0 <= dropout < 1, "dropout", "a probability in [0, 1)", dropout)
        check_arg(0 < bn_momentum <= 1, "bn_momentum", "a number in (0, 1]", bn_momentum)
        # 3x3 patches of in_chans channels have 9 * in_chans principal directions, each kept with both signs
        check_arg(not whiten or (widths[0] % 2 == 0 and widths[0] <= 18 * in_chans), "widths",
                  f"a list whose first width is even and at most {18 * in_chans} with whiten=true (2 signs x the "
                  f"3x3 patch directions kept, of {9 * in_chans}; try --model-arg widths=[16,48,96])", widths)
        self.whiten = whiten
        layers: list[nn.Module] = []
        cin = in_chans
        for stage, w in enumerate(widths):
            # stages 0 and 1 end in a max-pool (28 -> 14 -> 7) unless their first conv strides, stage 2 in the flatten
            # head's (7 -> 3); with pool_first a stage's last block does its pooling itself, before its BatchNorm
            first_stride = (stem_stride, stage1_stride, 1)[stage]  # a stage that strides needs no pool
            pools = head == "flatten" if stage == 2 else first_stride == 1
            for block in range(depth):
                stride = first_stride if block == 0 else 1
                layers.append(conv_bn(cin, w, stride, pool=pool_first and pools and block == depth - 1,
                                      bn_momentum=bn_momentum))
                cin = w
            if stage < 2 and pools and not pool_first:
                layers.append(nn.MaxPool2d(2))  # (28 ->) 14 -> 7
        self.features = nn.Sequential(*layers)  # (B, widths[2], 7, 7), or (B, widths[2], 3, 3) pooled first
        if head == "flatten":
            # (B, widths[2] * 9): max-pool 7 -> 3 here, or already done in the last block
            self.pool: nn.Module = nn.Flatten() if pool_first else nn.Sequential(nn.MaxPool2d(2), nn.Flatten())
            dim = cin * 9
        else:
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, widths[2])
            dim = cin
        self.fc = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True)) if hidden else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(hidden or dim, num_classes)
        if whiten:  # fixed by init_from_data, never by the optimizer (which takes only trainable parameters)
            self.features[0][0].weight.requires_grad_(False)

    @torch.no_grad()
    def init_from_data(self, images: Callable[[], torch.Tensor]) -> None:
        """whiten=True: set the first conv's filters from training images (N, C, H, W), normalised as the model sees
        them, which `images()` makes: only when asked, so a model without whiten costs its run nothing. A no-op
        otherwise. Deterministic: the same images give the same filters."""
        if not self.whiten:
            return
        x = images()
        conv = self.features[0][0]
        # every 3x3 patch the first conv reads (same stride and padding): (N, 9C, L) -> (N * L, 9C). On the CPU in
        # float64 whatever the device (Apple's MPS has no float64); only the (2k, C, 3, 3) result goes back
        patches = F.unfold(x.detach().float().cpu(), 3, padding=1, stride=conv.stride)
        patches = patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()
        patches -= patches.mean(0)
        variances, directions = torch.linalg.eigh(patches.T @ patches / len(patches))  # (9C,), (9C, 9C) columns
        keep = conv.out_channels // 2  # the directions of largest variance (eigh sorts them ascending)
        variances, directions = variances[-keep:].flip(0), directions[:, -keep:].flip(1)  # (k,), (9C, k)
        # filter i = direction i / sqrt(variance i): each output has unit variance, and the outputs are uncorrelated
        filters = (directions / (variances.clamp(min=0) + WHITEN_EPS).sqrt()).T  # (k, 9C), one filter a row
        conv.weight.copy_(torch.cat([filters, -filters]).reshape(conv.weight.shape).to(conv.weight))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)))  # (B, hidden) or (B, pooled dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward_features(x)))
