"""Figures of what a model predicts on a split: the confusion matrix beside per-class accuracy, the most
confident mistakes, the images it is surest of per class, and the reliability diagram.

They take predictions, not a model: logits or probabilities (N, K), true labels (N,) and the uint8 images
(N, 28, 28) they came from, so they draw the same for either engine. Each returns a matplotlib Figure
(`mnistlab.plots.pyplot()`); the report inlines it.
"""

from __future__ import annotations

import numpy as np
import torch

from mnistlab.plots import class_rows_figure, pyplot


def worst_first(accuracy: torch.Tensor) -> list[int]:
    """Class indices from the lowest accuracy to the highest (ties in class order)."""
    return torch.argsort(accuracy, stable=True).tolist()


def draw_per_class_accuracy(ax, accuracy: torch.Tensor, classes: list[str]) -> None:
    """Horizontal bars of per-class accuracy (K,), the worst class on top."""
    order = worst_first(accuracy)
    values = [100 * float(accuracy[c]) for c in order]
    ax.barh(range(len(order)), values, color="tab:blue")
    ax.set_yticks(range(len(order)), [classes[c] for c in order], fontsize=8)
    ax.invert_yaxis()  # bar 0 (the worst) at the top, where a reader starts
    ax.set_xlim(max(0.0, min(values) - 5), 100)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.1f}%", va="center", fontsize=7)
    ax.set_title("per-class accuracy (recall), worst first")
    ax.grid(axis="x", alpha=0.3)


def confusion_figure(confusion: torch.Tensor, classes: list[str]):
    """The (K, K) confusion counts (row = true, column = predicted), coloured by share of the true class,
    beside per-class accuracy."""
    from mnistlab.evaluate import per_class_accuracy

    k = len(classes)
    fig, (ax, bx) = pyplot().subplots(1, 2, figsize=(13, 5.4), gridspec_kw=dict(width_ratios=[1.25, 1]))
    shown = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)  # (K, K), rows sum to 1
    ax.imshow(shown.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if confusion[i, j]:
                ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion on the test split (counts; colour = share of the true class)")
    draw_per_class_accuracy(bx, per_class_accuracy(confusion), classes)
    return fig


def most_confused(confusion: torch.Tensor) -> tuple[int, int, int] | None:
    """(true class, predicted class, count) of the largest off-diagonal cell; None when nothing is confused."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    if not off.sum():
        return None
    i, j = divmod(int(off.argmax()), len(off))
    return i, j, int(off[i, j])


def mistakes_figure(images: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, classes: list[str],
                    n: int = 36, cols: int = 9):
    """The n wrong predictions given the highest probability, titled true / said / probability;
    None when nothing is wrong."""
    p, pred = probs.max(1)
    wrong = torch.nonzero(pred != labels).flatten()
    if not len(wrong):
        return None
    worst = wrong[torch.argsort(p[wrong], descending=True)][:n].tolist()
    short = [c[:12] for c in classes]
    rows = max(1, -(-len(worst) // cols))
    fig, axes = pyplot().subplots(rows, cols, figsize=(cols * 1.45, rows * 1.65 + 0.4), squeeze=False)
    for a in axes.flat:
        a.axis("off")
    for a, i in zip(axes.flat, worst, strict=False):
        a.imshow(images[i].numpy(), cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
        a.set_title(f"true {short[int(labels[i])]}\nsaid {short[int(pred[i])]} {100 * float(p[i]):.0f}%", fontsize=7)
    fig.suptitle(f"the {len(worst)} most confident mistakes (of {len(wrong)} on the test split)", fontsize=10)
    return fig


def typical_figure(images: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, classes: list[str],
                   per_class: int = 8):
    """Per class (a row each), the correctly classified images given the highest probability: the model's
    idea of the class."""
    p, pred = probs.max(1)
    rows = []
    for c in range(len(classes)):
        ok = torch.nonzero((pred == c) & (labels == c)).flatten()
        rows.append([images[i].numpy() for i in ok[torch.argsort(p[ok], descending=True)][:per_class].tolist()])
    return class_rows_figure(rows, classes, per_class,
                             title="per class, the correctly classified test images the model is surest of")


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: (mean confidence, accuracy, count); empty bins are NaN."""
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype)
    mc, acc, n = np.full(bins, np.nan), np.full(bins, np.nan), np.zeros(bins)
    for b in range(bins):
        inside = (conf > edges[b]) & (conf <= edges[b + 1])
        n[b] = int(inside.sum())
        if n[b]:
            mc[b], acc[b] = conf[inside].double().mean().item(), correct[inside].mean().item()
    return mc, acc, n


def calibration_figure(raw: torch.Tensor, scaled: torch.Tensor, labels: torch.Tensor, temperature: float,
                       ece_raw: float, ece_scaled: float, bins: int = 15):
    """Reliability diagram of the softmax and the temperature-scaled probabilities (N, K), and a histogram
    of their confidence."""
    fig, (ax, hx) = pyplot().subplots(1, 2, figsize=(11, 4.2))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    for probs, label, style in ((raw, f"softmax: ECE {100 * ece_raw:.2f}%", "-o"),
                                (scaled, f"temperature T={temperature:.2f}: ECE {100 * ece_scaled:.2f}%", "-s")):
        mc, acc, _ = reliability(probs, labels, bins)
        ax.plot(mc, acc, style, ms=4, label=label)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability diagram, test split ({bins} bins)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    hx.hist(raw.max(1).values.numpy(), bins=30, range=(0, 1), alpha=0.6, label="softmax")
    hx.hist(scaled.max(1).values.numpy(), bins=30, range=(0, 1), alpha=0.6, label=f"T={temperature:.2f}")
    hx.set_yscale("log")
    hx.set_xlabel("confidence")
    hx.set_ylabel("test images")
    hx.set_title("how confident the model is")
    hx.legend(fontsize=8)
    return fig
