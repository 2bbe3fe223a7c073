"""Pre-training and the few-label flags: pre-training reads no label and no test image, and its validation
images never reach the weights; it resumes bit-identically after SIGKILL; --init loads the encoder and
refuses another architecture in one line; --freeze-encoder trains the head alone; --labels-per-class
draws K per class, seeded and recorded; a fine-tuned run is reproduced from its folder's config.json.
(The masking lab runs in test_labs.py, with every lab.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mnistlab import pretrain as pretrain_module
from mnistlab.cli import main
from mnistlab.config import TrainConfig
from mnistlab.data.dataset import load_dataset
from mnistlab.data.subset import stratified_subset, with_labelled_subset
from mnistlab.models import create_model
from mnistlab.training import load_pretrained_encoder, train

# A tiny encoder on the bundled digits (1,294 training images: 11 steps of 128 an epoch), one thread.
TINY_VIT = ["--model-arg", "dim=32", "--model-arg", "depth=1", "--model-arg", "heads=2"]
TINY_KWARGS = dict(dim=32, depth=1, heads=2)
PRETRAIN = ["pretrain", "--dataset", "digits", "--batch-size", "128", "--threads", "1", "--epochs", "2",
            "--decoder-dim", "32", "--decoder-heads", "2", *TINY_VIT]
FINETUNE = ["train", "--dataset", "digits", "--model", "vit", *TINY_VIT, "--batch-size", "64", "--threads", "1"]


def tensors(run: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(run / "checkpoint.safetensors").items() if k.startswith(prefix)}


def losses(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in records]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A finished two-epoch pre-training run (in this process)."""
    run = tmp_path_factory.mktemp("pretrain") / "run"
    assert main([*PRETRAIN, "--run-dir", str(run)]) == 0
    return run


class LabelFreeDataset:
    """The real digits dataset, except that its labels and test split raise when touched, and its validation
    images are replaced by other ones."""

    FORBIDDEN = {"train_labels", "val_labels", "test_images", "test_labels", "split", "summary", "num_classes"}

    def __init__(self, ds, val_images: torch.Tensor) -> None:
        self._ds, self.val_images = ds, val_images

    def __getattr__(self, name: str):
        if name in self.FORBIDDEN:
            raise AssertionError(f"pre-training read the dataset's {name}")
        return getattr(self._ds, name)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, pretrained) -> Path:
    """The same pre-training as `pretrained`, on a dataset whose labels and test split raise when read and whose
    validation images are the real ones inverted."""
    run = tmp_path_factory.mktemp("guarded") / "run"
    real = load_dataset("digits")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain_module, "load_dataset", lambda *a, **k: LabelFreeDataset(real, 255 - real.val_images))
        assert main([*PRETRAIN, "--run-dir", str(run)]) == 0
    return run


@pytest.mark.slow  # pre-trains (the pretrained fixture)
def test_pretraining_reads_no_label_and_no_test_image(guarded):
    assert json.loads((guarded / "results.json").read_text())["steps"] == 22  # it ran to the end, never touching them


@pytest.mark.slow  # pre-trains (the pretrained fixture)
def test_validation_images_reach_the_loss_curve_but_never_the_weights(guarded, pretrained):
    ours, theirs = tensors(guarded), tensors(pretrained)
    assert ours.keys() == theirs.keys()
    for k in ours:  # weights and optimizer state alike
        assert torch.equal(ours[k], theirs[k]), k
    val_a, val_b = ([r["val_loss"] for r in losses(run)] for run in (guarded, pretrained))
    assert all(a != b for a, b in zip(val_a, val_b, strict=True))  # the other images were evaluated


@pytest.mark.slow  # pre-trains (the pretrained fixture)
def test_pretraining_writes_a_run_folder_with_reconstruction_figures(pretrained):
    names = {p.name for p in pretrained.iterdir()}
    assert {"config.json", "env.json", "metrics.jsonl", "checkpoint.safetensors", "results.json",
            "reconstruction_loss.png"} <= names
    figures = sorted(p.name for p in (pretrained / "reconstructions").iterdir())
    assert figures == ["epoch_001.png", "epoch_002.png"]
    records = losses(pretrained)
    assert [r["epoch"] for r in records] == [1, 2] and "val_accuracy" not in records[0]
    assert records[1]["val_loss"] < records[0]["val_loss"] < 1.0  # below the no-image guess (a patch's mean)


@pytest.mark.slow  # starts processes that pre-train
def test_pretraining_resumes_after_sigkill_mid_epoch_bit_identically(tmp_path, pretrained):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mnistlab", *PRETRAIN, "--run-dir", str(run)]
    killed = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MNISTLAB_TEST_KILL="step:15"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert json.loads((run / "env.json").read_text())["torch_threads"] == 1
    resumed = subprocess.run([sys.executable, "-m", "mnistlab", "pretrain", "--resume", str(run)],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "step 11/22" in resumed.stderr  # from epoch 1's checkpoint, mid-run
    ours, theirs = tensors(run), tensors(pretrained)
    assert ours.keys() == theirs.keys() and any(k.startswith("optim/") for k in ours)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), f"{k} differs"
    assert losses(run) == losses(pretrained)


@pytest.mark.slow  # pre-trains (the pretrained fixture)
def test_init_loads_every_encoder_weight_into_the_zoo_vit(pretrained):
    model = create_model("vit", num_classes=10, **TINY_KWARGS)
    head = model.head.weight.clone()
    cfg = TrainConfig(model="vit", model_kwargs=TINY_KWARGS, init=str(pretrained))
    info = load_pretrained_encoder(model, cfg, "digits")
    encoder = tensors(pretrained, "model/encoder.")
    loaded = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert len(loaded) == len(encoder) > 5
    for k, v in loaded.items():
        assert torch.equal(v, encoder[f"model/encoder.{k}"]), k
    assert torch.equal(model.head.weight, head)  # the head is the fine-tuning's
    assert info["init_payload_sha256"] and info["init_method"] == "mae"


@pytest.mark.slow  # pre-trains (the pretrained fixture)
@pytest.mark.parametrize("flags, says", [
    (["--model", "vit", "--model-arg", "dim=48", "--model-arg", "depth=1", "--model-arg", "heads=2"],
     "pos_embed is (1, 16, 32) there, (1, 16, 48) here"),
    (["--model", "vit", "--model-arg", "depth=2", "--model-arg", "heads=2", "--model-arg", "dim=32"],
     "blocks.1."),
    (["--model", "cnn"], "its encoder is vit"),
])
def test_init_refuses_another_architecture_in_one_line(pretrained, tmp_path, capsys, flags, says):
    args = ["train", "--dataset", "digits", *flags, "--init", str(pretrained), "--threads", "1",
            "--run-dir", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mnistlab: error: --init") and says in err, err
    assert "give the pre-training's --model and --model-arg values" in err


@pytest.mark.slow  # pre-trains (the pretrained fixture)
def test_freeze_encoder_trains_the_head_alone(pretrained, tmp_path):
    run = tmp_path / "probe"
    assert main([*FINETUNE, "--init", str(pretrained), "--freeze-encoder", "--lr", "0.01", "--labels-per-class", "5",
                 "--epochs", "2", "--run-dir", str(run)]) == 0
    after, before = tensors(run, "model/"), tensors(pretrained, "model/encoder.")
    for k, v in after.items():
        if not k.startswith("model/head."):
            assert torch.equal(v, before[k.replace("model/", "model/encoder.", 1)]), f"{k} moved"
    torch.manual_seed(0)  # the head as TorchEngine initialised it (seed 0)
    fresh = create_model("vit", num_classes=10, **TINY_KWARGS)
    assert not torch.equal(after["model/head.weight"], fresh.head.weight)  # and the head did learn
    optimised = {k.split("/")[1] for k in tensors(run, "optim/")}
    assert len(optimised) == 2  # the optimizer holds state for the head's weight and bias only


def test_labels_per_class_is_stratified_seeded_and_nested():
    labels = load_dataset("digits").train_labels
    a, again, other = (stratified_subset(labels, 10, s, 10) for s in (0, 0, 1))
    assert torch.bincount(labels[a], minlength=10).tolist() == [10] * 10
    assert torch.equal(a, again) and not torch.equal(a, other)
    assert set(stratified_subset(labels, 5, 0, 10).tolist()) <= set(a.tolist())  # K=5 is inside K=10, same seed
    ds, record = with_labelled_subset(load_dataset("digits"), 10, 3)
    assert record["indices"] == stratified_subset(labels, 10, 3, 10).tolist()
    assert len(ds.train_labels) == 100 * record["passes_per_epoch"] >= len(ds.val_labels)  # see data/subset.py
    with pytest.raises(Exception, match="class 0 has only"):
        stratified_subset(labels, 1000, 0, 10)


@pytest.mark.slow  # pre-trains (the pretrained fixture)
def test_fine_tuned_run_is_reproduced_from_its_folder(pretrained, tmp_path):
    first = tmp_path / "first"
    assert main([*FINETUNE, "--init", str(pretrained), "--labels-per-class", "5", "--seed", "4", "--epochs", "2",
                 "--run-dir", str(first)]) == 0
    subset = json.loads((first / "labelled_subset.json").read_text())
    labels = load_dataset("digits").train_labels
    assert torch.bincount(labels[subset["indices"]], minlength=10).tolist() == [5] * 10 and subset["seed"] == 4
    cfg = TrainConfig.load(first / "config.json")  # all that is needed: the init folder, the seed, K
    cfg.run_dir = str(tmp_path / "again")
    train(cfg)
    again = Path(cfg.run_dir)
    a, b = tensors(first), tensors(again)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((again / "labelled_subset.json").read_text()) == subset
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (first, again))
    assert (ra["test_accuracy"], ra["test_loss"]) == (rb["test_accuracy"], rb["test_loss"])
    with safe_open(str(pretrained / "checkpoint.safetensors"), "pt") as f:  # which weights it started from
        recorded = json.loads(f.metadata()["mnistlab"])["payload_sha256"]
    assert json.loads((first / "env.json").read_text())["init_payload_sha256"] == recorded


@pytest.mark.parametrize("flags, says", [
    (["--freeze-encoder"], "freeze_encoder = True without init"),
    (["--engine", "scratch", "--model", "mlp", "--init", "somewhere"], "init with engine = 'scratch'"),
    (["--engine", "scratch", "--model", "mlp", "--labels-per-class", "5"], "labels_per_class with engine = 'scratch'"),
])
def test_flags_without_what_they_need_are_refused_before_any_data(flags, says, capsys):
    assert main(["train", "--dataset", "kmnist", "--offline", *flags]) == 2
    assert says in capsys.readouterr().err


def _fake_init(folder: Path, kind: str | None, finished: bool, dim: int = 32) -> Path:
    """A run folder holding a checkpoint of a tiny ViT encoder (no training): a pre-training run (`kind`
    "pretrain"), finished or not, or a training run (`kind` None)."""
    from mnistlab.checkpoint import save_checkpoint

    holder = torch.nn.Module()
    holder.encoder = create_model("vit", num_classes=1, **dict(TINY_KWARGS, dim=dim))
    holder.encoder.head = torch.nn.Identity()  # as MAE keeps it: an encoder without a classifier
    meta = dict(model="vit", model_kwargs=dict(TINY_KWARGS, dim=dim), in_chans=1, method="mae", mean=0.1, std=0.3,
                dataset="digits", step=11 if finished else 5, total_steps=11, config={})
    if kind is not None:
        meta["kind"] = kind
    folder.mkdir()
    save_checkpoint(folder / "checkpoint.safetensors", holder, meta)
    if finished:
        (folder / "results.json").write_text("{}")
    return folder


@pytest.mark.parametrize("init, says", [
    (lambda d: d / "nowhere", "no checkpoint.safetensors there"),
    (lambda d: _fake_init(d / "trained", None, True), "a training run, not a `mnistlab pretrain` run"),
    (lambda d: _fake_init(d / "unfinished", "pretrain", False), "stopped at step 5 of 11; finish it first"),
    (lambda d: _fake_init(d / "wider", "pretrain", True, dim=48), "(pos_embed is (1, 16, 48) there, (1, 16, 32) "
                                                                  "here)"),
])
def test_a_bad_init_is_refused_before_any_data_and_leaves_no_folder(tmp_path, capsys, monkeypatch, init, says):
    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before --init was checked")

    monkeypatch.setattr("mnistlab.training.load_dataset", no_data)  # mnist is not here: it would download
    run = tmp_path / "run"
    assert main(["train", "--model", "vit", *TINY_VIT, "--init", str(init(tmp_path)), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mnistlab: error: --init") and says in err, err
    assert not run.exists()
