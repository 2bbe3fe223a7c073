"""Pictures from arrays. Matplotlib only, with the non-interactive Agg backend (inline in a notebook)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mnistlab.errors import UserError
from mnistlab.files import atomic_write_bytes


def pyplot():
    """matplotlib.pyplot, imported on first use (importing mnistlab stays cheap): on the Agg backend (files, no
    window), except inside a Jupyter kernel, whose inline backend must stay so that the notebook shows figures."""
    import sys

    import matplotlib

    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_bytes(fig, fmt: str = "png", dpi: int = 100) -> bytes:
    """Lay out `fig`, render it in memory (PNG by default) and free it."""
    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format=fmt, dpi=dpi)
    finally:
        pyplot().close(fig)
    return buf.getvalue()


def figure_png(fig, dpi: int = 100) -> bytes:
    """The PNG bytes of `fig` (which is closed): what the HTML report inlines."""
    return figure_bytes(fig, "png", dpi)


def save_figure(fig, out: str | Path, dpi: int = 100) -> Path:
    """Lay out `fig`, write it to `out` (PNG unless the suffix names another format) and free it.

    The image is rendered in memory and written atomically, so a full disk or a kill leaves either
    the previous file or none, never a 0-byte or truncated picture. An OSError is a UserError.
    """
    out = Path(out)
    data = figure_bytes(fig, out.suffix[1:].lower() or "png", dpi)
    try:
        atomic_write_bytes(out, data)
    except OSError as e:
        reason = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
        raise UserError(f"cannot write {out}: {reason}") from e
    return out


def sample_grid(
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    out: str | Path,
    *,
    title: str = "",
    per_class: int = 8,
    seed: int = 0,
) -> Path:
    """Save a grid with one row per class and `per_class` random samples of it, labelled."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(len(classes)):
        idx = np.flatnonzero(labels == c)
        rows.append([images[i] for i in (rng.choice(idx, size=min(per_class, len(idx)), replace=False)
                                         if len(idx) else [])])
    fig = class_rows_figure(rows, [f"{c}: {name}" for c, name in enumerate(classes)], per_class, title=title)
    return save_figure(fig, out)


def class_rows_figure(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str], per_class: int, *,
                      title: str = ""):
    """One labelled row of up to `per_class` uint8 images (H, W) per class, ink dark on white."""
    fig, axes = pyplot().subplots(len(rows), per_class, figsize=(per_class * 0.9 + 1.6, len(rows) * 0.95 + 0.6),
                                  squeeze=False)
    for r, images in enumerate(rows):
        for j in range(per_class):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(images):
                ax.imshow(images[j], cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
        axes[r, 0].set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def grad_flow(records: list[dict], out: str | Path, *, title: str = "") -> Path:
    """Save the grad-flow figure of a run's records (see grad_flow_figure)."""
    return save_figure(grad_flow_figure(records, title=title), out, dpi=110)


def grad_flow_figure(records: list[dict], *, title: str = ""):
    """Per-time-step ||dL/dh_t|| (recurrent models) and per-layer gradient norms, log scale."""
    plt = pyplot()
    has_time = any(r.get("time_grad_norm") for r in records)
    fig, axes = plt.subplots(1, 2 if has_time else 1, figsize=(13 if has_time else 7, 4.6), squeeze=False)
    cmap = plt.get_cmap("viridis")
    colors = [cmap(i / max(len(records) - 1, 1)) for i in range(len(records))]
    ax = axes[0, 0]
    if has_time:
        for r, c in zip(records, colors, strict=True):
            norms = np.asarray(r["time_grad_norm"], dtype=float)
            ratio = norms[0] / norms[-1] if norms[-1] > 0 else float("nan")
            # exact zeros (saturated units or float64 underflow) cannot be drawn on a log axis: gaps
            ratio_text = f"{ratio:.1e}" if ratio > 0 else "0 (died out before t=1)"
            ax.semilogy(np.arange(1, len(norms) + 1), np.where(norms > 0, norms, np.nan), color=c,
                        label=f"step {r['step']}: first/last = {ratio_text}")
        ax.set_xlabel("time step t")
        ax.set_ylabel("||dLoss / dh_t||")
        ax.set_title("gradient reaching each time step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax = axes[0, 1]
    names = list(records[-1]["layer_grad_norm"])
    y = np.arange(len(names))
    height = 0.8 / len(records)
    for i, (r, c) in enumerate(zip(records, colors, strict=True)):
        vals = [max(r["layer_grad_norm"].get(n, 0.0), 1e-30) for n in names]
        ax.barh(y + i * height, vals, height=height, color=c, label=f"step {r['step']}")
    ax.set_xscale("log")
    ax.set_yticks(y + 0.4 - height / 2)
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("||dLoss / dW|| (before clipping)")
    ax.set_title("gradient reaching each parameter")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    if not has_time:
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def draw_image_rows(ax, rows: Sequence[tuple[str, np.ndarray]], vmin: float, vmax: float) -> None:
    """Grey images in `ax`, one labelled row per (label, (B, H, W) array), as one mosaic with white gaps;
    NaN pixels (hidden patches) are drawn blue."""
    cmap = pyplot().get_cmap("gray").with_extremes(bad="#9ecae1", over="white")
    h, w = rows[0][1].shape[1:]
    gap, n_cols = 2, max(len(images) for _, images in rows)
    mosaic = np.full((len(rows) * (h + gap), n_cols * (w + gap)), vmax + 1.0)  # gaps above vmax: white
    for i, (_, images) in enumerate(rows):
        for j, image in enumerate(images):
            mosaic[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = image
    ax.imshow(mosaic, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_yticks([i * (h + gap) + h / 2 for i in range(len(rows))], [label for label, _ in rows], fontsize=9)
    ax.set_xticks([])


def image_rows_figure(rows: Sequence[tuple[str, np.ndarray]], vmin: float, vmax: float, *, title: str = ""):
    """A figure of draw_image_rows."""
    n_cols = max(len(images) for _, images in rows)
    fig, ax = pyplot().subplots(figsize=(n_cols * 0.9 + 1.2, len(rows) * 0.9 + 0.6))
    draw_image_rows(ax, rows, vmin, vmax)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def reconstruction_loss_figure(records: list[dict], title: str = ""):
    """Training and validation reconstruction loss per epoch, from a pre-training run's metrics records."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    epochs = [r["epoch"] for r in records]
    ax.plot(epochs, [r["train_loss"] for r in records], marker=".", label="training (fresh masks each step)")
    ax.plot(epochs, [r["val_loss"] for r in records], marker=".", label="validation (fixed masks)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE on the hidden patches")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "reconstruction loss", fontsize=10)
    return fig


def learning_curves_figure(records: list[dict]):
    """Loss and accuracy per epoch (training and validation) and the learning rate, from metrics.jsonl records."""
    plt = pyplot()
    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "accuracy", "accuracy")):
        for split, style, name in (("train", "-o", "training (running, with augmentation)"),
                                   ("val", "-s", "validation")):
            values = [r.get(f"{split}_{key}") for r in records]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], style, ms=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{100 * v:.0f}%"))
    axes[2].plot(epochs, [r.get("lr", np.nan) for r in records], "-o", ms=3, color="tab:purple")
    axes[2].set_title("learning rate at the epoch's end")
    axes[2].set_xlabel("epoch")
    axes[2].grid(alpha=0.3)
    for ax in axes:
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    return fig
