"""The training spine: learning floors, exact resume after SIGKILL and Ctrl-C, divergence, flags."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mnistlab.checkpoint import NonFiniteCheckpoint, save_checkpoint
from mnistlab.cli import main
from mnistlab.config import RECIPES, TrainConfig, resolve_config
from mnistlab.errors import UserError
from mnistlab.loop import get_lr

# A small, quick configuration on the bundled digits (1,294 train images, 41 steps of 32).
QUICK_DATA = ["--dataset", "digits", "--batch-size", "32", "--threads", "1"]
QUICK = [*QUICK_DATA, "--model", "cnn", "--model-arg", "widths=[8,16,32]"]
QUICK_LINEAR = [*QUICK_DATA, "--model", "linear"]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, one thread


def mnistlab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mnistlab", *args]


def model_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(run_dir / "checkpoint.safetensors").items() if k.startswith("model/")}


def assert_bit_identical(a: Path, b: Path) -> None:
    ta, tb = model_tensors(a), model_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs"


@pytest.mark.slow
def test_cnn_on_digits_with_no_other_flags_passes_accuracy_floor(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--run-dir", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["test_accuracy"] >= 0.95, results
    # the run folder is complete and self-describing
    assert {"config.json", "env.json", "metrics.jsonl", "checkpoint.safetensors"} <= {p.name for p in run.iterdir()}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 16))
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds", "images_per_second"} <= set(
        records[0])
    for key in ("test_accuracy", "val_accuracy", "best_val_accuracy", "epochs", "train_seconds", "params"):
        assert key in results
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["linear", "mlp", "lenet5"])
def test_every_first_model_learns_digits(tmp_path, model):
    run = tmp_path / model
    assert main(["train", "--dataset", "digits", "--model", model, "--run-dir", str(run)]) == 0
    assert json.loads((run / "results.json").read_text())["test_accuracy"] >= 0.85


@pytest.mark.slow
def test_eval_rebuilds_the_model_from_the_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "2", "--run-dir", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-12)
    assert sum(map(sum, report["confusion"])) == 360
    assert main(["eval", str(run), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "confusion matrix" in out and "per" not in out.split("\n")[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(mnistlab_cmd("train", *QUICK, "--epochs", "3", "--augment", "shift", "--run-dir", str(run)),
                   check=True, capture_output=True)
    return run


def all_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoint.safetensors")


def metrics_without_timings(run_dir: Path) -> list[dict]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in records]


def assert_same_run(run: Path, reference: Path) -> None:
    """Weights, optimizer state and the metrics history are those of the uninterrupted run."""
    ta, tb = all_tensors(run), all_tensors(reference)
    assert ta.keys() == tb.keys() and any(k.startswith("optim/") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs"
    assert metrics_without_timings(run) == metrics_without_timings(reference)
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (run, reference))
    assert (ra["test_accuracy"], ra["test_loss"]) == (rb["test_accuracy"], rb["test_loss"])


# QUICK makes 41 steps an epoch: step 50 is inside epoch 2; "metrics:2" is between epoch 2's metrics
# record and its checkpoint, so the resumed run must drop that record and redo the epoch.
@pytest.mark.slow
@pytest.mark.parametrize("point", ["step:50", "metrics:2"])
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, uninterrupted, point):
    run = tmp_path / "run"
    killed = subprocess.run(mnistlab_cmd("train", *QUICK, "--epochs", "3", "--augment", "shift",
                                         "--run-dir", str(run)), capture_output=True, text=True,
                            env=dict(os.environ, MNISTLAB_TEST_KILL=point))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (run / "results.json").exists()
    epochs_logged = len((run / "metrics.jsonl").read_text().splitlines())
    assert epochs_logged == (1 if point == "step:50" else 2)
    resumed = subprocess.run(mnistlab_cmd("train", "--resume", str(run)), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert_same_run(run, uninterrupted)


@pytest.mark.slow
def test_ctrl_c_saves_mid_epoch_and_resume_matches(tmp_path, uninterrupted):
    run = tmp_path / "run"
    stopped = subprocess.run(mnistlab_cmd("train", *QUICK, "--epochs", "3", "--augment", "shift",
                                          "--run-dir", str(run)), capture_output=True, text=True,
                             env=dict(os.environ, MNISTLAB_TEST_INTERRUPT="step:50"))
    assert stopped.returncode == 130, stopped.stderr
    err = stopped.stderr
    assert "interrupted at step 50/" in err and "--resume" in err and "Traceback" not in err
    resumed = subprocess.run(mnistlab_cmd("train", "--resume", str(run)), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run, uninterrupted)


def _poison_weights_at(monkeypatch, target_step: int, after: bool) -> None:
    """Make the weights NaN before (the loss of that step is NaN) or after (only the update is) a step."""
    from mnistlab.training import TorchEngine

    original = TorchEngine.train_step

    def poisoned(self, idx, step, lr):
        def poison():
            with torch.no_grad():
                for p in self.model.parameters():
                    p.fill_(float("nan"))

        if step == target_step and not after:
            poison()
        out = original(self, idx, step, lr)
        if step == target_step and after:
            poison()
        return out

    monkeypatch.setattr(TorchEngine, "train_step", poisoned)


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _poison_weights_at(monkeypatch, 50, after=False)  # inside epoch 2
    assert main(["train", *QUICK_LINEAR, "--epochs", "2", "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert "the loss became nan at step 50" in err and "Traceback" not in err
    meta = json.loads(load_file_meta(run / "checkpoint.safetensors"))
    assert meta["step"] == 41  # the end of epoch 1, intact
    assert not (run / "results.json").exists()


@pytest.mark.slow
def test_divergence_at_the_last_step_is_exit_1_not_a_nan_in_results(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _poison_weights_at(monkeypatch, 81, after=True)  # the update of the last step (41 + 41 steps)
    assert main(["train", *QUICK_LINEAR, "--epochs", "2", "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "Traceback" not in err
    assert not (run / "results.json").exists()
    assert json.loads(load_file_meta(run / "checkpoint.safetensors"))["step"] == 41
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


def load_file_meta(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()["mnistlab"]


def test_checkpoint_with_nan_is_never_written(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, {"step": 1})
    good = path.read_bytes()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteCheckpoint, match="model/weight"):
        save_checkpoint(path, model, {"step": 2})
    assert path.read_bytes() == good
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--lr", "-1"], ["--lr", "nan"], ["--optimizer", "adam"],
                                   ["--augment", "rotate"], ["--label-smoothing", "1.5"], ["--batch-size", "x"],
                                   ["--model-arg", "width"], ["--schedule", "step"]])
def test_bad_flag_values_are_argparse_errors(flags, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *flags])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_unknown_model_is_exit_2_before_loading_data(capsys):
    assert main(["train", "--model", "resnet9000", "--dataset", "kmnist", "--offline"]) == 2
    assert "unknown model 'resnet9000'" in capsys.readouterr().err


def test_bad_model_arg_is_exit_2_before_loading_data(capsys):
    assert main(["train", "--model", "mlp", "--model-arg", "activation=swish", "--dataset", "kmnist",
                 "--offline"]) == 2
    assert "unknown activation 'swish'" in capsys.readouterr().err


def test_resume_refuses_other_flags(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--lr", "0.1"]) == 2
    assert "drop --lr" in capsys.readouterr().err


@pytest.mark.slow  # trains a model
def test_existing_run_dir_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *QUICK_LINEAR, "--epochs", "1", "--run-dir", str(run)]) == 0
    assert main(["train", *QUICK_LINEAR, "--epochs", "1", "--run-dir", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_recipe_precedence():
    cfg = resolve_config({"recipe": "fast", "lr": 0.01})
    assert cfg.lr == 0.01  # explicit beats recipe
    assert cfg.epochs == RECIPES["fast"]["epochs"]  # recipe beats model defaults
    assert cfg.model_kwargs == RECIPES["fast"]["model_kwargs"]
    assert resolve_config({"recipe": "fast", "model": "cnn"}).lr == RECIPES["fast"]["lr"]
    # the recipes compute in bf16 where the hardware makes it pay; the default run stays fp32
    assert resolve_config({"recipe": "fast"}).precision == "auto"
    assert resolve_config({"recipe": "fast", "precision": "fp32"}).precision == "fp32"
    assert resolve_config({}).precision == "fp32" and resolve_config({"recipe": "best"}).precision == "auto"
    assert resolve_config({}).model == "cnn"
    digits = resolve_config({"dataset": "digits"})
    assert (digits.batch_size, digits.epochs) == (64, 15)  # a small set gets more, smaller steps
    assert resolve_config({"dataset": "digits", "batch_size": 16}).batch_size == 16
    with pytest.raises(Exception, match="unknown recipe"):
        resolve_config({"recipe": "slow"})


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("model", ["vit", "lstm", "lenet5"])
def test_a_recipe_with_another_model_is_refused(recipe, model, capsys):
    with pytest.raises(UserError, match=f"--recipe {recipe} is a recipe for --model cnn"):
        resolve_config({"recipe": recipe, "model": model})
    assert main(["train", "--recipe", recipe, "--model", model, "--dataset", "digits"]) == 2
    assert "drop --recipe" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_a_valid_config_for_an_existing_model(name):
    from mnistlab.models import create_model

    cfg = resolve_config({"recipe": name})
    assert cfg.recipe == name and cfg.model == RECIPES[name]["model"]
    create_model(cfg.model, **cfg.model_kwargs)


@pytest.mark.slow  # trains a model
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_trains_one_short_epoch_with_its_own_settings(name, tmp_path):
    """A recipe is configuration: the run it makes records the recipe's every value (the model's arguments too)
    and trains; one epoch of digits keeps it short. Precision is left to the recipe but for `auto`, whose choice
    depends on the CPU: the recorded value is then fp32 or bf16."""
    run = tmp_path / name
    assert main(["train", "--recipe", name, "--dataset", "digits", "--epochs", "1", "--threads", "1",
                 "--run-dir", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"] == name
    for key, value in RECIPES[name].items():
        if key in ("doc", "epochs"):
            continue
        if key == "precision" and value == "auto":
            assert config[key] in ("auto", "fp32", "bf16"), config[key]
            continue
        assert config[key] == value, (key, config[key], value)
    (epoch,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((run / "results.json").read_text())
    assert math.isfinite(epoch["train_loss"]) and 0 <= results["test_accuracy"] <= 1


def test_every_model_default_names_a_model_and_builds_a_valid_config():
    from mnistlab.config import MODEL_DEFAULTS
    from mnistlab.models import create_model, list_models

    assert set(MODEL_DEFAULTS) <= set(list_models())
    for model in list_models():
        cfg = resolve_config({"model": model})
        for key, value in MODEL_DEFAULTS.get(model, {}).items():
            assert getattr(cfg, key) == value
        create_model(model, **cfg.model_kwargs)


@pytest.mark.parametrize("field, value", [
    ("schedule", "cosin"), ("optimizer", "adam"), ("augment", "rotate"), ("hflip", "yes"), ("tta", "maybe"),
    ("tta_shifts", "auto-ish"), ("device", "tpu"), ("engine", "jax"), ("epochs", 0), ("epochs", "5"),
    ("lr", -1.0), ("lr", float("nan")), ("label_smoothing", 1.0), ("seed", -1), ("seed", 2**64),
    ("deterministic", "yes"), ("grad_flow_steps", []), ("recipe", "slow"), ("warmup", 1.5),
])
def test_every_field_is_validated_from_config_json(tmp_path, field, value):
    d = TrainConfig().to_dict()
    d[field] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(UserError, match=f"{field} = "):
        TrainConfig.load(path)
    with pytest.raises(UserError, match=f"{field} = "):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("key", ["in_chans", "num_classes", "img_size"])
def test_model_args_the_dataset_decides_are_refused(key, capsys):
    assert main(["train", "--model", "cnn", "--model-arg", f"{key}=3", "--dataset", "digits"]) == 2
    assert "the dataset decides these" in capsys.readouterr().err


def test_train_flags_are_generated_from_the_config_fields(capsys):
    from dataclasses import fields

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for f in fields(TrainConfig):
        if f.metadata["flag"]:
            assert "--" + f.name.replace("_", "-") in out, f.name
    # eval and train take the same values for the flags they share
    assert main(["train", "--tta-shifts", "auto", "--model", "nope"]) == 2


def test_config_round_trips_through_json(tmp_path):
    cfg = resolve_config({"recipe": "best", "seed": 3})
    (tmp_path / "c.json").write_text(cfg.to_json())
    assert TrainConfig.load(tmp_path / "c.json") == cfg


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_lr_schedule_warms_up_then_decays(schedule):
    cfg = TrainConfig(lr=0.1, schedule=schedule, warmup=0.2)
    lrs = [get_lr(s, 100, cfg) for s in range(100)]
    assert lrs[:20] == sorted(lrs[:20]) and lrs[19] == pytest.approx(0.1)
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(0.1)
    else:
        assert lrs[20:] == sorted(lrs[20:], reverse=True) and lrs[-1] < 0.005


@pytest.mark.parametrize("hflip", [False, True])
def test_shift_augmentation_moves_pixels_by_whole_steps(hflip):
    from mnistlab.data.batches import shifted_crops

    x = torch.zeros(64, 28, 28, dtype=torch.uint8)
    x[:, 14, 10] = 200
    x[:, 14, 11] = 100  # the bright pixel left of the dim one, unless mirrored
    torch.manual_seed(0)
    out = shifted_crops(torch.nn.functional.pad(x, (2, 2, 2, 2)), torch.arange(64), 2, hflip)
    assert out.shape == (64, 28, 28) and out.dtype == torch.uint8
    mirrored = 0
    for img in out:
        assert sorted(img[img > 0].tolist()) == [100, 200]  # moved whole, not blurred or cut
        r, c = divmod(int(img.argmax()), 28)
        r2, c2 = divmod(int((img == 100).nonzero()[0, 0] * 28 + (img == 100).nonzero()[0, 1]), 28)
        assert r2 == r and abs(c2 - c) == 1
        mirrored += c2 < c
        assert abs(r - 14) <= 2 and (abs(c - 10) <= 2 or abs(c - 17) <= 2)  # 17: column 10, mirrored
    assert len({int(i.argmax()) for i in out}) > 5  # and not all the same way
    assert (20 < mirrored < 44) if hflip else mirrored == 0


@pytest.mark.slow  # trains a CNN for 9 steps; the first channels-last steps cost seconds
@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "muon"])
def test_fused_optimizer_resumes_channels_last_weights_exactly(tmp_path, optimizer):
    """Safetensors stores state contiguous; the fused kernels need it in the weights' channels-last layout."""
    from mnistlab.checkpoint import load_into
    from mnistlab.lifecycle import make_optimizer
    from mnistlab.models import create_model

    cfg = TrainConfig(optimizer=optimizer, lr=0.05)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))

    def fresh():
        torch.manual_seed(0)
        model = create_model("cnn", widths=[4, 8, 8], hidden=16).to(memory_format=torch.channels_last)
        return model, make_optimizer(model, cfg)

    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    a, opt_a = fresh()
    steps(a, opt_a, 6)
    b, opt_b = fresh()
    steps(b, opt_b, 3)
    save_checkpoint(tmp_path / "c.safetensors", b, {}, opt_b)
    c, opt_c = fresh()
    load_into(tmp_path / "c.safetensors", c, opt_c)
    steps(c, opt_c, 3)
    for (name, pa), pc in zip(a.state_dict().items(), c.state_dict().values(), strict=True):
        assert torch.equal(pa, pc), name


def test_random_erasing_blanks_one_rectangle_with_probability_p():
    from mnistlab.data.batches import random_erase

    x = torch.zeros(2000, 1, 28, 28)
    torch.manual_seed(0)
    out = random_erase(x, 0.5, background=-1.0)
    erased = out[:, 0] == -1.0  # (B, H, W)
    hit = erased.flatten(1).any(1)
    assert 0.45 < hit.float().mean() < 0.55  # probability p
    assert torch.equal(out[~hit], x[~hit])  # the rest untouched
    for img in erased[hit][:200]:
        rows, cols = img.any(1).nonzero().flatten(), img.any(0).nonzero().flatten()
        # one solid rectangle: its bounding box is all erased
        assert img.sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        assert 0.02 * 784 * 0.5 <= img.sum() <= 0.25 * 784 * 1.5  # area 2-25%, up to rounding
    assert torch.equal(random_erase(x, 0.0, -1.0), x)


@pytest.mark.slow  # trains a model
def test_threads_flag_is_honoured_in_env(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *QUICK_LINEAR, "--epochs", "1", "--run-dir", str(run)]) == 0
    assert json.loads((run / "env.json").read_text())["torch_threads"] == 1
    assert os.path.exists(run / "results.json")


def test_flip_tta_averages_an_image_and_its_mirror_image():
    from mnistlab.evaluate import evaluate
    from mnistlab.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn", widths=[8, 16, 32]).eval()
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,))
    plain = evaluate(model, images, labels, 0.3, 0.35)
    tta = evaluate(model, images, labels, 0.3, 0.35, hflip_tta=True)
    mirrored = evaluate(model, images.flip(-1), labels, 0.3, 0.35, hflip_tta=True)
    assert torch.equal(tta.predictions, mirrored.predictions)  # both views, in either order
    assert abs(tta.loss - mirrored.loss) < 1e-5
    assert tta.loss != plain.loss
    # the loss is the cross-entropy of the mean probability of the two views
    with torch.no_grad():
        from mnistlab.data.batches import to_input

        x = to_input(images, 0.3, 0.35)
        p = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
    assert tta.loss == pytest.approx(-p[torch.arange(64), labels].log().mean().item(), rel=1e-5)


@pytest.mark.slow
def test_tta_follows_training_flips_and_eval_can_override_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "1", "--hflip", "on", "--run-dir", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    capsys.readouterr()
    reports = {}
    for mode in ("auto", "on", "off"):
        assert main(["eval", str(run), "--json", "--tta", mode]) == 0
        reports[mode] = json.loads(capsys.readouterr().out)
    assert reports["auto"]["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-12)
    assert reports["auto"]["loss"] == reports["on"]["loss"] != reports["off"]["loss"]


@pytest.mark.slow
def test_shift_tta_averages_nine_positions_and_eval_follows_training(tmp_path, capsys):
    from mnistlab.data.batches import to_input
    from mnistlab.evaluate import evaluate
    from mnistlab.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn", widths=[8, 16, 32]).eval()
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (32,))
    got = evaluate(model, images, labels, 0.3, 0.35, hflip_tta=True, shift_tta=True)
    # by hand: the image moved by (dy, dx) with black (0 before normalising) filling the gap, and mirrored
    with torch.no_grad():
        p = torch.zeros(32, 10)
        for dy, dx in [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]:
            moved = torch.zeros_like(images)
            moved[:, max(dy, 0) : 28 + min(dy, 0), max(dx, 0) : 28 + min(dx, 0)] = \
                images[:, max(-dy, 0) : 28 + min(-dy, 0), max(-dx, 0) : 28 + min(-dx, 0)]
            x = to_input(moved, 0.3, 0.35)
            p += model(x).softmax(1) + model(x.flip(-1)).softmax(1)
        p /= 18
    assert got.loss == pytest.approx(-p[torch.arange(32), labels].log().mean().item(), rel=1e-5)
    assert torch.equal(got.predictions, p.argmax(1))
    # train --tta-shifts on: results.json holds the shifted evaluation, and eval repeats it unless told not to
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "1", "--hflip", "on", "--tta-shifts", "on", "--run-dir", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    capsys.readouterr()
    reports = {}
    for mode in ("auto", "off"):
        assert main(["eval", str(run), "--json", "--tta-shifts", mode]) == 0
        reports[mode] = json.loads(capsys.readouterr().out)
    assert reports["auto"]["loss"] == pytest.approx(results["test_loss"], abs=1e-12)
    assert reports["off"]["loss"] != reports["auto"]["loss"]


def _models():
    from mnistlab.models import list_models

    return list_models()


@pytest.mark.slow  # trains a model
@pytest.mark.parametrize("model", _models())
def test_every_registered_model_trains_one_epoch_and_evaluates_from_its_folder(tmp_path, idx_dir, model, capsys):
    from mnistlab.training import train

    cfg = resolve_config(dict(model=model, data_dir=str(idx_dir), dataset=None, epochs=1, batch_size=50,
                              val_size=20, threads=1, run_dir=str(tmp_path / "run")))
    cfg.dataset = None
    results = train(cfg, progress=False)
    assert results["dataset"] == "custom" and results["steps"] == 4  # 180 images in batches of 50
    # random pictures: no accuracy to expect, but it counts whole images of the 50 and the loss is a number
    assert (results["test_accuracy"] * 50) == pytest.approx(round(results["test_accuracy"] * 50), abs=1e-9)
    assert math.isfinite(results["test_loss"]), results
    records = metrics_without_timings(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1]
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == results["test_accuracy"]


@pytest.mark.slow  # trains a model
def test_the_loop_and_evaluate_make_no_float64_tensors(tmp_path, idx_dir):
    """MPS has no float64: running sums and losses must use dtypes every backend has (or live on the CPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from mnistlab.training import train

    class Float64Spy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_flatten(out)[0]):
                self.ops.add(str(func))
            return out

    cfg = resolve_config(dict(model="mlp", data_dir=str(idx_dir), epochs=1, batch_size=50, val_size=20,
                              threads=1, run_dir=str(tmp_path / "run")))
    cfg.dataset = None
    from mnistlab.data.dataset import load_dataset

    load_dataset(None, data_dir=str(idx_dir), val_size=20)  # the data layer's statistics may use float64
    spy = Float64Spy()
    import mnistlab.training as train_module

    real_fit = train_module.fit

    def spied_fit(*args, **kwargs):
        with spy:
            real_fit(*args, **kwargs)

    train_module.fit = spied_fit
    try:
        train(cfg, progress=False)
    finally:
        train_module.fit = real_fit
    assert not spy.ops


# ---- messages in plain words -------------------------------------------------------------------------

def test_resume_with_seq_names_the_flag_that_was_given(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--seq", "rows"]) == 2
    err = capsys.readouterr().err
    assert "drop --seq" in err and "--model-arg" not in err, err


def test_counts_and_durations_read_as_words():
    from mnistlab.run import duration_text, plural

    assert (plural(1, "thread"), plural(4, "thread"), plural(1200, "step")) == ("1 thread", "4 threads", "1,200 steps")
    assert (duration_text(2.04), duration_text(90), duration_text(7200)) == ("2.0 s", "1.5 min", "2.0 h")


def test_a_model_is_named_with_its_options_only_when_it_has_some():
    from mnistlab.config import model_label

    assert model_label("vit", {}) == "vit"
    assert model_label("vit", {"dim": 32, "depth": 1}) == "vit (depth=1, dim=32)"


def test_the_torchrun_note_speaks_of_batchnorm_only_for_a_model_that_has_it():
    from mnistlab.distributed import World
    from mnistlab.models import create_model
    from mnistlab.training import torchrun_note

    world, cfg = World(rank=0, local_rank=0, size=2, backend="gloo"), TrainConfig(batch_size=128)
    assert "BatchNorm" not in torchrun_note(world, cfg, create_model("mlp"))
    assert "64 images of each global batch of 128; BatchNorm statistics per process" in torchrun_note(
        world, cfg, create_model("cnn"))


def test_the_labelled_subset_note_accounts_for_the_images_an_epoch_shows():
    from mnistlab.training import labelled_subset_note

    text = labelled_subset_note(TrainConfig(labels_per_class=10), 10, 200, Path("run/labelled_subset.json"))
    assert "100 labelled training images (seed 0), each shown 2 times an epoch (the 200 training images" in text


def test_a_whitened_stem_is_set_from_the_runs_own_training_images_and_kept(tmp_path):
    """--model-arg whiten=true: training builds the first conv from a sample of its training split fixed by seed 0
    (the engine calls init_from_data on it) and the finished run's stem is exactly that: fixed, never stepped."""
    from conftest import train_digits

    from mnistlab.checkpoint import CHECKPOINT, load_model
    from mnistlab.data.batches import to_input
    from mnistlab.data.dataset import load_dataset
    from mnistlab.models import create_model
    from mnistlab.training import data_init_sample

    run = train_digits(tmp_path, "--epochs", "1", "--model-arg", "widths=[18,16,32]", "--model-arg", "whiten=true")
    model, _ = load_model(run / CHECKPOINT)
    ds = load_dataset("digits")
    expected = create_model("cnn", widths=[18, 16, 32], whiten=True)
    expected.init_from_data(lambda: to_input(ds.train_images[data_init_sample(len(ds.train_images))], ds.mean, ds.std))
    torch.testing.assert_close(model.features[0][0].weight, expected.features[0][0].weight)
