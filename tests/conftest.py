"""Shared fixtures: an isolated cache and environment, and small synthetic IDX datasets."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from mnistlab.data.idx import encode_idx, write_idx
from mnistlab.data.registry import IDX_STEMS, DatasetSpec, FileSpec


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    """Every test gets its own empty cache and no user overrides of where data lives."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("MNISTLAB_DATA", raising=False)
    monkeypatch.delenv("MNISTLAB_MIRRORS", raising=False)
    return cache


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small-tensor tests (a second only waits on a shared 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quick_few(names: list[str], quick: set[str]) -> list:
    """Parametrize values: those in `quick` run in the quick loop, the others are marked slow (the default run has
    them all). For a check that costs seconds per model, where a few models show it works."""
    return [name if name in quick else pytest.param(name, marks=pytest.mark.slow) for name in names]


def make_arrays(n_train: int = 200, n_test: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    """Random 28x28 uint8 images with labels 0..9, keyed by the standard file stems."""
    rng = np.random.default_rng(seed)
    return {
        IDX_STEMS[0]: rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        IDX_STEMS[1]: (np.arange(n_train) % 10).astype(np.uint8),
        IDX_STEMS[2]: rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        IDX_STEMS[3]: (np.arange(n_test) % 10).astype(np.uint8),
    }


def write_dataset(folder: Path, arrays: dict[str, np.ndarray], gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        write_idx(folder / (f"{stem}.gz" if gz else stem), array)
    return folder


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    """A folder holding a small valid gzipped IDX dataset (200 train, 50 test)."""
    return write_dataset(tmp_path / "tiny", make_arrays())


@pytest.fixture
def untrained_run(tmp_path) -> Path:
    """A run folder holding an untrained MLP's checkpoint (step 3) for a small synthetic dataset in data/;
    no training, so the quick tests can predict, calibrate and switch runtimes."""
    import torch

    from mnistlab.checkpoint import CHECKPOINT, save_checkpoint
    from mnistlab.config import TrainConfig
    from mnistlab.models import create_model

    data = write_dataset(tmp_path / "data", make_arrays())
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    cfg = TrainConfig(dataset="custom", data_dir=str(data), val_size=50, model="mlp")
    meta = dict(model="mlp", model_kwargs={}, in_chans=1, num_classes=10, classes=list("0123456789"), mean=0.5,
                std=0.29, config=cfg.to_dict(), step=3)
    save_checkpoint(run / CHECKPOINT, create_model("mlp").eval(), meta)
    return run


def spec_for(arrays: dict[str, np.ndarray], name: str, *, raw_hashes: bool = True, **kwargs) -> DatasetSpec:
    """A registry entry whose recorded hashes are those of `arrays` as write_dataset writes them."""
    files = []
    for stem, array in arrays.items():
        raw = encode_idx(array)
        archive = gzip.compress(raw, mtime=0)
        files.append(FileSpec(stem, hashlib.sha256(archive).hexdigest(), len(archive),
                              hashlib.sha256(raw).hexdigest() if raw_hashes else None))
    kwargs.setdefault("classes", tuple(f"class {i}" for i in range(10)))
    return DatasetSpec(name=name, description="synthetic", source="tests", files=tuple(files),
                       train_count=len(arrays[IDX_STEMS[1]]), test_count=len(arrays[IDX_STEMS[3]]), **kwargs)


def train_digits(folder: Path, *flags: str) -> Path:
    """A finished run in folder/run of `mnistlab train --dataset digits --threads 1 FLAGS`, through the CLI."""
    from mnistlab.cli import main

    run = folder / "run"
    assert main(["train", "--dataset", "digits", "--threads", "1", *flags, "--run-dir", str(run)]) == 0
    return run
