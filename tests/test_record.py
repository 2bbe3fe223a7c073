"""RunRecord, the one reader of a run folder: each file read as training wrote it, every fault one UserError line
naming the path (never a KeyError), nothing written; and the import direction it exists for: nothing outside
training imports the training module, and `import mnistlab` stays cheap."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnistlab.calibration import CALIBRATION, FORMAT
from mnistlab.checkpoint import CHECKPOINT, PRETRAIN_KIND, save_checkpoint
from mnistlab.config import TrainConfig
from mnistlab.errors import UserError
from mnistlab.models import create_model
from mnistlab.record import DamagedRunFile, MissingRunFile, NotARunFolder, RunRecord
from mnistlab.run import CONFIG, ENV, LOCK, METRICS, RESULTS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mnistlab"


def fake_run(folder: Path, *, step: int = 7, kind: str | None = None) -> Path:
    """A run folder as training leaves it, without training: an untrained MLP's checkpoint and every JSON file."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(dataset="digits", model="mlp")
    meta = dict(model="mlp", model_kwargs={}, in_chans=1, num_classes=10, classes=list("0123456789"), mean=0.25,
                std=0.3, config=cfg.to_dict(), step=step)
    if kind is not None:
        meta["kind"] = kind
    torch.manual_seed(0)
    save_checkpoint(folder / CHECKPOINT, create_model("mlp").eval(), meta)
    (folder / CONFIG).write_text(cfg.to_json())
    (folder / ENV).write_text(json.dumps(dict(torch=torch.__version__, git_commit="abc")))
    (folder / METRICS).write_text("".join(json.dumps(dict(epoch=e, train_loss=1.0 / e)) + "\n" for e in (1, 2)))
    (folder / RESULTS).write_text(json.dumps(dict(test_accuracy=0.75, test_loss=0.6)))
    (folder / CALIBRATION).write_text(json.dumps(dict(format=FORMAT, step=step, temperature=1.5, threshold=0.4)))
    return folder


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time: reading must leave this unchanged."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.is_dir() else {}


def test_each_reader_reads_what_the_run_wrote(tmp_path):
    run = fake_run(tmp_path / "run")
    before = snapshot(run)
    record = RunRecord(run)
    assert record.config()["model"] == "mlp" and record.config()["dataset"] == "digits"
    assert record.env()["git_commit"] == "abc"
    assert [m["epoch"] for m in record.metrics()] == [1, 2]
    assert record.results()["test_accuracy"] == 0.75
    calibration, why_not = record.calibration(7)
    assert calibration["temperature"] == 1.5 and why_not == ""
    assert record.calibration(8)[0] is None and "another checkpoint" in record.calibration(8)[1]
    model, meta = record.load_model()
    assert meta["step"] == 7 and meta["classes"] == list("0123456789") and not model.training
    assert not record.is_pretraining()
    assert snapshot(run) == before  # reading writes nothing


def test_the_model_is_the_checkpoints_weights(tmp_path):
    run = fake_run(tmp_path / "run")
    torch.manual_seed(0)
    original = create_model("mlp").eval()
    model, _ = RunRecord(run).load_model()
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x), original(x))


@pytest.mark.parametrize("damage, error, words", [
    (lambda r: (r / RESULTS).unlink(), MissingRunFile, "no results.json (not a finished run); `mnistlab train"),
    (lambda r: (r / RESULTS).write_text("{not json"), DamagedRunFile, "results.json: not readable JSON"),
    (lambda r: (r / RESULTS).write_text("[1, 2]"), DamagedRunFile, "results.json: not a JSON object (a list)"),
    (lambda r: (r / RESULTS).write_bytes(b"\xff\xfe\x00"), DamagedRunFile, "results.json: not readable JSON"),
])
def test_a_missing_or_damaged_file_is_one_line_naming_it(tmp_path, damage, error, words):
    run = fake_run(tmp_path / "run")
    damage(run)
    with pytest.raises(error) as caught:
        RunRecord(run).results()
    assert words in str(caught.value) and str(run) in str(caught.value) and "\n" not in str(caught.value)


def test_a_damaged_env_or_config_is_damaged_not_a_key_error(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / ENV).write_text('"a string"')
    (run / CONFIG).write_text("")
    with pytest.raises(DamagedRunFile, match="env.json: not a JSON object"):
        RunRecord(run).env()
    with pytest.raises(DamagedRunFile, match="config.json: not readable JSON"):
        RunRecord(run).config()
    (run / METRICS).write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(UserError, match="metrics.jsonl: line 2 is not a JSON record"):
        RunRecord(run).metrics()


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "nowhere", "no such run folder"),
    (lambda d: (d / "file.txt").write_text("x") and d / "file.txt", "not a folder"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "an empty folder, not a run folder"),
    (lambda d: (d / "locked").mkdir() or (d / "locked" / LOCK).touch() or d / "locked", "holds only .lock"),
    (lambda d: (d / "notes").mkdir() or (d / "notes" / "todo.txt").write_text("x") and d / "notes",
     "not a run folder (no config.json, no checkpoint.safetensors)"),
])
def test_what_is_no_run_folder_is_refused_in_one_line(tmp_path, make, words):
    path = make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(NotARunFolder) as caught:
        RunRecord(path).load_model()
    assert str(caught.value).startswith(f"{path}: ") and words in str(caught.value)
    assert snapshot(tmp_path) == before


def test_a_training_run_without_its_checkpoint_says_which_kind_of_missing(tmp_path):
    finished = fake_run(tmp_path / "finished")
    (finished / CHECKPOINT).unlink()
    with pytest.raises(MissingRunFile, match="its checkpoint is missing"):
        RunRecord(finished).load_model()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / CONFIG).write_text(TrainConfig(dataset="digits").to_json())
    with pytest.raises(MissingRunFile, match="never finished an epoch"):
        RunRecord(unfinished).load_model()


def test_a_pre_training_run_has_no_classifier_to_load(tmp_path):
    run = fake_run(tmp_path / "pre", kind=PRETRAIN_KIND)
    with pytest.raises(UserError, match="a pre-training run .*mnistlab train --model mlp --init"):
        RunRecord(run).load_model()


def test_a_damaged_checkpoint_is_refused_by_its_checksum(tmp_path):
    run = fake_run(tmp_path / "run")
    data = bytearray((run / CHECKPOINT).read_bytes())
    data[-10] ^= 0xFF  # inside the last tensor
    (run / CHECKPOINT).write_bytes(bytes(data))
    with pytest.raises(UserError, match="the file is damaged"):
        RunRecord(run).load_model()


def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, at any depth (lazy imports inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_nothing_outside_training_imports_the_training_module():
    readers = [*sorted((PACKAGE / "deploy").rglob("*.py")), *sorted((PACKAGE / "inspect").rglob("*.py")),
               PACKAGE / "record.py", PACKAGE / "api.py", PACKAGE / "cli.py", ROOT / "bench" / "serve_load.py"]
    offenders = []
    for path in readers:
        imported = _imported_modules(path)
        if path.name == "cli.py":  # `mnistlab train` itself trains; everything else in the CLI reads runs
            imported -= {"mnistlab.training", "mnistlab.training.train"}
        if {"mnistlab.training", "mnistlab.training.load_run_checkpoint"} & imported:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
    assert "load_run_checkpoint" not in (PACKAGE / "training.py").read_text()


def test_the_run_reader_imports_nothing_above_it():
    imported = {m for m in _imported_modules(PACKAGE / "record.py") if m.startswith("mnistlab")}
    allowed = ("mnistlab.errors", "mnistlab.run", "mnistlab.checkpoint", "mnistlab.config", "mnistlab.calibration",
               "mnistlab.models", "mnistlab.files", "mnistlab.scratch.train")
    assert imported and all(m.startswith(allowed) for m in imported), imported


@pytest.mark.slow  # starts a process
def test_importing_mnistlab_and_its_readers_stays_cheap():
    code = ("import sys, mnistlab, mnistlab.record, mnistlab.api; mnistlab.MnistlabError; mnistlab.RunRecord; "
            "heavy = sorted({'torch', 'numpy', 'matplotlib', 'PIL'} & set(sys.modules)); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_model_folder_given_as_a_run_says_what_it_is(tmp_path):
    from mnistlab.deploy.model_folder import WEIGHTS
    from mnistlab.record import MODEL_FOLDER_WEIGHTS

    assert MODEL_FOLDER_WEIGHTS == WEIGHTS
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / WEIGHTS).write_bytes(b"")
    (folder / CONFIG).write_text(json.dumps({"library_name": "mnistlab"}))
    with pytest.raises(MissingRunFile, match="an exported model folder, not a run folder"):
        RunRecord(folder).load_model()
