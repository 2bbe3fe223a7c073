"""A few labels: a fixed, seeded, stratified subset of K labelled images per class of the training split.

The subset is a function of (the training labels, K, seed) alone, so a run folder's config is
enough to draw it again, and its indices are recorded there anyway (labelled_subset.json). Each
seed draws a different subset; for one seed the subsets nest (the 10 per class are among the 100
per class), since every K takes the first K of each class in the same seeded order.

What an epoch is with few labels: one epoch shows each labelled image R times, R = ceil(validation
images / labelled images), so an epoch shows at least as many training images as the per-epoch
validation evaluates (at 10 labels per class on Fashion-MNIST: 100 images, each 50 times an epoch;
at 1,000 per class: 10,000 images, once). Without that, an epoch at 10 per class would be one step,
the epoch's validation pass over 5,000 images would cost 50 times its training, and a model's
default epoch count would mean 18 steps. With it, the steps of a run are epochs x ceil(R K C / batch),
about the same for every K at small K, and the defaults stay meaningful. Validation and test are
untouched: the same images every run sees. Normalisation keeps the whole training split's pixel
statistics, which use no labels and are those a pre-trained encoder saw.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from mnistlab.data.dataset import Dataset
from mnistlab.errors import UserError

SUBSET_FILE = "labelled_subset.json"


def stratified_subset(labels: torch.Tensor, per_class: int, seed: int, num_classes: int) -> torch.Tensor:
    """Sorted indices of `per_class` images of every class: the first of each class in a seeded order."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + 424_242) % 2**64)  # not the stream of epoch orders
    order = torch.randperm(len(labels), generator=g)
    chosen = []
    for c in range(num_classes):
        in_class = order[labels[order] == c]  # this class's images, in the seeded order
        if len(in_class) < per_class:
            most = min(int((labels == k).sum()) for k in range(num_classes))
            raise UserError(f"--labels-per-class {per_class}: class {c} has only {len(in_class)} training images "
                            f"(the most this dataset allows is {most})")
        chosen.append(in_class[:per_class])
    return torch.cat(chosen).sort().values


def with_labelled_subset(ds: Dataset, per_class: int, seed: int) -> tuple[Dataset, dict[str, Any]]:
    """`ds` training on its stratified subset only (each image R times an epoch, see above), and the record
    of the subset that labelled_subset.json keeps."""
    idx = stratified_subset(ds.train_labels, per_class, seed, ds.num_classes)
    passes = max(1, math.ceil(len(ds.val_labels) / len(idx)))
    repeated = idx.repeat(passes)
    record = dict(dataset=ds.name, labels_per_class=per_class, seed=seed, images=len(idx), passes_per_epoch=passes,
                  split="train", indices=idx.tolist(),
                  about="indices into the training split as load_dataset returns it (validation already carved "
                        "out); each image is shown passes_per_epoch times an epoch")
    sub = dataclasses.replace(ds, train_images=ds.train_images[repeated], train_labels=ds.train_labels[repeated])
    return sub, record
