"""The ops that are more than one line of calculus: loss, convolution, pooling, dropout.

Each keeps the engine's pattern: compute the forward with numpy, keep what the backward needs,
and write the backward closure right below it.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from mnistlab.scratch.engine import Tensor, as_tensor


def cross_entropy(logits: Tensor, targets: np.ndarray, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of logits (N, K) against integer targets (N,), as torch.nn.functional.cross_entropy.

    Fused rather than built from log_softmax and indexing: the gradient is simply
    (softmax - target distribution) / N, with no (N, K) one-hot graph in between.
    """
    targets = np.asarray(targets)
    n, k = logits.shape
    x = logits.data
    shifted = x - x.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # (N, K)
    # target distribution: 1 - eps on the label plus eps / K everywhere (Szegedy et al. 2016)
    q = np.full_like(logp, label_smoothing / k)
    q[np.arange(n), targets] += 1.0 - label_smoothing
    out = logits._result(np.asarray(-(q * logp).sum() / n, dtype=x.dtype), (logits,), "cross_entropy")
    if out.requires_grad:
        out._backward = lambda g: logits._accumulate(g * (np.exp(logp) - q) / n)
    return out


def _im2col(xp: np.ndarray, kh: int, kw: int, stride: int) -> np.ndarray:
    """Padded input (N, C, H, W) -> every receptive field as a row: (N * OH * OW, C * kh * kw)."""
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]  # (N, C, OH, OW, kh, kw), a view
    n, c, oh, ow = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)  # the one copy


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1, padding: int = 0) -> Tensor:
    """2-D cross-correlation (what deep learning calls convolution), as torch.nn.functional.conv2d.

    x (N, C, H, W), weight (O, C, kh, kw), bias (O,) -> (N, O, OH, OW). im2col turns it into one
    matrix product, (N*OH*OW, C*kh*kw) @ (C*kh*kw, O), so the BLAS does the work.
    """
    n, c, h, w = x.shape
    o, c_w, kh, kw = weight.shape
    if c != c_w:
        raise ValueError(f"conv2d: input has {c} channels, weight expects {c_w}")
    xp = np.pad(x.data, ((0, 0), (0, 0), (padding, padding), (padding, padding))) if padding else x.data
    oh, ow = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    cols = _im2col(xp, kh, kw, stride)  # (N*OH*OW, C*kh*kw)
    wmat = weight.data.reshape(o, -1)  # (O, C*kh*kw)
    y = cols @ wmat.T  # (N*OH*OW, O)
    if bias is not None:
        y += bias.data
    parents = (x, weight) if bias is None else (x, weight, bias)
    out = x._result(y.reshape(n, oh, ow, o).transpose(0, 3, 1, 2), parents, "conv2d")
    if out.requires_grad:
        def _backward(g):
            gmat = g.transpose(0, 2, 3, 1).reshape(-1, o)  # (N*OH*OW, O)
            if weight.requires_grad:
                weight._accumulate((gmat.T @ cols).reshape(weight.shape))
            if bias is not None and bias.requires_grad:
                bias._accumulate(gmat.sum(0))
            if x.requires_grad:
                # col2im: each receptive field's gradient is added back where it was read from
                gcols = (gmat @ wmat).reshape(n, oh, ow, c, kh, kw)
                gxp = np.zeros_like(xp)
                for i in range(kh):
                    for j in range(kw):
                        gxp[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride] += (
                            gcols[:, :, :, :, i, j].transpose(0, 3, 1, 2))
                x._accumulate(gxp[:, :, padding : padding + h, padding : padding + w])
        out._backward = _backward
    return out


def max_pool2d(x: Tensor, kernel: int = 2) -> Tensor:
    """Max over non-overlapping kernel x kernel windows (stride = kernel; leftover rows/columns dropped, as torch)."""
    n, c, h, w = x.shape
    oh, ow = h // kernel, w // kernel
    xc = x.data[:, :, : oh * kernel, : ow * kernel]
    win = xc.reshape(n, c, oh, kernel, ow, kernel).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, oh, ow, kernel * kernel)
    arg = win.argmax(-1)[..., None]  # (N, C, OH, OW, 1): the first maximum, as torch
    out = x._result(np.take_along_axis(win, arg, -1)[..., 0], (x,), "max_pool2d")
    if out.requires_grad:
        def _backward(g):
            gwin = np.zeros_like(win)
            np.put_along_axis(gwin, arg, g[..., None], -1)  # only the winner of each window gets gradient
            gx = np.zeros_like(x.data)
            gx[:, :, : oh * kernel, : ow * kernel] = (
                gwin.reshape(n, c, oh, ow, kernel, kernel).transpose(0, 1, 2, 4, 3, 5).reshape(xc.shape))
            x._accumulate(gx)
        out._backward = _backward
    return out


def dropout(x: Tensor, p: float, training: bool, rng: np.random.Generator) -> Tensor:
    """Zero each element with probability p and scale the rest by 1 / (1 - p) (inverted dropout)."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    mask = (rng.random(x.shape) >= p).astype(x.dtype) / (1.0 - p)
    return x * as_tensor(mask)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return x.log_softmax(axis)


def relu(x: Tensor) -> Tensor:
    return x.relu()


def leaky_relu(x: Tensor, slope: float = 0.01) -> Tensor:
    return x.leaky_relu(slope)


def sigmoid(x: Tensor) -> Tensor:
    return x.sigmoid()


def tanh(x: Tensor) -> Tensor:
    return x.tanh()


def softplus(x: Tensor) -> Tensor:
    return x.softplus()


def gelu(x: Tensor) -> Tensor:
    return x.gelu()


ACTIVATIONS = {"relu": relu, "leaky_relu": leaky_relu, "softplus": softplus, "gelu": gelu, "tanh": tanh,
               "sigmoid": sigmoid}
