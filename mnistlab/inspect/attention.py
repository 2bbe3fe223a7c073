"""Where a ViT looks: each head's attention in each block, and attention rollout over the image.

One block's attention says where each token reads from, but after a few blocks a token is a mix of
everything, so a single layer's map is a poor answer to "which pixels mattered". Attention rollout
(Abnar and Zuidema 2020, "Quantifying attention flow in transformers") follows the mixing through
all the blocks: the residual connection x + attn(x) passes every token on as well, so each layer's
head-averaged attention A gets the identity added (0.5 A + 0.5 I once the rows are renormalised),
and the layers multiply, R = A_L ... A_2 A_1, with row i of R the share of each input token in
output token i. It ignores the MLPs and the values' sizes: an approximation, read it as one.

Which row to read depends on what the head reads (`ViT.pool`, see models/vit.py):
- "cls": the head reads only the class token's output, so the class token's row R[0], without its own
  column (the class token's input is a learned vector, no pixels), over the patches;
- "mean": the head reads the average of all output tokens, so the average of R's rows, mean_i R[i].
The per-layer figure reads each block's attention the same way (the class token's row, or the mean
over all query rows: how much attention each patch receives).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from mnistlab.data.batches import to_input
from mnistlab.inspect.features import choose_samples
from mnistlab.plots import pyplot


def attention_rollout(maps: list[torch.Tensor], add_identity: bool = True) -> torch.Tensor:
    """Attention rollout (Abnar and Zuidema 2020) of per-block maps [(B, heads, T, T), first block first] -> (B, T, T).

    Heads are averaged; with `add_identity` each layer becomes (A + I) with rows renormalised to sum to 1,
    the residual path's share; the layers are multiplied with the last on the left, R = A_L ... A_1.
    """
    if not maps:
        raise ValueError("attention_rollout needs the attention maps of at least one block")
    rollout = None
    for a in maps:
        a = a.float().mean(1)  # (B, T, T)
        if add_identity:
            a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
            a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout  # a later block reads the earlier blocks' mix
    return rollout


def has_attention(model: nn.Module) -> bool:
    """Whether the model exposes per-block attention maps (the ViT)."""
    return callable(getattr(model, "attention_maps", None)) and hasattr(model, "pool")


def read_out(model: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """(B, T, T) attention or rollout -> (B, side, side): the weight on each patch of the row(s) the head reads."""
    side = math.isqrt(a.shape[-1] - (model.pool == "cls"))  # square images: a side x side grid of patches
    if model.pool == "cls":
        w = a[:, 0, 1:]  # the class token's row, patches only: (B, N)
    else:
        w = a.mean(1)  # mean pooling: the average row, (B, N)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)  # a distribution over the patches
    return w.reshape(-1, side, side)


@torch.no_grad()  # not inference_mode: the tensors returned stay usable anywhere
def rollout_maps(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, classes), attention rollout read out over the patch grid (B, side, side)) for x (B, 1, H, W)."""
    maps = model.attention_maps(x)  # [(B, heads, T, T)] * depth
    logits = model(x)
    return logits, read_out(model, attention_rollout(maps))


def _caption(p: torch.Tensor, i: int, labels, classes: list[str] | None) -> str:
    name = (lambda c: classes[c]) if classes else str
    said = f"pred {name(int(p.argmax()))} ({float(p.max()):.0%})"
    return f"true {name(int(labels[i]))}\n{said}" if labels is not None else said


def _overlay(ax, image: np.ndarray, weights: np.ndarray, vmax: float):
    """The image in grey with the patch weights (side, side) over it, each patch one flat cell."""
    h, w = image.shape
    ax.imshow(image, cmap="gray_r", vmin=0, vmax=255, extent=(0, w, h, 0))
    ax.imshow(weights, cmap="inferno", vmin=0, vmax=vmax, alpha=0.7, interpolation="nearest", extent=(0, w, h, 0))
    ax.set_xticks([])
    ax.set_yticks([])


def attention_heads_figure(model: nn.Module, images_u8: torch.Tensor, mean: float, std: float, *,
                           labels: torch.Tensor | None = None, classes: list[str] | None = None,
                           indices: Sequence[int] | None = None, n_images: int = 3):
    """Each block's (rows) and head's (columns) attention over the patches, for a few images; None if not a ViT."""
    if not has_attention(model):
        return None
    plt = pyplot()
    pick = choose_samples(len(images_u8), labels, indices, n_images)
    x = to_input(images_u8[pick], mean, std)
    with torch.inference_mode():
        maps = model.attention_maps(x)  # [(B, heads, T, T)] * depth
        p = torch.softmax(model(x).float(), 1)
    depth, heads = len(maps), maps[0].shape[1]
    # (B, depth, heads, side, side): every block and head read out like the rollout
    per = torch.stack([torch.stack([read_out(model, a[:, h]) for h in range(heads)], 1) for a in maps], 1)
    n_side = per.shape[-1]
    cols = len(pick) * (heads + 1) - 1  # a narrow gap between images
    ratios = ([1] * heads + [0.25]) * len(pick)
    fig, axes = plt.subplots(depth, cols, figsize=(0.95 * cols + 1.5, 1.0 * depth + 1.6), squeeze=False,
                             gridspec_kw={"width_ratios": ratios[:cols]})
    for b, i in enumerate(pick):
        image = images_u8[i].cpu().numpy()
        vmax = float(per[b].max())  # one scale per image, so blocks and heads compare
        for layer in range(depth):
            for h in range(heads):
                ax = axes[layer, b * (heads + 1) + h]
                _overlay(ax, image, per[b, layer, h].numpy(), vmax)
                if layer == 0:
                    ax.set_title(f"head {h + 1}", fontsize=8)
                if h == 0 and b == 0:
                    ax.set_ylabel(f"block {layer + 1}", fontsize=9)
            if b < len(pick) - 1:
                axes[layer, b * (heads + 1) + heads].set_visible(False)
        caption = _caption(p[b], i, labels, classes).replace("\n", ", ")
        first = axes[-1, b * (heads + 1)]
        # The caption is wider than its axes, which tight_layout would answer with wide gaps between heads:
        # kept out of the layout, with an empty two-line x label holding the room for it
        first.set_xlabel(" \n ", fontsize=8)
        text = first.annotate(f"image {i}: {caption}\nbrightest patch {vmax:.2f}", xy=(0, -0.06),
                              xycoords="axes fraction", ha="left", va="top", fontsize=8)
        text.set_in_layout(False)
    query = "the class token's attention" if model.pool == "cls" else "attention received, averaged over all queries"
    fig.suptitle(f"attention over the {n_side}x{n_side} patches per block and head ({query});\n"
                 f"one colour scale per image, from 0 (dark) to its largest weight (bright); uniform attention = "
                 f"1/{n_side * n_side} = {1 / n_side**2:.3f}",
                 fontsize=10)
    return fig


def attention_rollout_figure(model: nn.Module, images_u8: torch.Tensor, mean: float, std: float, *,
                             labels: torch.Tensor | None = None, classes: list[str] | None = None,
                             indices: Sequence[int] | None = None, n_images: int = 8):
    """Attention rollout over the image for a few images (image above, rollout over it below); None if not a ViT."""
    if not has_attention(model):
        return None
    plt = pyplot()
    pick = choose_samples(len(images_u8), labels, indices, n_images)
    logits, roll = rollout_maps(model, to_input(images_u8[pick], mean, std))
    p = torch.softmax(logits.float(), 1)
    fig, axes = plt.subplots(2, len(pick), figsize=(1.45 * len(pick) + 0.8, 3.9), squeeze=False)
    for b, i in enumerate(pick):
        image = images_u8[i].cpu().numpy()
        top, bottom = axes[0, b], axes[1, b]
        top.imshow(image, cmap="gray_r", vmin=0, vmax=255)
        top.set_xticks([])
        top.set_yticks([])
        top.set_title(_caption(p[b], i, labels, classes), fontsize=8)
        # each image on its own scale: the question is where, not how much
        _overlay(bottom, image, roll[b].numpy(), float(roll[b].max()))
    axes[0, 0].set_ylabel("image", fontsize=9)
    axes[1, 0].set_ylabel("rollout", fontsize=9)
    readout = "the class token's row" if model.pool == "cls" else "the mean of all rows (mean pooling)"
    fig.suptitle(f"attention rollout (Abnar and Zuidema 2020) over the patches: {readout};\n"
                 "brighter = more of what the head reads comes from that patch (each image on its own scale)",
                 fontsize=10)
    return fig
