"""The decoded copy of a known dataset (data/decoded.py): used only for the very source files it was made from,
and rebuilt when it or they change."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from conftest import make_arrays, spec_for, write_dataset

from mnistlab.data import dataset as dataset_module
from mnistlab.data import decoded, registry
from mnistlab.data.dataset import load_dataset
from mnistlab.data.decoded import MANIFEST, decoded_dir, read_decoded
from mnistlab.data.idx import encode_idx
from mnistlab.data.registry import IDX_STEMS, TRAIN_IMAGES, TRAIN_LABELS
from mnistlab.data.resolve import cache_root
from mnistlab.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, one thread
NAME = "tinyfashion"


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A known dataset (registry entry with its hashes) in a $MNISTLAB_DATA folder; returns (arrays, folder)."""
    arrays = make_arrays(seed=3)
    monkeypatch.setitem(registry.DATASETS, NAME, spec_for(arrays, NAME))
    monkeypatch.setenv("MNISTLAB_DATA", str(tmp_path / "data"))
    return arrays, write_dataset(tmp_path / "data" / NAME, arrays)


def copy_folder():
    return decoded_dir(cache_root(), NAME)


def count_idx_reads(monkeypatch) -> list[int]:
    """Count the reads of the IDX files themselves (what the decoded copy saves)."""
    calls = [0]
    real = dataset_module._read_idx_folder

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "_read_idx_folder", counting)
    return calls


def same_data(ds, arrays) -> bool:
    train = np.concatenate([ds.train_images.numpy(), ds.val_images.numpy()])
    return (sorted(map(bytes, train)) == sorted(map(bytes, arrays[TRAIN_IMAGES]))
            and np.array_equal(ds.test_images.numpy(), arrays[IDX_STEMS[2]]))


def test_first_load_writes_the_copy_and_the_next_reads_it_instead_of_the_idx_files(tiny, monkeypatch):
    arrays, _ = tiny
    reads = count_idx_reads(monkeypatch)
    first = load_dataset(NAME)
    assert reads[0] == 1 and (copy_folder() / MANIFEST).is_file()
    second = load_dataset(NAME)
    assert reads[0] == 1  # not read again
    assert same_data(second, arrays)
    for a, b in ((first.train_images, second.train_images), (first.val_labels, second.val_labels),
                 (first.test_labels, second.test_labels)):
        assert np.array_equal(a.numpy(), b.numpy())
    assert (first.mean, first.std, first.file_sha256, first.source) == (second.mean, second.std,
                                                                          second.file_sha256, second.source)
    assert second.train_images.numpy().flags.writeable  # a copy, not the read-only memory map


def test_a_changed_source_file_is_verified_again_and_refused_when_damaged(tiny, monkeypatch):
    arrays, folder = tiny
    load_dataset(NAME)
    labels = arrays[TRAIN_LABELS].copy()
    labels[0] = (labels[0] + 1) % 10  # one label changed: no longer the registry's file
    (folder / f"{TRAIN_LABELS}.gz").write_bytes(gzip.compress(encode_idx(labels), mtime=0))
    with pytest.raises(UserError, match="damaged or missing"):
        load_dataset(NAME)  # the copy is keyed by the old digest: not used, the files are verified again


def test_a_source_file_recompressed_to_the_same_data_rebuilds_the_copy(tiny, monkeypatch):
    arrays, folder = tiny
    load_dataset(NAME)
    before = json.loads((copy_folder() / MANIFEST).read_text())["source_sha256"]
    # the same uncompressed payload in other gzip bytes (as Debian ships Fashion-MNIST): verified by its raw hash
    (folder / f"{TRAIN_IMAGES}.gz").write_bytes(gzip.compress(encode_idx(arrays[TRAIN_IMAGES]), 1, mtime=0))
    reads = count_idx_reads(monkeypatch)
    ds = load_dataset(NAME)
    after = json.loads((copy_folder() / MANIFEST).read_text())["source_sha256"]
    assert reads[0] == 1 and after != before and same_data(ds, arrays)
    load_dataset(NAME)
    assert reads[0] == 1  # the rebuilt copy is used


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "manifest", "shape", "object array"])
def test_a_damaged_copy_is_detected_and_rebuilt(tiny, monkeypatch, damage):
    arrays, _ = tiny
    load_dataset(NAME)
    npy = copy_folder() / f"{TRAIN_IMAGES}.npy"
    if damage == "flip a byte":
        raw = bytearray(npy.read_bytes())
        raw[-1] ^= 0xFF
        npy.write_bytes(bytes(raw))
    elif damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:1000])
    elif damage == "manifest":
        (copy_folder() / MANIFEST).write_text("{not json")
    elif damage == "shape":  # right bytes, other shape
        np.save(npy, arrays[TRAIN_IMAGES].reshape(-1, 28 * 28))
    else:  # an object array needs pickle to load: refused, never unpickled
        np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    hashes = dataset_module._file_hashes(tiny[1])
    assert read_decoded(copy_folder(), hashes) is None
    reads = count_idx_reads(monkeypatch)
    ds = load_dataset(NAME)
    assert reads[0] == 1 and same_data(ds, arrays)
    assert read_decoded(copy_folder(), hashes) is not None  # rebuilt


def test_a_copy_that_cannot_be_written_leaves_the_run_going(tiny, monkeypatch):
    arrays, _ = tiny

    def full_disk(path, data):
        raise UserError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(decoded, "atomic_write_bytes", full_disk)
    assert same_data(load_dataset(NAME), arrays)
    assert not (copy_folder() / MANIFEST).exists()


def test_a_folder_with_a_missing_file_is_not_served_from_the_copy(tiny):
    _, folder = tiny
    load_dataset(NAME)
    (folder / f"{TRAIN_LABELS}.gz").unlink()
    with pytest.raises(UserError, match="damaged or missing"):
        load_dataset(NAME, offline=True)
