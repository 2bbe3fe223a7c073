"""The IDX reader: round trips, and a clear error for every way a file can be broken."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from conftest import make_arrays, spec_for, write_dataset

from mnistlab.cli import main
from mnistlab.data import registry
from mnistlab.data.dataset import load_dataset
from mnistlab.data.idx import (
    IdxError,
    check_pair,
    decompress_if_gzip,
    encode_idx,
    gzip_idx_shape,
    parse_idx,
    read_idx,
    write_idx,
)
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


# ---- every boundary and error path of idx.py, checked directly (quick) ---------------------------------

def test_encode_idx_writes_the_magic_the_dimensions_and_the_bytes_in_c_order():
    a = np.arange(6, dtype=np.int64).reshape(2, 3)  # any integer array of byte values is stored as ubyte
    assert encode_idx(a) == b"\x00\x00\x08\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6))


def test_write_idx_gzips_only_a_gz_name_and_the_same_array_gives_the_same_bytes(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "plain", a)
    write_idx(tmp_path / "a.gz", a)
    write_idx(tmp_path / "b.gz", a)
    assert (tmp_path / "plain").read_bytes() == encode_idx(a)
    assert gzip.decompress((tmp_path / "a.gz").read_bytes()) == encode_idx(a)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()  # no timestamp inside


def test_a_file_that_cannot_be_read_is_one_clear_error(tmp_path):
    with pytest.raises(IdxError, match=r"missing: cannot read \(No such file or directory\)$"):
        read_idx(tmp_path / "missing")


def test_plain_bytes_under_a_name_without_gz_are_returned_as_they_are():
    assert decompress_if_gzip(b"\x00\x00\x08\x01", "labels") == b"\x00\x00\x08\x01"


def test_gzip_magic_followed_by_garbage_is_corrupt_not_truncated():
    with pytest.raises(IdxError, match=r"^x.gz: corrupt gzip data \("):
        decompress_if_gzip(b"\x1f\x8b" + b"\xff" * 30, "x.gz")
    with pytest.raises(IdxError, match=r"^x.gz: corrupt gzip data \("):
        gzip_idx_shape(b"\x1f\x8b" + b"\xff" * 30, "x.gz")


def test_a_truncated_gzip_says_the_copy_was_cut_short():
    full = gzip.compress(encode_idx(np.zeros(1000, np.uint8) + 3))
    with pytest.raises(IdxError, match=r"^x: truncated gzip file \(the download or copy was cut short\)$"):
        decompress_if_gzip(full[:-8], "x")


@pytest.mark.parametrize("start", [b"  <!DOCTYPE html>", b"<HTML><body>", b"<?xml version='1.0'?>", b"\n<head>",
                                   b"<body>"])
def test_a_web_page_in_place_of_the_data_is_named_as_one(start):
    with pytest.raises(IdxError, match=r"^x.gz: not a gzip file: it looks like an HTML/XML page \(an error page"):
        decompress_if_gzip(start + b" 404", "x.gz")


def test_an_empty_gz_file_is_said_to_be_empty():
    with pytest.raises(IdxError, match=r"^x.gz: not a gzip file: it is empty$"):
        decompress_if_gzip(b"", "x.gz")


def test_other_bytes_are_shown_as_their_first_eight_in_hex():
    with pytest.raises(IdxError, match=r"it starts with bytes 00 01 02 03 04 05 06 07$"):
        decompress_if_gzip(bytes(range(12)), "x.gz")


@pytest.mark.parametrize("payload, message", [
    (b"\x00\x00\x08", r"^f: too short to be an IDX file \(3 bytes\)$"),
    (b"\x00\x00\x08\x00", r"^f: wrong IDX magic number 0x00000800 \(expected 0x00000801 for labels or 0x00000803 "
                          r"for images\); it starts with bytes 00 00 08 00$"),
    (b"\x00\x01\x08\x01" + bytes(5), r"^f: wrong IDX magic number 0x00010801 "),
    (b"\x01\x00\x08\x01" + bytes(5), r"^f: wrong IDX magic number 0x01000801 "),
    (b"\x00\x00\x09\x01" + bytes(5), r"^f: IDX type code 0x09 is not unsigned byte \(0x08\)$"),
    (b"\x00\x00\x08\x03" + bytes(11), r"^f: IDX header cut short$"),
], ids=["3-bytes", "no-dimensions", "second-byte", "first-byte", "type", "header"])
def test_each_broken_header_is_named(payload, message):
    with pytest.raises(IdxError, match=message):
        parse_idx(payload, "f")


def test_a_header_that_ends_exactly_at_the_files_end_declares_an_empty_array():
    empty = parse_idx(b"\x00\x00\x08\x01" + bytes(4), "f")
    assert empty.shape == (0,) and empty.dtype == np.uint8


def test_the_length_error_gives_the_declared_shape_and_both_byte_counts():
    payload = encode_idx(np.zeros((2, 3), np.uint8))
    expected = r"^f: IDX header declares shape \(2, 3\) \(18 bytes\) but the file holds 19 bytes$"
    with pytest.raises(IdxError, match=expected):
        parse_idx(payload + b"\x00", "f")


def test_gzip_idx_shape_reads_a_header_of_255_dimensions_and_checks_its_magic():
    header = b"\x00\x00\x08\xff" + (1).to_bytes(4, "big") * 255  # the longest header IDX allows, no data
    assert gzip_idx_shape(gzip.compress(header), "x.gz") == (1,) * 255
    with pytest.raises(IdxError, match="type code 0x0d"):
        gzip_idx_shape(gzip.compress(b"\x00\x00\x0d\x01" + bytes(4)), "x.gz")


def pair(labels, images_shape=None):
    labels = np.asarray(labels, np.uint8)
    return np.zeros(images_shape or (len(labels), 28, 28), np.uint8), labels


@pytest.mark.parametrize("largest, ok", [(9, True), (10, False)])
def test_a_label_equal_to_the_class_count_is_out_of_range(largest, ok):
    images, labels = pair([0, largest, 3])
    if ok:
        check_pair(images, labels, "train")
    else:
        with pytest.raises(IdxError, match=r"^train: label 10 is outside 0..9$"):
            check_pair(images, labels, "train")


def test_the_class_count_is_the_callers():
    check_pair(*pair([0, 41]), "t", num_classes=42)
    with pytest.raises(IdxError, match=r"^t: label 42 is outside 0..41$"):
        check_pair(*pair([0, 42]), "t", num_classes=42)


def test_an_empty_pair_is_consistent():
    check_pair(*pair([]), "t")


@pytest.mark.parametrize("images_shape, labels_shape, message", [
    ((3, 784), (3,), r"^t: images must be 3-D \(N, H, W\), got shape \(3, 784\)$"),
    ((3, 28, 28), (3, 1), r"^t: labels must be 1-D \(N,\), got shape \(3, 1\)$"),
    ((3, 28, 28), (4,), r"^t: 3 images but 4 labels: the counts must agree$"),
])
def test_a_pair_whose_shapes_do_not_belong_together_is_refused(images_shape, labels_shape, message):
    with pytest.raises(IdxError, match=message):
        check_pair(np.zeros(images_shape, np.uint8), np.zeros(labels_shape, np.uint8), "t")


def test_idx_errors_are_user_errors():
    assert issubclass(IdxError, UserError)
