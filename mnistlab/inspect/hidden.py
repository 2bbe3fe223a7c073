"""How a recurrent model's state evolves as it reads an image, one time step at a time.

`rnn`, `gru` and `lstm` read 28 rows (or 784 pixels) in turn; h_t is all they keep of the first t
steps. Two views per sample image:
- h_t as a units x time heatmap: when units switch on, saturate (tanh bounds every h_t to [-1, 1] for
  all three cells) or hold a value over many steps, the memory the gates exist for;
- the class probabilities softmax(head(h_t)) at every t. The head was trained on h_T alone, so this is
  the head applied to states it never saw in training: it is no calibrated prediction before the
  end, but since h_t depends on the first t steps only, it reads "what the network would answer if
  the image stopped here", and shows at which row the answer forms. It makes no sense for a
  bidirectional model, whose h_t holds a backward half that has already read steps t..T: there
  the panel is left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from mnistlab.data.batches import to_input
from mnistlab.inspect.features import choose_samples
from mnistlab.plots import pyplot


def is_recurrent(model: nn.Module) -> bool:
    """Whether `model` reads the image as a sequence through a torch RNN/GRU/LSTM at `model.rnn`."""
    return isinstance(getattr(model, "rnn", None), nn.RNNBase)


@torch.no_grad()  # not inference_mode: the tensors returned stay usable anywhere
def hidden_states(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, classes), the last layer's h_t at every step (B, T, H * directions)) for x (B, 1, H, W).

    Caught from the fused nn.RNN/GRU/LSTM with a forward hook: one pass, the same numbers the model used
    (models/rnn.py's `unrolled` gives the same states step by step, but it is meant for gradients).
    """
    caught: list[torch.Tensor] = []
    handle = model.rnn.register_forward_hook(lambda module, inputs, output: caught.append(output[0].detach()))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, caught[0]


def hidden_states_figure(model: nn.Module, images_u8: torch.Tensor, mean: float, std: float, *,
                         labels: torch.Tensor | None = None, classes: list[str] | None = None,
                         indices: Sequence[int] | None = None, n_images: int = 3, top_classes: int = 3):
    """Per sample image: the image, h_t as units x time, and the head's class probabilities at each t
    (unidirectional models); None if the model is not recurrent."""
    if not is_recurrent(model):
        return None
    plt = pyplot()
    pick = choose_samples(len(images_u8), labels, indices, n_images)
    logits, h = hidden_states(model, to_input(images_u8[pick], mean, std))  # h: (B, T, U)
    bidirectional = model.rnn.bidirectional
    with torch.inference_mode():
        probs = None if bidirectional else torch.softmax(model.head(h).float(), -1)  # (B, T, classes)
    b, steps, units = h.shape
    # One unit order for every image, by the unit's final value averaged over them: the last column runs
    # from red to blue, and each row shows how that unit got there.
    order = h[:, -1].mean(0).argsort(descending=True)  # (U,)
    name = (lambda c: classes[c]) if classes else str
    seq = getattr(model, "seq", "rows")
    step_word = "image row" if seq == "rows" else "pixel" + (" (permuted order)" if seq == "permuted" else "")
    t = np.arange(1, steps + 1)
    cols = 2 if bidirectional else 3
    fig, axes = plt.subplots(len(pick), cols, figsize=(12.5 if cols == 3 else 9, 2.5 * len(pick) + 0.9),
                             squeeze=False, gridspec_kw={"width_ratios": [1, 4.2, 2.6][:cols]})
    for row, i in enumerate(pick):
        ax_img, ax_h = axes[row, 0], axes[row, 1]
        ax_img.imshow(images_u8[i].cpu().numpy(), cmap="gray_r", vmin=0, vmax=255)
        ax_img.set_xticks([])
        ax_img.set_yticks([])
        p_end = torch.softmax(logits[row].float(), 0)
        truth = f"true {name(int(labels[i]))}\n" if labels is not None else ""
        ax_img.set_title(f"image {i}\n{truth}pred {name(int(p_end.argmax()))} ({float(p_end.max()):.0%})",
                         fontsize=8)
        ax_h.imshow(h[row][:, order].T.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1,
                         interpolation="nearest", extent=(0.5, steps + 0.5, units - 0.5, -0.5))
        ax_h.set_ylabel(f"unit ({units}, sorted)", fontsize=8)
        ax_h.tick_params(labelsize=7)
        if probs is not None:
            ax_p = axes[row, 2]
            p = probs[row]  # (T, classes)
            shown = p[-1].argsort(descending=True)[:top_classes].tolist()
            if labels is not None and int(labels[i]) not in shown:
                shown.append(int(labels[i]))
            for c in shown:
                true = labels is not None and c == int(labels[i])
                ax_p.plot(t, p[:, c].numpy(), lw=2 if true else 1.2, ls="-" if true else "--",
                          label=f"{name(c)}{' (true)' if true else ''}")
            ax_p.set_ylim(-0.02, 1.02)
            ax_p.set_xlim(0.5, steps + 0.5)
            ax_p.set_ylabel("p(class)", fontsize=8)
            ax_p.tick_params(labelsize=7)
            ax_p.grid(alpha=0.3)
            ax_p.legend(fontsize=7, loc="upper left", frameon=False)
        if row == 0:
            ax_h.set_title(f"hidden state h_t of the {model.rnn.mode.lower()}'s last layer"
                           f"{' (both directions)' if bidirectional else ''}: red +1, white 0, blue -1", fontsize=9)
            if probs is not None:
                axes[0, 2].set_title(f"softmax(head(h_t)): top {top_classes} at the end, true class solid",
                                     fontsize=9)
    for ax in axes[-1, 1:]:
        ax.set_xlabel(f"time step t ({step_word})", fontsize=8)
    why = ("\n(no class probabilities over time: a bidirectional h_t has already read the whole image)"
           if bidirectional else "")
    fig.suptitle(f"what the recurrent state holds while it reads the image{why}", fontsize=10)
    return fig
