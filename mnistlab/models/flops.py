"""Count forward FLOPs per image by hooking the layers that do the arithmetic.

A multiply-accumulate counts as 2 FLOPs. Convolutions, linear layers and batched matmuls dominate
every model here; elementwise ops (activations, norms, pooling) are left out and add a few percent.
"""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def forward_flops(model: nn.Module, input_shape: tuple[int, ...] = (1, 28, 28)) -> int:
    """FLOPs of one forward pass for one image of `input_shape` (C, H, W)."""
    total = 0

    def conv_hook(m: nn.Conv2d, inp, out) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += 2 * out.numel() * k

    def linear_hook(m: nn.Linear, inp, out) -> None:
        nonlocal total
        total += 2 * out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
