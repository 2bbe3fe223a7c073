"""Where a dataset is found: first hit wins, then a verified download.

Order: --data-dir; $MNISTLAB_DATA/<name>; the cache ~/.cache/mnistlab/<name> (or
$XDG_CACHE_HOME/mnistlab/<name>); system folders such as /usr/share/datasets/<name> (Debian's
dataset-fashion-mnist installs there); then a download into the cache, unless offline.

A --data-dir folder is not searched for by name but identified by its content: `identify_folder`
names the known dataset whose recorded hashes every one of its files matches, if any.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mnistlab.data.download import download_file, mirrors_for
from mnistlab.data.idx import IdxError, decompress_if_gzip, gzip_idx_shape, parse_idx
from mnistlab.data.registry import (
    DATASETS,
    IDX_STEMS,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    DatasetSpec,
    FileSpec,
)
from mnistlab.errors import UserError

DATA_ENV = "MNISTLAB_DATA"
IMAGE_SIZE = (28, 28)  # every dataset in the registry, and what mnistlab's models take


class DatasetNotFound(UserError):
    """The dataset is nowhere on disk and may not be downloaded."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mnistlab"


def candidate_dirs(spec: DatasetSpec) -> list[tuple[str, Path]]:
    """The folders searched for `spec`, in order, each with a short label."""
    dirs: list[tuple[str, Path]] = []
    if os.environ.get(DATA_ENV):
        dirs.append((f"${DATA_ENV}", Path(os.environ[DATA_ENV]) / spec.name))
    dirs.append(("cache", cache_root() / spec.name))
    dirs.extend(("system", Path(d)) for d in spec.system_dirs)
    return dirs


def find_idx_files(folder: Path) -> dict[str, Path] | None:
    """Map each standard stem to its file in `folder` (`.gz` preferred); None if any is missing."""
    found: dict[str, Path] = {}
    for stem in IDX_STEMS:
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                found[stem] = folder / name
                break
        else:
            return None
    return found


@dataclass
class FileCheck:
    path: Path
    ok: bool
    detail: str  # what was checked, or what is wrong
    hashed: bool = False  # ok because its sha256 matched a recorded one (not by its header alone)


def check_file(path: Path, spec: FileSpec | None, shape: tuple[int, ...] | None = None) -> FileCheck:
    """Verify one file: its hash against the known ones (when any), then its gzip and IDX header.

    `shape` is the shape the dataset's file has; it is checked where no hash can be (an uncompressed
    copy of a dataset that has no recorded hash of its uncompressed data).
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        return FileCheck(path, False, f"cannot read ({e.strerror})")
    digest = hashlib.sha256(raw).hexdigest()
    hashed = spec is not None and digest == spec.gz_sha256
    try:
        if hashed:  # the published bytes: only the header is read (inflating all of it took ~0.1 s a file)
            shape_text = "x".join(map(str, gzip_idx_shape(raw, path.name)))
            return FileCheck(path, True, f"sha256 matches the published archive; IDX {shape_text}", hashed=True)
        payload = decompress_if_gzip(raw, path.name)
        array = parse_idx(payload, path.name)
    except IdxError as e:
        return FileCheck(path, False, str(e))
    shape_text = "x".join(map(str, array.shape))
    if spec is None:
        return FileCheck(path, True, f"IDX header ok ({shape_text}); no known hash for a custom folder")
    if spec.raw_sha256 is not None:
        if hashlib.sha256(payload).hexdigest() == spec.raw_sha256:
            return FileCheck(path, True, f"sha256 of the uncompressed data matches; IDX {shape_text}", hashed=True)
        return FileCheck(path, False, "sha256 matches neither the published archive nor its uncompressed data")
    if payload is not raw:  # a .gz that is not the published archive and no raw hash to fall back on
        return FileCheck(path, False, f"sha256 {digest[:16]}... does not match the published archive")
    if shape is not None and array.shape != shape:
        expected = "x".join(map(str, shape))
        return FileCheck(path, False, f"IDX {shape_text}, but the published file is {expected}")
    return FileCheck(path, True, f"IDX header and shape ok ({shape_text}); no published hash for the uncompressed file")


def expected_shapes(spec: DatasetSpec) -> dict[str, tuple[int, ...]]:
    """The IDX shape of each of the four files of `spec`, by stem."""
    return {
        TRAIN_IMAGES: (spec.train_count, *IMAGE_SIZE),
        TRAIN_LABELS: (spec.train_count,),
        TEST_IMAGES: (spec.test_count, *IMAGE_SIZE),
        TEST_LABELS: (spec.test_count,),
    }


def verify_folder(folder: Path, spec: DatasetSpec | None) -> list[FileCheck]:
    """Check every standard file in `folder`; a missing file is a failed check."""
    by_stem = {f.stem: f for f in spec.files} if spec else {}
    shapes = expected_shapes(spec) if spec else {}
    checks = []
    for stem in IDX_STEMS:
        path = next((folder / n for n in (f"{stem}.gz", stem) if (folder / n).is_file()), None)
        if path is None:
            checks.append(FileCheck(folder / f"{stem}.gz", False, "missing"))
        else:
            checks.append(check_file(path, by_stem.get(stem), shapes.get(stem)))
    return checks


def _checks_smallest_first(files: dict[str, Path], spec: DatasetSpec) -> Iterator[FileCheck]:
    shapes = expected_shapes(spec)
    for f in sorted(spec.files, key=lambda f: f.size):  # the label files first: a mismatch costs kilobytes
        yield check_file(files[f.stem], f, shapes[f.stem])


def identify_folder(folder: Path) -> DatasetSpec | None:
    """The known dataset whose recorded sha256 (of the archive or of its uncompressed data) every file
    in `folder` matches, or None.

    A header that merely looks right identifies nothing: an uncompressed MNIST and an uncompressed
    KMNIST have the same shapes. Each dataset is tried smallest file first and dropped at its first
    mismatch, so a folder of unknown data costs a few label files, not every file against every hash.
    """
    files = find_idx_files(folder)
    if files is None:
        return None
    for spec in DATASETS.values():
        if spec.is_idx and all(c.hashed for c in _checks_smallest_first(files, spec)):
            return spec
    return None


def first_failed_check(folder: Path, spec: DatasetSpec) -> FileCheck | None:
    """The first file of `folder` (smallest first) that fails verification as `spec`, or None if all pass."""
    files = find_idx_files(folder)
    if files is None:
        return next(c for c in verify_folder(folder, spec) if not c.ok)
    return next((c for c in _checks_smallest_first(files, spec) if not c.ok), None)


def offline_help(name: str) -> str:
    return (
        f"dataset {name!r} is not on this machine and --offline forbids a download. Offline choices:\n"
        "  --dataset digits                      (bundled with scikit-learn, needs no download)\n"
        "  apt-get install dataset-fashion-mnist (then --dataset fashion-mnist)\n"
        "  --data-dir DIR                        (any folder with the four IDX files, .gz or not)"
    )


def find_present(spec: DatasetSpec) -> tuple[str, Path] | None:
    """The first searched folder that holds all four files (unverified), or None."""
    for label, folder in candidate_dirs(spec):
        if find_idx_files(folder) is not None:
            return label, folder
    return None


def first_with_files(spec: DatasetSpec) -> tuple[str, Path] | None:
    """The first searched folder holding any of the four files (unverified): the one `locate` takes."""
    for label, folder in candidate_dirs(spec):
        if any((folder / n).is_file() for s in IDX_STEMS for n in (s, f"{s}.gz")):
            return label, folder
    return None


def locate(spec: DatasetSpec, *, offline: bool = False) -> tuple[str, Path]:
    """Find `spec` on disk or download it; return (label of where it was found, folder).

    A cache folder whose files fail verification is fetched again (a half-written or corrupted
    file); a bad file in a folder the user or the system owns is reported, never overwritten.
    """
    present = first_with_files(spec)
    if present is not None:
        label, folder = present
        bad = [c for c in verify_folder(folder, spec) if not c.ok]
        if not bad:
            return label, folder
        problems = "\n  ".join(f"{c.path.name}: {c.detail}" for c in bad)
        if label != "cache":
            raise UserError(f"{spec.name}: {folder} holds damaged or missing files:\n  {problems}")
        if offline:
            raise DatasetNotFound(
                f"{spec.name}: the cached copy in {folder} is damaged:\n  {problems}\n"
                + offline_help(spec.name)
            )
        for c in bad:
            c.path.unlink(missing_ok=True)
        stems = [c.path.name.removesuffix(".gz") for c in bad]
        fetch(spec, folder, only=stems)
        return "downloaded", folder
    if offline:
        raise DatasetNotFound(offline_help(spec.name))
    folder = cache_root() / spec.name
    fetch(spec, folder)
    return "downloaded", folder


def fetch(spec: DatasetSpec, folder: Path, only: list[str] | None = None, **kwargs) -> Path:
    """Download the files of `spec` (or only the stems listed) into `folder`, verified."""
    mirrors = mirrors_for(spec.mirrors)
    failed: set[str] = set()  # mirrors that failed a file go last for the rest: a dead one costs its timeouts once
    for f in spec.files:
        if only is not None and f.stem not in only:
            continue
        print(f"downloading {spec.name}/{f.stem}.gz (~{f.size / 1e6:.1f} MB)", file=sys.stderr)
        order = [m for m in mirrors if m not in failed] + [m for m in mirrors if m in failed]
        download_file(f, folder, order, failed_mirrors=failed, **kwargs)
    return folder
