"""Count forward FLOPs per image by hooking the layers that do the arithmetic.

A multiply-accumulate counts as 2 FLOPs. Convolutions, linear layers, recurrent layers' gate
matmuls and attention's two batched matmuls dominate every model here; elementwise ops
(activations, norms, pooling, gate nonlinearities) are left out and add a few percent.
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

    def rnn_hook(m: nn.RNNBase, inp, out) -> None:
        nonlocal total
        steps = out[0].shape[1]  # batch_first: (B, T, H * dirs)
        gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
        dirs = 2 if m.bidirectional else 1
        for layer in range(m.num_layers):
            width_in = m.input_size if layer == 0 else m.hidden_size * dirs
            total += 2 * steps * dirs * gates * m.hidden_size * (width_in + m.hidden_size)

    def attention_hook(m: nn.Module, inp, out) -> None:
        nonlocal total
        _, tokens, dim = out.shape
        total += 2 * 2 * tokens * tokens * dim  # Q K^T and weights @ V, all heads together

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.RNNBase):
            handles.append(m.register_forward_hook(rnn_hook))
        elif hasattr(m, "head_dim"):  # models.vit.Attention, without importing it
            handles.append(m.register_forward_hook(attention_hook))
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
