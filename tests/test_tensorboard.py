"""--tensorboard: the event files read back with TensorBoard's own EventAccumulator hold every tag at the
optimisation steps with metrics.jsonl's values; a killed and resumed run shows each step once; the refusals
(scratch engine, missing package) come before training; without the flag nothing imports tensorboard."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mnistlab.cli import main
from mnistlab.models import create_model

# The bundled digits: 41 steps of 32 an epoch, so step 50 is inside epoch 2 and "metrics:2" falls between
# epoch 2's metrics (and events) and its checkpoint.
WIDTHS = [8, 16, 32]
QUICK = ["--dataset", "digits", "--batch-size", "32", "--threads", "1", "--model", "cnn",
         "--model-arg", f"widths={json.dumps(WIDTHS)}", "--epochs", "3"]
SCALARS = {"loss/train": "train_loss", "loss/val": "val_loss", "accuracy/train": "train_accuracy",
           "accuracy/val": "val_accuracy", "lr": "lr", "images_per_second": "images_per_second"}


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mnistlab", "train", *args]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def accumulator(run: Path):
    """TensorBoard's own reader over RUN_DIR/tb, everything kept (it applies purge_step as TensorBoard does)."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(run / "tb"), size_guidance={
        "scalars": 0, "tensors": 0, "histograms": 0, "images": 0})
    return acc.Reload()


def scalar_series(acc) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def parameter_names() -> list[str]:
    return [name for name, _ in create_model("cnn", in_chans=1, num_classes=10, widths=WIDTHS).named_parameters()]


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory) -> Path:
    pytest.importorskip("torch.utils.tensorboard")
    run = tmp_path_factory.mktemp("tb") / "run"
    subprocess.run(train_cmd(*QUICK, "--tensorboard", "--run-dir", str(run)), check=True, capture_output=True)
    return run


@pytest.mark.slow
def test_event_file_holds_every_tag_at_the_optimisation_steps_with_the_metrics_values(tb_run):
    records = metrics(tb_run)
    steps = [r["step"] for r in records]
    assert steps == [41, 82, 123]
    acc = accumulator(tb_run)
    series = scalar_series(acc)
    assert set(series) == set(SCALARS)
    for tag, key in SCALARS.items():  # metrics.jsonl's numbers, as float32 (TensorBoard's scalars)
        assert series[tag] == [(r["step"], float(np.float32(r[key]))) for r in records], tag

    names = parameter_names()
    assert set(acc.Tags()["histograms"]) == {f"{kind}/{n}" for kind in ("weights", "grads") for n in names}
    for tag in acc.Tags()["histograms"]:
        assert [h.step for h in acc.Histograms(tag)] == steps, tag
    weights = load_file(tb_run / "checkpoint.safetensors")
    for n in names:  # the last weights histogram is the checkpoint's weights; the gradients are not zero
        last = acc.Histograms(f"weights/{n}")[-1].histogram_value
        w = weights[f"model/{n}"].double()
        assert last.num == w.numel() and last.sum == pytest.approx(w.sum().item(), rel=1e-5, abs=1e-6), n
        assert acc.Histograms(f"grads/{n}")[-1].histogram_value.sum_squares > 0, n

    from PIL import Image

    images = acc.Images("predictions/val")
    assert [im.step for im in images] == steps
    picture = Image.open(io.BytesIO(images[-1].encoded_image_string))
    assert picture.size == (images[-1].width, images[-1].height) == (4 * 112, 4 * (28 * 2 + 28))


def raw_steps(run: Path, tag: str) -> list[int]:
    """Every event of `tag` in every event file, purged or not, in the order written."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [e.step for path in sorted((run / "tb").iterdir()) for e in EventFileLoader(str(path)).Load()
            for v in e.summary.value if v.tag == tag]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["step:50", "metrics:2"])
def test_resume_after_a_kill_shows_each_step_once_with_the_uninterrupted_values(tmp_path, tb_run, point):
    run = tmp_path / "run"
    killed = subprocess.run(train_cmd(*QUICK, "--tensorboard", "--run-dir", str(run)), capture_output=True,
                            text=True, env=dict(os.environ, MNISTLAB_TEST_KILL=point))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = subprocess.run(train_cmd("--resume", str(run)), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr

    if point == "metrics:2":  # epoch 2's events were on disk before the kill and are redone: purged, not shown twice
        assert raw_steps(run, "loss/val") == [41, 82, 82, 123]
    acc, reference = accumulator(run), accumulator(tb_run)
    got, want = scalar_series(acc), scalar_series(reference)
    assert got.keys() == want.keys()
    for tag in got:
        assert [s for s, _ in got[tag]] == [41, 82, 123], tag
        if tag != "images_per_second":  # exact resume: the same numbers as the uninterrupted run
            assert got[tag] == want[tag], tag
    for tag in reference.Tags()["histograms"]:
        assert [h.step for h in acc.Histograms(tag)] == [41, 82, 123], tag
        assert ([h.histogram_value for h in acc.Histograms(tag)] ==
                [h.histogram_value for h in reference.Histograms(tag)]), tag
    assert [im.step for im in acc.Images("predictions/val")] == [41, 82, 123]


@pytest.mark.slow
def test_without_the_flag_nothing_imports_tensorboard_nothing_is_written_and_training_is_the_same(tmp_path, tb_run):
    run = tmp_path / "run"
    script = ("import json, sys\nfrom mnistlab.cli import main\n"
              f"assert main(['train', *{QUICK!r}, '--run-dir', {str(run)!r}]) == 0\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorboard'\n"
              "                        or m.startswith('torch.utils.tensorboard'))))\n")
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    assert json.loads(out.splitlines()[-1]) == []
    assert not (run / "tb").exists()
    assert json.loads((run / "config.json").read_text())["tensorboard"] is False
    # with the flag, the same training: only the timings differ
    untimed = [[{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in metrics(r)]
               for r in (run, tb_run)]
    assert untimed[0] == untimed[1]
    a, b = load_file(run / "checkpoint.safetensors"), load_file(tb_run / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_with_the_scratch_engine_is_refused_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--engine", "scratch", "--model", "mlp", "--dataset", "digits", "--tensorboard",
                 "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tensorboard" in err and "--engine torch" in err, err
    assert not run.exists()


def test_missing_tensorboard_package_fails_before_training_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import torch.utils.tensorboard` fails

    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the missing package was reported")

    monkeypatch.setattr("mnistlab.training.load_dataset", no_data)
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--tensorboard", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err == 'mnistlab: error: --tensorboard needs the tensorboard package: pip install "mnistlab[tensorboard]"\n'
    assert not run.exists()
    # a run started with --tensorboard, resumed where the package is missing: the same line, before its data
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"dataset": "digits", "tensorboard": True}))
    assert main(["train", "--resume", str(run)]) == 2
    assert "pip install" in capsys.readouterr().err
