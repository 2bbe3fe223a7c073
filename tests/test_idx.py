"""The IDX reader: round trips, and a clear error for every way a file can be broken."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from conftest import make_arrays, spec_for, write_dataset

from mnistlab.cli import main
from mnistlab.data import registry
from mnistlab.data.dataset import load_dataset
from mnistlab.data.idx import IdxError, encode_idx, parse_idx, read_idx, write_idx
from mnistlab.data.registry import TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from mnistlab.errors import UserError


@pytest.mark.parametrize("name", ["x.gz", "x"])
@pytest.mark.parametrize("shape", [(7,), (5, 28, 28), (3, 4, 5, 6)])
def test_round_trip_gzipped_or_not(tmp_path, name, shape):
    a = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    write_idx(tmp_path / name, a)
    b = read_idx(tmp_path / name)
    assert b.dtype == np.uint8 and b.shape == shape and np.array_equal(a, b)


def test_gzip_data_without_gz_suffix_is_still_read(tmp_path):
    a = np.arange(10, dtype=np.uint8)
    (tmp_path / "labels").write_bytes(gzip.compress(encode_idx(a)))
    assert np.array_equal(read_idx(tmp_path / "labels"), a)


def _gz(tmp_path, data: bytes, name="f-idx1-ubyte.gz"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_truncated_gzip_is_reported(tmp_path):
    full = gzip.compress(encode_idx(np.zeros((100, 28, 28), np.uint8) + 7))
    with pytest.raises(IdxError, match="truncated gzip"):
        read_idx(_gz(tmp_path, full[: len(full) // 2]))


def test_html_page_saved_as_gz_is_reported(tmp_path):
    html = b"<!DOCTYPE html><html><body>404 Not Found</body></html>"
    with pytest.raises(IdxError, match="not a gzip file.*HTML"):
        read_idx(_gz(tmp_path, html))


def test_non_gzip_bytes_in_gz_file_are_reported(tmp_path):
    with pytest.raises(IdxError, match="not a gzip file.*starts with bytes"):
        read_idx(_gz(tmp_path, b"\x00\x01\x02\x03garbage"))


def test_wrong_magic_is_reported():
    bad = b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + b"abc"
    with pytest.raises(IdxError, match="wrong IDX magic"):
        parse_idx(bad, "labels")


def test_non_ubyte_type_code_is_reported():
    bad = b"\x00\x00\x0d\x01" + (1).to_bytes(4, "big") + b"abcd"
    with pytest.raises(IdxError, match="type code 0x0d"):
        parse_idx(bad)


@pytest.mark.parametrize("delta", [-1, 1])
def test_payload_length_must_match_header(delta):
    payload = encode_idx(np.zeros((4, 28, 28), np.uint8))
    bad = payload[:-1] if delta < 0 else payload + b"\x00"
    with pytest.raises(IdxError, match="declares shape"):
        parse_idx(bad)


def test_image_and_label_counts_must_agree(tmp_path):
    arrays = make_arrays()
    arrays[TRAIN_LABELS] = arrays[TRAIN_LABELS][:-3]
    folder = write_dataset(tmp_path / "d", arrays)
    with pytest.raises(UserError, match="200 images but 197 labels"):
        load_dataset("mnist", data_dir=folder)


def test_label_out_of_range_is_reported(tmp_path, monkeypatch):
    """A folder taken as a 10-class dataset (by shape: no hash can vouch for a changed label) must
    have labels 0..9; a custom folder's classes run to its largest label, so it has no such limit."""
    arrays = make_arrays()
    spec = spec_for(arrays, "tinymnist", raw_hashes=False)
    monkeypatch.setitem(registry.DATASETS, spec.name, spec)
    arrays[TEST_LABELS][0] = 42
    folder = write_dataset(tmp_path / "d", arrays, gz=False)
    with pytest.raises(UserError, match=f"^{folder}: test: label 42 is outside 0..9$"):
        load_dataset("tinymnist", data_dir=folder)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[: len(raw) // 2], "truncated gzip"),
        (lambda raw: b"<html><body>Service Unavailable</body></html>", "HTML"),
        (lambda raw: gzip.compress(b"\x00\x00\x08\x07" + raw[4:]), "declares shape"),
    ],
    ids=["truncated", "html", "bad-header"],
)
def test_cli_gives_message_and_exit_2_not_traceback(tmp_path, capsys, damage, message):
    folder = write_dataset(tmp_path / "d", make_arrays())
    target = folder / f"{TRAIN_IMAGES}.gz"
    target.write_bytes(damage(target.read_bytes()))
    code = main(["data", "show", "mnist", "--data-dir", str(folder), "-o", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "g.png").exists()


def test_gzip_idx_shape_reads_the_header_alone():
    import gzip

    from mnistlab.data.idx import gzip_idx_shape

    images = np.arange(5 * 28 * 28, dtype=np.uint8).reshape(5, 28, 28)
    raw = gzip.compress(encode_idx(images), mtime=0)
    assert gzip_idx_shape(raw, "x.gz") == (5, 28, 28)
    assert gzip_idx_shape(gzip.compress(encode_idx(np.zeros(7, np.uint8))), "y.gz") == (7,)
    with pytest.raises(IdxError, match="too short"):
        gzip_idx_shape(gzip.compress(b"\x00\x00"), "z.gz")
