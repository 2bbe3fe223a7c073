"""What the convolutions compute: the first layer's filters, and one image's feature maps at each conv stage.

First-layer filters act on pixels directly, so they can be read as pictures: edge and stroke
detectors at various orientations (Krizhevsky et al. 2012, fig. 3; Zeiler and Fergus 2014 for the
deeper layers, which are only readable through their responses). Hence the second figure: the maps
an image produces at each stage, smaller and more numerous the deeper they are.

A stage is one conv layer and the activation that follows it (conv-BN-ReLU in `cnn`, conv-tanh in
`lenet5`); its maps are caught with a forward hook, so the model files need no change. The ViT's
patch embedding is a Conv2d in form but a per-patch linear map in fact (stride = kernel), with no
sliding window, so it does not count as a conv layer here.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from mnistlab.data.batches import to_input
from mnistlab.models.vit import PatchEmbed
from mnistlab.plots import pyplot

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.Softplus, nn.SiLU, nn.ELU)


def conv_stages(model: nn.Module) -> list[tuple[str, nn.Conv2d, nn.Module]]:
    """(name, conv, module whose output is the stage's maps) per conv layer, in the order they are registered.

    The maps are the output of the first activation after the conv and before the next conv (BatchNorm
    in between is part of the stage), or the conv's own output where no activation follows.
    """
    stages: list[tuple[str, nn.Conv2d, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and not isinstance(m, PatchEmbed):
            stages.append((name, m, m))
        elif isinstance(m, ACTIVATIONS) and stages and stages[-1][2] is stages[-1][1]:
            stages[-1] = (stages[-1][0], stages[-1][1], m)
    return stages


@torch.no_grad()  # not inference_mode: the tensors returned stay usable anywhere
def stage_maps(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits (B, classes), each conv stage's maps (B, C_s, H_s, W_s)) for one forward pass of x (B, 1, 28, 28)."""
    stages = conv_stages(model)
    caught: list[torch.Tensor | None] = [None] * len(stages)

    def catch(i: int):
        def hook(module, inputs, output):
            caught[i] = output.detach().clone()  # clone: an in-place ReLU's output is the BN output it overwrote

        return hook

    handles = [out.register_forward_hook(catch(i)) for i, (_, _, out) in enumerate(stages)]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, [m for m in caught if m is not None]


def filters_figure(model: nn.Module):
    """The first conv layer's filters as small images, or None for a model without conv layers."""
    stages = conv_stages(model)
    if not stages:
        return None
    plt = pyplot()
    w = stages[0][1].weight.detach().float().cpu()  # (C_out, C_in, k, k)
    c_out, c_in, kh, kw = w.shape
    w = w.sum(1)  # (C_out, k, k): with one input channel, the filter itself
    shown = min(c_out, 64)
    cols = min(shown, 16)
    rows = math.ceil(shown / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(0.75 * cols + 0.6, 0.8 * rows + 1.0), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < shown:
            # each filter on its own symmetric scale: BatchNorm after the conv divides out a filter's
            # overall size, so its pattern is what it contributes; white is 0
            lim = float(w[i].abs().max()) or 1.0
            ax.imshow(w[i].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set_title(str(i), fontsize=7, pad=2)
    summed = f", summed over {c_in} input channels" if c_in > 1 else ""
    more = f", first {shown} of {c_out}" if shown < c_out else ""
    fig.suptitle(f"first conv layer '{stages[0][0]}': {c_out} filters of {c_in}x{kh}x{kw}{more}{summed}\n"
                 "red positive, blue negative weights, each filter on its own scale", fontsize=10)
    return fig


def feature_maps_figure(model: nn.Module, images_u8: torch.Tensor, mean: float, std: float, *, index: int = 0,
                        channels: int = 8, labels: torch.Tensor | None = None, classes: list[str] | None = None):
    """Image `index`'s feature maps at each conv stage (the `channels` that vary most over the image, and the
    mean of all), or None for a model without conv layers."""
    convs = conv_stages(model)
    if not convs:
        return None
    plt = pyplot()
    logits, maps = stage_maps(model, to_input(images_u8[index : index + 1], mean, std))
    every = [(k + 1, name, m[0]) for k, ((name, _, _), m) in enumerate(zip(convs, maps, strict=True))]
    # A 1x1 map (LeNet's C5) is a full connection, a vector with no layout to show
    stages = [s for s in every if s[2].shape[-1] > 1]
    left_out = ", ".join(f"conv {k} ({'x'.join(map(str, m.shape))})" for k, _, m in every if m.shape[-1] == 1)
    cols = 2 + channels  # the mean of all channels, a gap, then the channels
    fig, axes = plt.subplots(1 + len(stages), cols, figsize=(0.95 * cols + 1.2, 1.05 * (1 + len(stages)) + 0.8),
                             squeeze=False, gridspec_kw={"width_ratios": [1, 0.15] + [1] * channels})
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    axes[0, 0].imshow(images_u8[index].cpu().numpy(), cmap="gray_r", vmin=0, vmax=255)
    axes[0, 0].set_ylabel("input\n1x28x28", rotation=0, ha="right", va="center", fontsize=8)
    p = torch.softmax(logits[0].float(), 0)
    name_of = (lambda c: classes[c]) if classes else str
    said = f"predicted '{name_of(int(p.argmax()))}' ({float(p.max()):.0%})"
    if labels is not None:
        said = f"true '{name_of(int(labels[index]))}', {said}"
    for ax in axes[0, 1:]:
        ax.set_visible(False)
    for row, (k, name, m) in enumerate(stages, start=1):  # m: (C, H, W)
        c, h, w = m.shape
        # the channels whose maps vary most over the image: the most active ones by mean were mostly
        # lit by the (normalised, non-zero) background, which says little about the image
        spread = m.flatten(1).std(1)  # (C,)
        top = spread.argsort(descending=True)[:channels]
        shown = m[top]
        signed = bool((m < 0).any())  # tanh stages go both ways, ReLU stages do not
        lim = float(shown.abs().max()) or 1.0
        style = dict(cmap="RdBu_r", vmin=-lim, vmax=lim) if signed else dict(cmap="viridis", vmin=0, vmax=lim)
        avg = m.mean(0)
        avg_lim = float(avg.abs().max()) or 1.0
        axes[row, 0].imshow(avg.numpy(), cmap="RdBu_r" if signed else "viridis",
                            vmin=-avg_lim if signed else 0, vmax=avg_lim, interpolation="nearest")
        axes[row, 0].set_ylabel(f"conv {k}: {name}\n{c}x{h}x{w}", rotation=0, ha="right", va="center", fontsize=8)
        axes[row, 0].set_title(f"mean of {c}", fontsize=7, pad=2)
        for j, ch in enumerate(top.tolist()):
            axes[row, 2 + j].imshow(shown[j].numpy(), interpolation="nearest", **style)
            axes[row, 2 + j].set_title(f"ch {ch}", fontsize=7, pad=2)
    skipped = f"; {left_out} left out: 1x1 maps have no layout" if left_out else ""
    fig.suptitle(f"test image {index}: {said}\nfeature maps after each conv layer's activation: the {channels} "
                 f"channels that vary most over this image,\none colour scale per stage (the mean of all channels on "
                 f"its own){skipped}", fontsize=10)
    return fig

