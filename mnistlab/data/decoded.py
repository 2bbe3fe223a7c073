"""A verified, decoded copy of a known dataset: its four uint8 arrays as .npy files, read memory-mapped.

Why: loading Fashion-MNIST from its .gz files means inflating 31 MB into 55 MB twice (once to verify the
uncompressed data against the registry's sha256, once to read it) and hashing it: about a second on each
`mnistlab train`, a tenth of `--recipe fast`'s training. The decoded arrays are written once, after that
verification, and later runs read them instead (measured in docs/experiments.md).

Why it can be trusted:
  - it is keyed by the sha256 of each source file as it is on disk (the bytes that were verified when
    the copy was made). A source file replaced or changed has another digest: the copy is not used,
    the files are verified again and the copy rebuilt. The source files are hashed on every load
    (a few tens of milliseconds), never inflated.
  - each array's sha256, shape and dtype are recorded in manifest.json; an array whose bytes, shape or
    dtype differ (a damaged or half-replaced copy) is not used, and the copy is rebuilt.
  - .npy files are read with allow_pickle=False: plain arrays only, never Python objects.
  - every file is written atomically (files.atomic_write_bytes), the manifest last: a run killed while
    writing leaves either the previous copy or one the manifest does not describe, which is rebuilt.

Layout: <cache root>/decoded/<dataset>/manifest.json and <stem>.npy for each of the four IDX files.
A copy that cannot be written (a read-only cache folder, a full disk) is skipped: the run goes on from
the source files.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from mnistlab.data.registry import IDX_STEMS
from mnistlab.errors import UserError
from mnistlab.files import atomic_write_bytes, write_json

FORMAT = 1
MANIFEST = "manifest.json"


def decoded_dir(cache: Path, dataset: str) -> Path:
    """Where the decoded copy of `dataset` lives, under the data cache folder `cache`."""
    return cache / "decoded" / dataset


def _array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


def read_decoded(folder: Path, source_sha256: dict[str, str]) -> tuple[np.ndarray, ...] | None:
    """The four arrays (train images, train labels, test images, test labels) of the copy in `folder`, made
    from source files with exactly these digests; None when there is no such copy or any check fails."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != FORMAT or manifest.get("source_sha256") != source_sha256:
            return None
        arrays = []
        for stem in IDX_STEMS:
            want = manifest["arrays"][stem]
            # mmap: the pages are read once, by the hash below, and then by the copy the loader makes
            array = np.load(folder / f"{stem}.npy", mmap_mode="r", allow_pickle=False)
            if (array.dtype != np.uint8 or list(array.shape) != want["shape"]
                    or _array_sha256(array) != want["sha256"]):
                return None
            arrays.append(array)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # missing, unreadable or malformed: the caller verifies the sources and rebuilds
    return tuple(arrays)


def write_decoded(folder: Path, source_sha256: dict[str, str], arrays: tuple[np.ndarray, ...]) -> bool:
    """Store the verified `arrays` (in IDX_STEMS order) decoded from source files with these digests; False
    when the folder cannot be written (the run goes on without a copy)."""
    record = {}
    try:
        for stem, array in zip(IDX_STEMS, arrays, strict=True):
            array = np.ascontiguousarray(array, dtype=np.uint8)
            buf = io.BytesIO()
            np.save(buf, array, allow_pickle=False)
            atomic_write_bytes(folder / f"{stem}.npy", buf.getvalue())
            record[stem] = dict(shape=list(array.shape), sha256=_array_sha256(array))
        write_json(folder / MANIFEST, dict(format=FORMAT, source_sha256=source_sha256, arrays=record))
    except UserError:  # files.py's one-line disk errors: a cache is an optimisation, never a reason to stop
        return False
    return True
