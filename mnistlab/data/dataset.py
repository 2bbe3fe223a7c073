"""Load a dataset once into uint8 tensors, with a fixed validation split and its own statistics.

The test split is never used to choose anything: the validation images are carved from train by a
seeded permutation that does not depend on the training seed, so every run of every model is
compared on the same held-out images.

A --data-dir folder is named by what it holds, not by --dataset:
  - its files match a known dataset's recorded sha256 (of the published archive, or of the
    uncompressed data where the registry records one): it is that dataset, with its name, class
    names and mirror symmetry. Naming a different known dataset is an error that says what it holds.
  - the dataset named is one with no recorded hash of its uncompressed data (mnist, kmnist) and the
    folder's uncompressed files have exactly its shapes: it is taken as that dataset, as `data
    verify` and the search folders take it, and the summary says it was checked by shape, not hash.
  - anything else is custom: named `custom` (a plain word, since run folders are named after the
    dataset; the folder itself is in `location`), its classes the label numbers "0".."K-1" (K = the
    largest label + 1), no mirror symmetry assumed. When a known dataset was named, the summary says
    the folder was not verified as it, and why. The name `custom` given back with the same folder
    (a resumed or evaluated run) loads it as with no name.
A folder is refused (UserError, before any training) when a file is missing or malformed, images
are not 28x28, a split is empty, or labels and images disagree in count or class range.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mnistlab.data.decoded import decoded_dir, read_decoded, write_decoded
from mnistlab.data.idx import check_pair, read_idx
from mnistlab.data.registry import (
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    DatasetSpec,
    get_spec,
)
from mnistlab.data.resolve import (
    IMAGE_SIZE,
    cache_root,
    find_idx_files,
    first_failed_check,
    first_with_files,
    identify_folder,
    locate,
    verify_folder,
)
from mnistlab.errors import UserError

VAL_SPLIT_SEED = 12345
DEFAULT_DATASET = "mnist"
CUSTOM = "custom"  # the name of a --data-dir folder that is no known dataset
MAX_CLASSES = 256  # IDX labels are unsigned bytes


def default_val_size(n_train: int) -> int:
    """5,000 images (the usual MNIST choice), or a tenth of train for small sets like digits."""
    return min(5_000, n_train // 10)


@dataclass
class Dataset:
    """A whole dataset held in memory as tensors. Images (N, 28, 28) uint8, labels (N,) int64."""

    name: str
    classes: tuple[str, ...]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: float  # of train pixels scaled to [0, 1]; normalise with (x/255 - mean) / std
    std: float
    source: str  # where it was found: "cache", "system", "--data-dir", ...
    location: str
    file_sha256: dict[str, str] = field(default_factory=dict)
    spec: DatasetSpec | None = None  # the known dataset it is; None for a custom folder
    note: str = ""  # how a --data-dir folder was identified, for the summary

    @property
    def custom(self) -> bool:
        """True for a folder that is no known dataset: its classes are just the label numbers."""
        return self.spec is None

    @property
    def mirror_symmetric(self) -> bool:
        """Classes unchanged by a left-right flip: only a known dataset whose registry entry says so."""
        return self.spec is not None and self.spec.mirror_symmetric

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of 'train', 'val' or 'test'."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, not {name!r}")
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")

    def summary(self) -> str:
        return (
            f"{self.name}: train {len(self.train_labels):,}, val {len(self.val_labels):,}, "
            f"test {len(self.test_labels):,} images of {self.image_size[0]}x{self.image_size[1]}; "
            f"mean {self.mean:.4f} std {self.std:.4f}; from {self.source} ({self.location})"
            + (f"; {self.note}" if self.note else "")
        )


def _read_idx_folder(folder: Path, num_classes: int) -> tuple[np.ndarray, ...]:
    """The four arrays of `folder`, checked: pairs agree, labels < num_classes, 28x28, no empty split."""
    files = find_idx_files(folder)
    if files is None:
        missing = [c.path.name for c in verify_folder(folder, None) if c.detail == "missing"]
        raise UserError(
            f"{folder} does not hold the four IDX files; missing: {', '.join(missing)} "
            "(each may be gzipped or not)"
        )
    arrays = tuple(read_idx(files[s]) for s in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS))
    for split, images, labels in (("train", *arrays[:2]), ("test", *arrays[2:])):
        check_pair(images, labels, f"{folder}: {split}", num_classes)
        if images.shape[1:] != IMAGE_SIZE:
            size = "x".join(map(str, images.shape[1:]))
            raise UserError(f"{folder}: {split} images are {size}; mnistlab's models take 28x28 images")
        if len(images) == 0:
            raise UserError(f"{folder}: the {split} split holds no images")
    return arrays


def _identify(name: str | None, folder: Path) -> tuple[DatasetSpec | None, str]:
    """(the known dataset `folder` is, or None for custom; how that was decided) for --data-dir."""
    named = get_spec(name) if name and name != CUSTOM else None
    if find_idx_files(folder) is None:
        return None, ""  # _read_idx_folder names the missing files
    found = identify_folder(folder)
    if found is not None:
        if named is not None and named.name != found.name:
            raise UserError(
                f"{folder} holds {found.name} (every file matches its recorded sha256), not {named.name}; "
                f"use --dataset {found.name}, or leave --dataset out"
            )
        return found, f"verified as {found.name} by sha256"
    if named is None:
        return None, "custom dataset: no known dataset's sha256 matches; classes are the label numbers"
    if not named.is_idx:
        return None, f"custom dataset, not {named.name} (bundled, not IDX files); classes are the label numbers"
    bad = first_failed_check(folder, named)
    if bad is None:  # only possible by shape: an uncompressed copy, and no recorded hash of uncompressed data
        return named, f"taken as {named.name} by its IDX shapes (no recorded sha256 of uncompressed {named.name})"
    return None, (f"custom dataset, not verified as {named.name} ({bad.path.name}: {bad.detail}); "
                  "classes are the label numbers")


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Exact mean and std of uint8 pixels in [0, 1] units, from a 256-bin histogram.

    A histogram is exact and one fast pass over the bytes (40 ms for Fashion-MNIST); converting
    43M pixels to float64 first would cost 345 MB and a second.
    """
    counts = torch.bincount(images.reshape(-1), minlength=256).double().numpy()
    values = np.arange(256, dtype=np.float64) / 255.0
    n = counts.sum()
    mean = float((counts * values).sum() / n)
    var = float((counts * (values - mean) ** 2).sum() / n)
    return mean, var**0.5


def _file_hashes(folder: Path) -> dict[str, str]:
    files = find_idx_files(folder) or {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files.values()}


def _load_known(spec: DatasetSpec, offline: bool) -> tuple[str, Path, tuple[np.ndarray, ...], dict[str, str]]:
    """(where it was found, folder, its four arrays, sha256 of each file) of a known IDX dataset.

    From the decoded copy (data/decoded.py) when the folder `locate` would take holds files with the
    very digests that copy was made from; otherwise located, verified and read from the IDX files, and
    the decoded copy (re)written for the next run.
    """
    copy = decoded_dir(cache_root(), spec.name)
    present = first_with_files(spec)
    if present is not None:
        hashes = _file_hashes(present[1])  # {} unless all four files are there
        arrays = read_decoded(copy, hashes) if hashes else None
        if arrays is not None:
            return present[0], present[1], arrays, hashes
    source, folder = locate(spec, offline=offline)
    arrays = _read_idx_folder(folder, len(spec.classes))
    hashes = _file_hashes(folder)
    write_decoded(copy, hashes, arrays)
    return source, folder, arrays, hashes


def load_dataset(
    name: str | None = DEFAULT_DATASET,
    *,
    data_dir: str | Path | None = None,
    offline: bool = False,
    val_size: int | None = None,
) -> Dataset:
    """Resolve, verify and load a dataset by name, or the folder `data_dir`, into tensors.

    With `data_dir`, the folder is identified by its hashes (see the module docstring): `name` None
    takes whatever it holds (as does "custom"); a known `name` it is not, by hash, gives a custom
    dataset (or an error when it holds a different known dataset). Without `data_dir`, `name` None
    means mnist.
    """
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise UserError(f"--data-dir {folder}: no such folder")
        spec, note = _identify(name, folder)
        arrays = _read_idx_folder(folder, len(spec.classes) if spec is not None else MAX_CLASSES)
        source, location, hashes = "--data-dir", str(folder), _file_hashes(folder)
    else:
        if name == CUSTOM:
            raise UserError("dataset 'custom' is a folder of your own: give it with --data-dir DIR")
        spec, note = get_spec(name or DEFAULT_DATASET), ""
        if spec.name == "digits":
            from mnistlab.data.digits import load_digits_28

            arrays = load_digits_28()
            source, location, hashes = "scikit-learn", "sklearn.datasets.load_digits", {}
        else:
            source, folder, arrays, hashes = _load_known(spec, offline)
            location = str(folder)
    x_train, y_train, x_test, y_test = arrays
    if spec is not None:
        ds_name, classes = spec.name, spec.classes
    else:
        ds_name = CUSTOM
        classes = tuple(str(i) for i in range(max(int(y_train.max()), int(y_test.max())) + 1))

    n = len(y_train)
    val_size = default_val_size(n) if val_size is None else val_size
    if not 0 <= val_size < n:
        raise UserError(
            f"validation size {val_size} does not fit {ds_name} ({location}): its {n:,} training images allow "
            f"0 to {n - 1:,} (at least one image must be left to train on)"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    val_idx, train_idx = order[:val_size].sort().values, order[val_size:].sort().values
    images = torch.from_numpy(np.array(x_train, dtype=np.uint8))
    labels = torch.from_numpy(np.array(y_train, dtype=np.int64))
    train_images, train_labels = images[train_idx], labels[train_idx]

    mean, std = pixel_stats(train_images)
    return Dataset(
        name=ds_name,
        classes=classes,
        train_images=train_images,
        train_labels=train_labels,
        val_images=images[val_idx],
        val_labels=labels[val_idx],
        test_images=torch.from_numpy(np.array(x_test, dtype=np.uint8)),
        test_labels=torch.from_numpy(np.array(y_test, dtype=np.int64)),
        mean=mean,
        std=std,
        source=source,
        location=location,
        file_sha256=hashes,
        spec=spec,
        note=note,
    )
