"""Datasets by name: the real Fashion-MNIST from Debian's folder, bundled digits, --data-dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_arrays, spec_for, write_dataset

from mnistlab.cli import main
from mnistlab.data import registry
from mnistlab.data.dataset import VAL_SPLIT_SEED, load_dataset, pixel_stats
from mnistlab.data.registry import IDX_STEMS, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, get_spec
from mnistlab.data.resolve import candidate_dirs, locate
from mnistlab.errors import UserError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, one thread
needs_debian_fashion = pytest.mark.skipif(
    not (DEBIAN_FASHION / f"{TRAIN_IMAGES}.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.mark.slow  # reads and hashes the 47 MB Fashion-MNIST: seconds
@needs_debian_fashion
def test_fashion_mnist_from_debian_verifies_and_loads(capsys):
    assert main(["data", "verify", "fashion-mnist"]) == 0
    assert "4 of 4 files verified" in capsys.readouterr().out
    ds = load_dataset("fashion-mnist", offline=True)
    assert ds.source == "system"
    assert len(ds.train_labels) + len(ds.val_labels) == 60_000 and len(ds.val_labels) == 5_000
    assert ds.test_images.shape == (10_000, 28, 28) and ds.test_images.dtype == torch.uint8
    assert torch.bincount(ds.test_labels).tolist() == [1_000] * 10  # balanced, as published
    assert ds.classes[9] == "Ankle boot"
    assert 0.28 < ds.mean < 0.29 and 0.35 < ds.std < 0.36


def test_digits_loads_with_no_network():
    ds = load_dataset("digits", offline=True)
    assert len(ds.train_labels) + len(ds.val_labels) == 1_437 and len(ds.test_labels) == 360
    assert ds.train_images.shape[1:] == (28, 28) and ds.train_images.dtype == torch.uint8
    # the 20x20 digit sits inside a 4-pixel empty frame, like MNIST
    assert ds.train_images[:, :4].max() == 0 and ds.train_images[:, :, -4:].max() == 0
    assert ds.train_images.max() > 200
    assert sorted(torch.bincount(ds.test_labels).tolist())[0] >= 35  # stratified: 35 or 36 each


@pytest.mark.slow  # reads and hashes the 47 MB Fashion-MNIST: seconds
@needs_debian_fashion
def test_fashion_folder_given_as_data_dir_is_fashion_mnist_whatever_the_default_name():
    ds = load_dataset(None, data_dir=DEBIAN_FASHION)
    assert ds.name == "fashion-mnist" and ds.classes[0] == "T-shirt/top" and not ds.custom
    assert ds.mirror_symmetric and "verified as fashion-mnist" in ds.summary()
    with pytest.raises(UserError, match="holds fashion-mnist .*not mnist"):
        load_dataset("mnist", data_dir=DEBIAN_FASHION)


def test_validation_split_is_fixed_and_disjoint(idx_dir):
    a = load_dataset(None, data_dir=idx_dir, val_size=30)
    b = load_dataset(None, data_dir=idx_dir, val_size=30)
    assert torch.equal(a.val_images, b.val_images) and torch.equal(a.train_images, b.train_images)
    assert len(a.val_labels) == 30 and len(a.train_labels) == 170
    rows = {bytes(x.numpy()) for x in a.train_images}
    assert not any(bytes(x.numpy()) in rows for x in a.val_images)
    assert VAL_SPLIT_SEED == 12345  # changing it silently changes every reported val accuracy


def test_pixel_stats_match_direct_computation():
    x = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    mean, std = pixel_stats(x)
    ref = x.double() / 255
    assert mean == pytest.approx(ref.mean().item(), abs=1e-12)
    assert std == pytest.approx(ref.std(unbiased=False).item(), abs=1e-12)


def test_data_dir_reads_uncompressed_files(tmp_path):
    folder = write_dataset(tmp_path / "raw", make_arrays(n_train=120, n_test=30), gz=False)
    ds = load_dataset("fashion-mnist", data_dir=folder)
    assert len(ds.test_labels) == 30 and ds.source == "--data-dir"
    # synthetic bytes are not Fashion-MNIST's: not its clothing names, not its mirror symmetry
    assert ds.custom and ds.name == "custom" and ds.classes == tuple("0123456789")
    assert not ds.mirror_symmetric and "not verified as fashion-mnist" in ds.summary()


@pytest.mark.parametrize("gz", [True, False], ids=["archives", "uncompressed"])
def test_data_dir_of_a_known_dataset_is_identified_by_hash_without_a_name(tmp_path, monkeypatch, gz):
    arrays = make_arrays(seed=1)
    spec = spec_for(arrays, "tinyfashion", mirror_symmetric=True)
    monkeypatch.setitem(registry.DATASETS, spec.name, spec)
    ds = load_dataset(None, data_dir=write_dataset(tmp_path / "somewhere", arrays, gz=gz))
    assert ds.name == "tinyfashion" and ds.classes == spec.classes and ds.spec == spec
    assert not ds.custom and ds.mirror_symmetric
    assert "verified as tinyfashion by sha256" in ds.summary()


def test_data_dir_holding_another_known_dataset_is_refused_naming_what_it_holds(tmp_path, monkeypatch):
    arrays = make_arrays(seed=1)
    spec = spec_for(arrays, "tinyfashion")
    monkeypatch.setitem(registry.DATASETS, spec.name, spec)
    folder = write_dataset(tmp_path / "fashion", arrays)
    with pytest.raises(UserError, match=f"^{folder} holds tinyfashion .*not mnist; use --dataset tinyfashion"):
        load_dataset("mnist", data_dir=folder)
    assert load_dataset("tinyfashion", data_dir=folder).name == "tinyfashion"


def test_data_dir_of_unknown_data_is_custom_with_numbered_classes(idx_dir):
    ds = load_dataset(None, data_dir=idx_dir)
    assert ds.name == "custom" and ds.custom and ds.spec is None and not ds.mirror_symmetric
    assert ds.classes == tuple(str(i) for i in range(10)) and ds.num_classes == 10
    assert "no known dataset's sha256 matches" in ds.summary()
    named = load_dataset("mnist", data_dir=idx_dir)
    assert named.name == "custom" and named.custom
    assert "not verified as mnist (t10k-labels-idx1-ubyte.gz: sha256" in named.summary()


def test_custom_name_given_back_with_its_folder_loads_the_same_dataset(idx_dir):
    """A run records ds.name; resuming or evaluating it passes that name back with the same folder."""
    first = load_dataset(None, data_dir=idx_dir, val_size=20)
    again = load_dataset(first.name, data_dir=first.location, val_size=20)
    assert again.custom and again.classes == first.classes and torch.equal(again.val_images, first.val_images)
    with pytest.raises(UserError, match="^dataset 'custom' is a folder of your own: give it with --data-dir DIR$"):
        load_dataset("custom")


def test_custom_classes_run_to_the_largest_label_of_either_split(tmp_path):
    arrays = make_arrays()
    arrays[TEST_LABELS][3] = 255  # the largest an IDX label can be; absent from train
    ds = load_dataset(None, data_dir=write_dataset(tmp_path / "wide", arrays))
    assert ds.num_classes == 256 and ds.classes[-1] == "255"


def test_uncompressed_copy_of_a_dataset_without_raw_hashes_is_taken_by_shape(tmp_path, monkeypatch):
    """As `data verify` and the search folders take it: by exact IDX shapes, and the summary says so."""
    arrays = make_arrays(seed=2)
    spec = spec_for(arrays, "tinymnist", raw_hashes=False)
    monkeypatch.setitem(registry.DATASETS, spec.name, spec)
    folder = write_dataset(tmp_path / "unpacked", arrays, gz=False)
    ds = load_dataset("tinymnist", data_dir=folder)
    assert ds.name == "tinymnist" and not ds.custom and "by its IDX shapes" in ds.summary()
    assert load_dataset(None, data_dir=folder).custom  # unnamed, shapes identify nothing
    other = write_dataset(tmp_path / "fewer", make_arrays(n_train=150), gz=False)
    ds = load_dataset("tinymnist", data_dir=other)
    assert ds.custom and "(train-labels-idx1-ubyte: IDX 150, but the published file is 200)" in ds.summary()


@pytest.mark.parametrize("size", [14, 64])
def test_data_dir_images_not_28x28_are_refused(tmp_path, size):
    arrays = make_arrays()
    for stem in (TRAIN_IMAGES, TEST_IMAGES):
        arrays[stem] = np.zeros((len(arrays[stem]), size, size), np.uint8)
    folder = write_dataset(tmp_path / "big", arrays)
    with pytest.raises(UserError, match=f"^{folder}: train images are {size}x{size}; mnistlab's models take 28x28"):
        load_dataset(None, data_dir=folder)


@pytest.mark.parametrize("split", ["train", "test"])
def test_data_dir_with_an_empty_split_is_refused(tmp_path, split):
    arrays = make_arrays()
    images, labels = (TRAIN_IMAGES, TRAIN_LABELS) if split == "train" else (TEST_IMAGES, TEST_LABELS)
    arrays[images], arrays[labels] = arrays[images][:0], arrays[labels][:0]
    folder = write_dataset(tmp_path / "empty", arrays)
    with pytest.raises(UserError, match=f"^{folder}: the {split} split holds no images$"):
        load_dataset(None, data_dir=folder)


@pytest.mark.parametrize("val_size", [200, 500, -1])
def test_validation_size_that_does_not_fit_is_a_clear_error(idx_dir, val_size):
    with pytest.raises(UserError, match=f"^validation size {val_size} does not fit custom \\({idx_dir}\\): "
                                        "its 200 training images allow 0 to 199"):
        load_dataset(None, data_dir=idx_dir, val_size=val_size)
    assert len(load_dataset(None, data_dir=idx_dir, val_size=199).train_labels) == 1


def test_data_dir_with_no_name_and_missing_files_names_them(tmp_path):
    folder = write_dataset(tmp_path / "partial", {IDX_STEMS[0]: make_arrays()[IDX_STEMS[0]]})
    with pytest.raises(UserError, match="missing: train-labels-idx1-ubyte.gz, t10k-images"):
        load_dataset(None, data_dir=folder)


def test_data_dir_missing_file_names_it(tmp_path, idx_dir):
    (idx_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="missing: t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", data_dir=idx_dir)


def test_search_order_env_then_cache_then_system(tmp_path, monkeypatch, isolated_env):
    monkeypatch.setenv("MNISTLAB_DATA", str(tmp_path / "data"))
    labels = [label for label, _ in candidate_dirs(get_spec("fashion-mnist"))]
    assert labels == ["$MNISTLAB_DATA", "cache", "system"]


def test_damaged_user_folder_is_reported_not_overwritten(tmp_path, monkeypatch):
    folder = write_dataset(tmp_path / "data" / "kmnist", make_arrays())
    monkeypatch.setenv("MNISTLAB_DATA", str(tmp_path / "data"))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(UserError, match="damaged or missing"):
        locate(get_spec("kmnist"), offline=True)  # synthetic bytes do not match the KMNIST hashes
    assert before == {p.name: p.read_bytes() for p in folder.iterdir()}


def test_verify_exit_codes(tmp_path, idx_dir, capsys):
    assert main(["data", "verify", "mnist", "--data-dir", str(idx_dir)]) == 2  # hashes differ
    assert "FAIL" in capsys.readouterr().out
    assert main(["data", "verify", "digits"]) == 0


def test_offline_missing_dataset_names_the_choices(capsys):
    assert main(["data", "show", "kmnist", "--offline", "-o", "x.png"]) == 2
    err = capsys.readouterr().err
    for choice in ("--dataset digits", "apt-get install dataset-fashion-mnist", "--data-dir"):
        assert choice in err
    assert "Traceback" not in err


def test_unknown_dataset_is_exit_2(capsys):
    assert main(["data", "fetch", "cifar10"]) == 2
    assert "unknown dataset 'cifar10'" in capsys.readouterr().err


def test_data_list_says_what_is_present(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "not present" in out  # kmnist is never installed here


@pytest.mark.slow  # a figure of one axes per image: about 2 s on 2 cores
def test_data_show_saves_a_png(tmp_path, idx_dir):
    png = tmp_path / "grid.png"
    assert main(["data", "show", "mnist", "--data-dir", str(idx_dir), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bundled_digits_array_is_deterministic():
    from mnistlab.data.digits import load_digits_28

    a, b = load_digits_28(), load_digits_28()
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
