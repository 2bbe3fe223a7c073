"""The penultimate representation: what the classifier's last linear layer sees.

If training worked, the test images of one class gather together in this space, apart from the
other classes, and the last layer separates them with hyperplanes. Two views of that:
- a 2-D map of the test set's features coloured by class: PCA on all of them (linear, so
  distances and spreads are honest) and t-SNE on a subsample (van der Maaten and Hinton 2008:
  non-linear, keeps neighbourhoods but not distances between clusters, so read only which points
  lie together);
- the cosine similarity between the class means: which classes the network finds alike. The means
  are taken relative to the global mean, as in the neural-collapse analysis of Papyan, Han and
  Donoho (2020): raw ReLU features are all non-negative, which makes every cosine look high, while
  centred class means of a well-separated network approach -1/(C-1) off the diagonal.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

from mnistlab.data.batches import to_input
from mnistlab.plots import pyplot

# Sized by measurement, for the report's 30 s on 2 cores: Barnes-Hut t-SNE of a Fashion-MNIST CNN's
# 512-D features took 1.4 s for 1,000 points, 2.35 s for 1,500 and 3.3 s for 2,000 (500 iterations, one
# thread, the machine shared with other work); 1,500 points already show every cluster.
TSNE_POINTS = 1500
# 250 iterations of early exaggeration and 250 more: with the learning rate scaled to N (scikit-learn's
# "auto", after Belkina et al. 2019) the Fashion-MNIST map after 500 iterations showed the same clusters
# in the same arrangement as after 1,000, in half the time.
TSNE_ITERATIONS = 500
TSNE_PCA_DIMS = 50  # t-SNE on the top principal components, as van der Maaten and Hinton did: cheaper, less noise


@torch.inference_mode()
def penultimate_features(model: torch.nn.Module, images_u8: torch.Tensor, mean: float, std: float,
                         batch: int = 1000) -> np.ndarray:
    """model.forward_features of every image, in batches: (N, 28, 28) uint8 -> (N, D) float32."""
    chunks = [model.forward_features(to_input(images_u8[i : i + batch], mean, std)).float()
              for i in range(0, len(images_u8), batch)]
    return torch.cat(chunks).numpy()


def classifier_layer(model: torch.nn.Module) -> torch.nn.Linear:
    """The model's final linear layer (its `head`, or `fc` for `linear`): the last nn.Linear it registers."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


@torch.inference_mode()
def features_and_logits(model: torch.nn.Module, images_u8: torch.Tensor, mean: float, std: float,
                        batch: int = 1000) -> tuple[np.ndarray, torch.Tensor]:
    """(features (N, D) float32, logits (N, classes)) in one pass: the input and output of the final linear layer.

    For an eval-mode model its input is what forward_features returns (a test checks, for every registered
    model), so a report that needs both pays for one pass over the test set instead of two.
    """
    caught: list[torch.Tensor] = []
    handle = classifier_layer(model).register_forward_hook(lambda m, inputs, output: caught.append(inputs[0]))
    try:
        logits = [model(to_input(images_u8[i : i + batch], mean, std)).float() for i in range(0, len(images_u8), batch)]
    finally:
        handle.remove()
    return torch.cat(caught).float().numpy(), torch.cat(logits)


def one_per_class(labels: np.ndarray | torch.Tensor, n: int) -> list[int]:
    """Indices of up to n sample images: the first of each class in turn (classes 0, 1, ...), then the next of each."""
    labels = np.asarray(labels)
    by_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picked: list[int] = []
    while len(picked) < min(n, len(labels)):
        for idx in by_class:
            if idx and len(picked) < n:
                picked.append(int(idx.pop(0)))
    return picked


def choose_samples(n_total: int, labels: np.ndarray | torch.Tensor | None, indices: Sequence[int] | None,
                   n: int) -> list[int]:
    """`indices` as ints (a list, range or tensor) if given, else one image per class with labels, else the first n."""
    if indices is not None:
        return [int(i) for i in indices]
    return one_per_class(labels, n) if labels is not None else list(range(min(n, n_total)))


def pca(features: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> (the top-k principal components' coordinates (N, k), their fraction of the variance (k,))."""
    x = features.astype(np.float64) - features.mean(0)  # (N, D)
    # One BLAS thread, like t-SNE below: X^T X for 10,000 x 512 took 0.11 s on one thread and 0.3-0.45 s
    # on two, on 2 cores shared with other work (and once 8 s, the threads waiting on each other).
    with threadpool_limits(1):
        # eigenvectors of the D x D covariance: cheaper than an SVD of X for N >> D
        var, vecs = np.linalg.eigh(x.T @ x / max(len(x) - 1, 1))  # ascending
        var, vecs = var[::-1][:k], vecs[:, ::-1][:, :k]  # (k,), (D, k)
        # an eigenvector's sign is arbitrary: make each one's largest loading positive, so runs agree
        vecs = vecs * np.sign(vecs[np.abs(vecs).argmax(0), np.arange(vecs.shape[1])])
        total = np.clip(x.var(0, ddof=1).sum(), 1e-12, None)
        return (x @ vecs).astype(np.float32), (np.clip(var, 0, None) / total).astype(np.float32)


def tsne(features: np.ndarray, n_points: int = TSNE_POINTS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """t-SNE of a random subsample: (indices of the points taken (n,), their 2-D coordinates (n, 2)).

    The same features and seed give the same subsample and the same map.
    """
    from sklearn.manifold import TSNE  # imported here: scikit-learn takes a second to import

    rng = np.random.default_rng(seed)
    n = len(features)
    idx = np.sort(rng.choice(n, size=min(n_points, n), replace=False))
    x = features[idx]
    if x.shape[1] > TSNE_PCA_DIMS:
        x, _ = pca(x, TSNE_PCA_DIMS)
    # perplexity must stay below the number of points; 30 is the usual choice (van der Maaten 2008)
    perplexity = min(30.0, max((len(x) - 1) / 3, 1.0))
    # One OpenMP thread: on 2 cores shared with other work, two threads took 2-8x longer than one
    # (10-37 s instead of 2-5 s for 1,000 points), the threads waiting on each other.
    # scikit-learn renamed n_iter to max_iter in 1.5; pyproject allows 1.3
    iterations = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"
    with threadpool_limits(1):
        coords = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                      random_state=seed, **{iterations: TSNE_ITERATIONS}).fit_transform(x)
    return idx, coords.astype(np.float32)


def _class_colors(num_classes: int) -> list:
    plt = pyplot()
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    return [cmap(c % cmap.N) for c in range(num_classes)]


def feature_map_figure(features: np.ndarray, labels: np.ndarray | torch.Tensor, classes: list[str], *,
                       tsne_points: int = TSNE_POINTS, seed: int = 0):
    """The features in 2-D, coloured by true class: PCA of all of them, t-SNE of a subsample."""
    plt = pyplot()
    labels = np.asarray(labels)
    coords_pca, explained = pca(features, 2)
    idx, coords_tsne = tsne(features, tsne_points, seed)
    colors = _class_colors(len(classes))
    fig, (ax_pca, ax_tsne) = plt.subplots(1, 2, figsize=(12.5, 5.4))
    # few points per class on top of many: small, half-transparent dots so dense clusters stay readable
    size = 3 if len(features) > 3000 else 8
    for c, name in enumerate(classes):
        on = labels == c
        ax_pca.scatter(*coords_pca[on].T, s=size, color=colors[c], alpha=0.5, linewidths=0, label=name)
        on_sub = labels[idx] == c
        ax_tsne.scatter(*coords_tsne[on_sub].T, s=size + 3, color=colors[c], alpha=0.7, linewidths=0)
    ax_pca.set_xlabel(f"PC 1 ({explained[0]:.0%} of the variance)")
    ax_pca.set_ylabel(f"PC 2 ({explained[1]:.0%})")
    ax_pca.set_title(f"PCA of all {len(features):,} feature vectors ({features.shape[1]}-D)", fontsize=10)
    which = "all" if len(idx) == len(features) else f"a random {len(idx):,}"
    ax_tsne.set_title(f"t-SNE of {which} of them (seed {seed})", fontsize=10)
    ax_tsne.set_xticks([])
    ax_tsne.set_yticks([])  # t-SNE's axes have no meaning
    handles, names = ax_pca.get_legend_handles_labels()
    legend = ax_tsne.legend(handles, names, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9,
                            markerscale=3, frameon=False, title="true class")
    for handle in legend.legend_handles:
        handle.set_alpha(1)
    fig.suptitle("penultimate features of the test set", fontsize=11)
    return fig


def class_mean_cosine(features: np.ndarray, labels: np.ndarray | torch.Tensor, num_classes: int,
                      center: bool = True) -> np.ndarray:
    """(C, C) cosine similarity between the class means of `features` (minus the global mean if `center`).

    A class with no samples has a row and column of NaN.
    """
    labels = np.asarray(labels)
    x = features.astype(np.float64)
    means = np.full((num_classes, x.shape[1]), np.nan)
    for c in range(num_classes):
        if (labels == c).any():
            means[c] = x[labels == c].mean(0)
    if center:
        # the mean of the class means, not of all samples, so an unbalanced test set does not tilt it
        means = means - np.nanmean(means, axis=0)
    unit = means / np.linalg.norm(means, axis=1, keepdims=True)
    cos = unit @ unit.T
    cos = (cos + cos.T) / 2  # exactly symmetric despite rounding
    np.fill_diagonal(cos, np.where(np.isnan(np.diag(cos)), np.nan, 1.0))
    return cos


def class_cosine_figure(features: np.ndarray, labels: np.ndarray | torch.Tensor, classes: list[str],
                        center: bool = True):
    """(Figure, the (C, C) matrix): the cosine similarity between class-mean features, cells annotated."""
    plt = pyplot()
    c = len(classes)
    cos = class_mean_cosine(features, labels, c, center)
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * c, 1.2 + 0.5 * c))
    im = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(c))
    ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(c))
    ax.set_yticklabels(classes, fontsize=8)
    if c <= 12:
        for i in range(c):
            for j in range(c):
                if not np.isnan(cos[i, j]):
                    ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(cos[i, j]) > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    what = "class means minus their mean" if center else "class means"
    floor = f"; {-1 / (c - 1):.2f} = all equally apart" if center and c > 1 else ""
    ax.set_title(f"cosine similarity of penultimate features\n({what}{floor})", fontsize=10)
    return fig, cos
