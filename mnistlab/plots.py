"""Pictures from arrays. Matplotlib only, with the non-interactive Agg backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    n_classes = len(classes)
    fig, axes = plt.subplots(
        n_classes, per_class, figsize=(per_class * 0.9 + 1.6, n_classes * 0.95 + 0.6), squeeze=False
    )
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
        for j in range(per_class):
            ax = axes[c, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(pick):
                ax.imshow(images[pick[j]], cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
        axes[c, 0].set_ylabel(f"{c}: {classes[c]}", rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
