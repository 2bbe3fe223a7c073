"""The Python API: `mnistlab.load` answers as `mnistlab predict` does on paths, PIL images and numpy arrays, its
logits are the model's, `mnistlab.train` takes the train command's flags and checks them the same way, every bad
input is one MnistlabError line that writes nothing, and the README's Python snippet runs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import mnistlab
from mnistlab.calibration import CALIBRATION, FORMAT
from mnistlab.checkpoint import CHECKPOINT, PRETRAIN_KIND, save_checkpoint
from mnistlab.cli import build_parser, main
from mnistlab.config import TrainConfig
from mnistlab.data.batches import to_input
from mnistlab.models import create_model
from mnistlab.run import CONFIG, LOCK, RESULTS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: a second thread only waits


def fake_run(folder: Path, *, model: str = "mlp", kind: str | None = None, calibrated: bool = True) -> Path:
    """A run folder as training leaves it, without training: an untrained model's checkpoint (step 5) for digits,
    config.json, results.json and a calibration whose threshold calls some answers unsure. Its data_dir does not
    exist: nothing here may need the data (and an export draws no samples)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(dataset="digits", model=model, data_dir=str(folder / "no-data-here"))
    meta = dict(model=model, model_kwargs={}, in_chans=1, num_classes=10, classes=list("0123456789"), mean=0.1557,
                std=0.2771, config=cfg.to_dict(), step=5)
    if kind is not None:
        meta["kind"] = kind
    torch.manual_seed(0)
    save_checkpoint(folder / CHECKPOINT, create_model(model).eval(), meta)
    (folder / CONFIG).write_text(cfg.to_json())
    (folder / RESULTS).write_text(json.dumps(dict(test_accuracy=0.5, test_loss=1.0)))
    if calibrated:
        (folder / CALIBRATION).write_text(json.dumps(dict(format=FORMAT, step=5, temperature=0.1, threshold=0.22,
                                                          temperature_reason="set by the test",
                                                          threshold_reason="set by the test")))
    return folder


@pytest.fixture
def run(tmp_path) -> Path:
    return fake_run(tmp_path / "run")


def pictures() -> list[Image.Image]:
    """Strokes as people draw them: grey dark-on-light, colour light-on-dark, ink in a transparent canvas's alpha."""
    grey = Image.new("L", (280, 200), 250)
    ImageDraw.Draw(grey).line([(60, 40), (200, 40), (110, 180)], fill=20, width=18)
    colour = Image.new("RGB", (120, 160), (10, 10, 40))
    ImageDraw.Draw(colour).ellipse([30, 30, 90, 130], outline=(240, 240, 200), width=9)
    canvas = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).line([(100, 20), (100, 180)], fill=(0, 0, 0, 255), width=16)
    return [grey, colour, canvas]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time: loading must leave this unchanged."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_predict_answers_as_the_predict_command_for_paths_pil_images_and_arrays(tmp_path, run, capsys):
    paths = []
    for i, picture in enumerate(pictures()):
        paths.append(str(tmp_path / f"p{i}.png"))
        picture.save(paths[-1])
    capsys.readouterr()
    assert main(["predict", str(run), *paths, "--json", "--top", "3"]) == 0
    command = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    clf = mnistlab.load(run)
    from_paths = [p.to_dict() for p in clf.predict(paths, top=3)]
    assert from_paths == command
    assert {a["status"] for a in command} == {"ok", "unsure"}  # the threshold is applied, both ways
    without_path = [dict(a, path=None) for a in command]
    from_images = [dict(p.to_dict(), path=None) for p in clf.predict(pictures(), top=3)]
    from_arrays = [dict(p.to_dict(), path=None) for p in clf.predict([np.asarray(p) for p in pictures()], top=3)]
    assert from_images == without_path and from_arrays == without_path


def test_one_picture_in_gives_one_answer_with_the_view_the_model_saw(tmp_path, run):
    clf = mnistlab.load(run)
    answer = clf.predict(pictures()[0])
    assert isinstance(answer, mnistlab.Prediction) and len(answer.top) == 1
    assert answer.label == clf.classes[answer.index] and answer.image.shape == (28, 28)
    assert "array(" not in repr(answer)  # the view is there, but a notebook prints the answer, not 784 numbers
    grey = np.asarray(pictures()[0], dtype=np.float32) / 255  # floats in [0, 1]: the same picture, to a grey level
    assert np.abs(clf.predict(grey).image.astype(int) - answer.image.astype(int)).max() <= 1
    blank = clf.predict(np.full((50, 50), 255, np.uint8))
    assert blank.status == "blank" and blank.label is None


def test_logits_of_prepared_images_are_the_models(run):
    clf = mnistlab.load(run)
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        expected = clf.model(to_input(images, clf.meta["mean"], clf.meta["std"]))
    assert torch.equal(clf.logits(images), expected) and torch.equal(clf.logits(images.numpy()), expected)
    assert clf.logits(images[0]).shape == (1, 10)
    assert clf.classes == list("0123456789") and clf.config["model"] == "mlp"
    assert isinstance(clf.model, torch.nn.Module) and clf.temperature == 0.1 and clf.threshold == 0.22


@pytest.mark.parametrize("bad, words", [
    (lambda: torch.zeros(2, 28, 28), "expected uint8 images (N, 28, 28), got (2, 28, 28) torch.float32"),
    (lambda: np.zeros((2, 32, 32), np.uint8), "got (2, 32, 32) torch.uint8"),
    (lambda: [[0] * 28] * 28, "got list"),
])
def test_logits_refuse_what_is_not_prepared_images(run, bad, words):
    with pytest.raises(mnistlab.MnistlabError, match=re.escape(words)):
        mnistlab.load(run).logits(bad())


@pytest.mark.parametrize("bad, words", [
    ("nowhere.png", "nowhere.png: not a readable PNG, JPEG or BMP image"),
    (np.zeros((4, 4, 2), np.uint8), "picture 0: a 4x4x2 array of uint8"),
    (np.full((8, 8), 2.0), "picture 0: a 8x8 float array: its values must lie in [0, 1]"),
    (42, "picture 0: a int: give a file path, a PIL image or a numpy array"),
])
def test_a_picture_that_cannot_be_read_is_one_error(run, bad, words):
    with pytest.raises(mnistlab.MnistlabError, match=re.escape(words)):
        mnistlab.load(run).predict(bad)
    with pytest.raises(mnistlab.MnistlabError, match="top=0"):
        mnistlab.load(run).predict(pictures()[0], top=0)


def _damaged_checkpoint(d: Path) -> Path:
    run = fake_run(d / "damaged")
    data = bytearray((run / CHECKPOINT).read_bytes())
    data[-10] ^= 0xFF  # inside the last tensor: the layout is fine, the checksum is not
    (run / CHECKPOINT).write_bytes(bytes(data))
    return run


def _without_checkpoint(d: Path) -> Path:
    run = fake_run(d / "lost")
    (run / CHECKPOINT).unlink()
    return run


def _unfinished(d: Path) -> Path:
    (d / "unfinished").mkdir()
    (d / "unfinished" / CONFIG).write_text(TrainConfig(dataset="digits").to_json())
    return d / "unfinished"


BAD_FOLDERS = {
    "missing path": (lambda d: d / "nowhere", "no such run folder"),
    "a file": (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "not a folder"),
    "empty folder": (lambda d: (d / "empty").mkdir() or d / "empty", "an empty folder, not a run folder"),
    "only the lock": (lambda d: (d / "l").mkdir() or (d / "l" / LOCK).touch() or d / "l", "holds only .lock"),
    "not a run": (lambda d: (d / "n").mkdir() or (d / "n" / "a.txt").write_text("x") and d / "n",
                  "not a run folder (no config.json, no checkpoint.safetensors)"),
    "damaged checkpoint": (_damaged_checkpoint, "the file is damaged"),
    "pre-training run": (lambda d: fake_run(d / "pre", kind=PRETRAIN_KIND), "a pre-training run (an encoder"),
    "checkpoint missing": (_without_checkpoint, "its checkpoint is missing"),
    "unfinished run": (_unfinished, "never finished an epoch"),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_load_refuses_each_bad_folder_in_one_line_and_writes_nothing(tmp_path, case):
    make, words = BAD_FOLDERS[case]
    path = make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(mnistlab.MnistlabError) as caught:
        mnistlab.load(path)
    message = str(caught.value)
    assert words in message and str(path) in message and "\n" not in message, message
    assert snapshot(tmp_path) == before


def test_the_cli_uses_the_same_exception_type():
    from mnistlab.errors import UserError

    assert mnistlab.MnistlabError is UserError


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(a run folder, its export as a model folder), made once for the module."""
    from mnistlab.deploy.model_folder import export_model_folder

    run = fake_run(tmp_path_factory.mktemp("exported") / "run", model="cnn")
    folder, _ = export_model_folder(run, run.parent / "hf")
    return run, folder


@pytest.fixture
def model_folder(tmp_path, exported) -> tuple[Path, Path]:
    """A copy of the exported (run, model folder) that a test may damage."""
    run, folder = (Path(shutil.copytree(p, tmp_path / p.name)) for p in exported)
    return run, folder


def test_a_model_folder_loads_with_the_runs_logits_and_answers(tmp_path, model_folder):
    run, folder = model_folder
    from_run, from_folder = mnistlab.load(run), mnistlab.load(folder)
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(from_folder.logits(images), from_run.logits(images))
    assert (from_folder.temperature, from_folder.threshold, from_folder.classes) == (0.1, 0.22, from_run.classes)
    answers = [[dict(p.to_dict(), path=None) for p in clf.predict(pictures(), top=3)]
               for clf in (from_run, from_folder)]
    assert answers[0] == answers[1]


@pytest.mark.parametrize("damage, words", [
    (lambda f: f.joinpath("model.safetensors").write_bytes(
        (lambda b: b[:-10] + bytes([b[-10] ^ 0xFF]) + b[-9:])(f.joinpath("model.safetensors").read_bytes())),
     "the file is damaged"),
    (lambda f: f.joinpath("config.json").write_text(
        json.dumps(dict(json.loads(f.joinpath("config.json").read_text()), architecture="nosuchnet"))),
     "unknown model 'nosuchnet'"),
    (lambda f: f.joinpath("config.json").write_text(
        json.dumps(dict(json.loads(f.joinpath("config.json").read_text()), model_args={"widths": [8, 16, 32]}))),
     "do not fit"),
    (lambda f: f.joinpath("model.safetensors").unlink(), "no model.safetensors"),
])
def test_a_damaged_model_folder_is_one_error_and_nothing_is_written(tmp_path, model_folder, damage, words):
    _, folder = model_folder
    damage(folder)
    before = snapshot(tmp_path)
    with pytest.raises(mnistlab.MnistlabError) as caught:
        mnistlab.load(folder)
    assert words in str(caught.value) and "\n" not in str(caught.value), caught.value
    assert snapshot(tmp_path) == before


def test_train_takes_the_train_commands_flags_as_keywords():
    from mnistlab.api import train_args

    flags = dict(dataset="digits", model="mlp", epochs=2, lr=0.05, model_arg={"widths": [16, 32], "activation": "gelu"},
                 deterministic=True, augment="shift", run_dir="runs/x", quiet_flags_are_not_here=None)
    flags.pop("quiet_flags_are_not_here")
    argv = ["train", "--dataset", "digits", "--model", "mlp", "--epochs", "2", "--lr", "0.05", "--model-arg",
            "widths=[16, 32]", "--model-arg", "activation=gelu", "--deterministic", "--augment", "shift",
            "--run-dir", "runs/x"]
    assert vars(train_args(flags)) == vars(build_parser().parse_args(argv))
    assert not train_args(dict(deterministic=False)).deterministic


@pytest.mark.parametrize("flags, argv", [
    (dict(epochs=0), ["--epochs", "0"]),
    (dict(optimizer="adamm"), ["--optimizer", "adamm"]),
    (dict(lr="fast"), ["--lr", "fast"]),
])
def test_a_bad_flag_value_is_the_commands_own_message(tmp_path, monkeypatch, capsys, flags, argv):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["train", *argv])
    command = capsys.readouterr().err.strip().splitlines()[-1].split("error: ", 1)[1]
    with pytest.raises(mnistlab.MnistlabError) as caught:
        mnistlab.train(**flags)
    assert str(caught.value) == command
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, words", [
    (dict(epoks=3), "unknown flag --epoks; did you mean --epochs?"),
    (dict(zzz=1), "unknown flag --zzz; `mnistlab train --help` lists the flags"),
    (dict(deterministic="yes"), "--deterministic is a switch: give True or False, not 'yes'"),
    (dict(model="nosuchnet", dataset="digits"), "unknown model 'nosuchnet'"),
    (dict(model="vit", recipe="fast", dataset="digits"), "--recipe fast is a recipe for --model cnn"),
])
def test_a_bad_flag_is_one_error_before_anything_is_written(tmp_path, monkeypatch, flags, words):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(mnistlab.MnistlabError, match=re.escape(words)):
        mnistlab.train(**flags)
    assert list(tmp_path.iterdir()) == []  # no runs/, no folder


def test_mnistlab_train_stays_the_function_once_the_training_module_is_imported():
    import mnistlab.training as training_module

    assert mnistlab.train is not training_module and mnistlab.train.__module__ == "mnistlab"
    assert callable(training_module.train)  # the function `mnistlab train` runs is still there
    with pytest.raises(mnistlab.MnistlabError, match="unknown flag --epoks"):
        mnistlab.train(epoks=1)


@pytest.mark.slow
def test_train_writes_the_commands_run_folder_and_quiet_is_quiet(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = mnistlab.train(dataset="digits", model="linear", epochs=1, threads=1, seed=3, quiet=True)
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert run.path.parent == Path("runs") and run.path.is_dir()
    assert run.results == json.loads((run.path / RESULTS).read_text())
    assert {"config.json", "env.json", "metrics.jsonl", "checkpoint.safetensors", "results.json",
            "calibration.json"} <= {p.name for p in run.path.iterdir()}
    assert run.record.config()["seed"] == 3 and len(run.record.metrics()) == 1
    assert main(["train", "--dataset", "digits", "--model", "linear", "--epochs", "1", "--threads", "1", "--seed",
                 "3", "--run-dir", "cli"]) == 0
    by_cli = json.loads(Path("cli", RESULTS).read_text())
    assert by_cli["test_accuracy"] == run.results["test_accuracy"]  # same flags, same seed: the same run
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    assert torch.equal(run.load().logits(images), mnistlab.load("cli").logits(images))


def readme_snippet() -> str:
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_snippet_uses_only_what_the_package_offers():
    code = readme_snippet()
    used = set(re.findall(r"mnistlab\.(\w+)", code))
    assert used and used <= set(mnistlab.__all__), used - set(mnistlab.__all__)


@pytest.mark.slow
def test_the_readme_python_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # its run goes to tmp_path/runs
    namespace: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), namespace)
    assert isinstance(namespace["clf"], mnistlab.Classifier)
    assert namespace["answer"].status in ("ok", "unsure") and len(namespace["answer"].top) == 3
    assert namespace["run"].path.parent == Path("runs")
    out = capsys.readouterr().out
    assert f"{namespace['answer'].label} " in out and "torch.Size" not in out


def test_an_uncalibrated_model_folder_says_so_once_and_how_to_fit_it(tmp_path, capsys):
    from mnistlab.deploy.model_folder import export_model_folder

    folder, _ = export_model_folder(fake_run(tmp_path / "run", calibrated=False), tmp_path / "hf")
    capsys.readouterr()
    clf = mnistlab.load(folder)
    err = capsys.readouterr().err
    assert clf.threshold is None and clf.temperature == 1.0 and err.count("\n") == 1
    assert "no calibration" in err and "on the run it came from" in err and f"calibrate {folder}" not in err


def test_the_package_ships_its_type_marker():
    import tomllib

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["mnistlab"] and (ROOT / "mnistlab" / "py.typed").is_file()


def test_predict_and_serve_take_a_model_folder_as_they_take_its_run(tmp_path, model_folder, capsys):
    from mnistlab.deploy.serve.server import load_models

    run, folder = model_folder
    pictures()[0].save(tmp_path / "p.png")
    answers = []
    for path in (run, folder):
        capsys.readouterr()
        assert main(["predict", str(path), str(tmp_path / "p.png"), "--json"]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert answers[0] == answers[1]
    served = load_models([str(folder)])
    assert list(served) == ["hf"] and served["hf"].threshold == 0.22
