"""A small Vision Transformer for 28x28 images (Dosovitskiy et al. 2021), attention written out.

Patches of `patch` x `patch` pixels become tokens (a strided conv is a per-patch linear map), a
class token or mean pooling summarises them, a learned position embedding says where each patch
was, and pre-norm blocks (LayerNorm before attention and MLP, Xiong et al. 2020) keep training
stable without warm-up tricks. Attention is spelled out, Q K V projections, scaled dot product,
softmax, heads, so it can hand back its weights for plots; a test proves it equals
torch.nn.functional.scaled_dot_product_attention.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from mnistlab.models.registry import ModelArgError, check_arg, check_positive, register_model


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:  # each head takes an equal slice of the D features
            raise ModelArgError(f"heads={heads} does not divide dim={dim}; use a divisor such as "
                                f"{_divisors(dim)}, or a dim that is a multiple of {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.last_weights: torch.Tensor | None = None  # (B, heads, T, T) when keep_weights is set
        self.keep_weights = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, hd)
        weights = scaled_dot_product_weights(q, k)  # (B, h, T, T): row i says where token i looks
        if self.keep_weights:
            self.last_weights = weights.detach()
        out = (weights @ v).transpose(1, 2).reshape(b, t, d)  # heads side by side again: (B, T, D)
        return self.proj(out)


def _divisors(n: int) -> str:
    """The divisors of n other than 1 and n (or n itself if prime), in words: '2, 4, 7, 14'."""
    return ", ".join(str(d) for d in range(2, n) if n % d == 0) or str(n)


def scaled_dot_product_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)): dividing by sqrt(d) keeps the logits' variance near 1 for any d,
    so the softmax does not saturate (Vaswani et al. 2017, section 3.2.1)."""
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


class PatchEmbed(nn.Conv2d):
    """A conv with stride = kernel size is one linear map applied to every patch. It is computed as such:
    cut the image into patches, one matmul. Same numbers as the conv (a test checks), and faster per
    training step on CPU, where the conv's backward for one input channel is slow (see docs/experiments.md).
    Weights keep the conv's shape (D, C, p, p), so FLOP counting and checkpoints see a Conv2d."""

    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__(in_chans, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.kernel_size[0]
        gh, gw = h // p, w // p
        patches = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
        return F.linear(patches, self.weight.flatten(1), self.bias)  # (B, N, D)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(int(dim * mlp_ratio), dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # residual paths carry the gradient past every block
        return x + self.mlp(self.norm2(x))


@register_model("vit", "small Vision Transformer: patch embedding, explicit multi-head attention, pre-norm")
class ViT(nn.Module):
    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 10,
        img_size: int = 28,
        patch: int = 7,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        # mean of the patch tokens: no extra token that must learn to gather everything, and it did at
        # least as well as a class token here (see docs/experiments.md)
        pool: Literal["mean", "cls"] = "mean",
        dropout: float = 0.0,
    ):
        super().__init__()
        check_positive(img_size=img_size, patch=patch, dim=dim, depth=depth, heads=heads)
        if img_size % patch:
            raise ModelArgError(f"patch={patch} does not divide the image size {img_size}; "
                                f"use a divisor such as {_divisors(img_size)}")
        check_arg(dim * mlp_ratio >= 1, "mlp_ratio", f"a positive number with dim * mlp_ratio >= 1 (dim={dim})",
                  mlp_ratio)
        check_arg(0 <= dropout < 1, "dropout", "a probability in [0, 1)", dropout)
        self.pool = pool
        n_patches = (img_size // patch) ** 2
        self.patch_embed = PatchEmbed(in_chans, dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + (pool == "cls"), dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x)  # (B, N, D), patches in row-major order
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)  # (B, 1+N, D)
        return t + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.blocks(self.tokens(x)))
        return t[:, 0] if self.pool == "cls" else t.mean(1)  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each block's attention weights, (B, heads, T, T), for one forward pass."""
        attns = [blk.attn for blk in self.blocks]
        for a in attns:
            a.keep_weights = True
        try:
            self(x)
            return [a.last_weights for a in attns]
        finally:
            for a in attns:
                a.keep_weights, a.last_weights = False, None
