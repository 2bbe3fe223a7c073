"""The user who breaks things: concurrent runs, edited or damaged files, full disks, absurd values.

Every case asserts the exit status, a one-line message with no traceback, and that nothing that
existed before was changed or lost (the run folder is hashed before and after).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mnistlab.cli import main
from mnistlab.run import RunFolder

QUICK = ["--dataset", "digits", "--model", "linear", "--batch-size", "64", "--threads", "1"]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, one thread


def folder_hash(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir()) if p.is_file()}


def one_line_error(capsys, code_text: str | None = None) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("mnistlab: error:")]
    assert len(lines) == 1, err
    if code_text:
        assert code_text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *QUICK, "--epochs", "2", "--run-dir", str(run)]) == 0
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


# ---- one writer per run folder ---------------------------------------------------------------------

@pytest.mark.slow  # trains (the finished_run fixture)
def test_a_live_run_folder_refuses_a_second_writer(run_copy, capsys):
    before = folder_hash(run_copy)
    with RunFolder.open(run_copy):  # another process would hold this lock for the life of its run
        assert main(["train", "--resume", str(run_copy)]) == 2
        one_line_error(capsys, "being written by another running")
        assert main(["train", *QUICK, "--run-dir", str(run_copy)]) == 2
        one_line_error(capsys, "being written by another running")
    assert folder_hash(run_copy) == before


@pytest.mark.slow  # starts a process
def test_a_killed_writer_leaves_no_stale_lock(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from mnistlab.run import RunFolder
        RunFolder.open({str(run)!r}); print("locked", flush=True); time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", *QUICK, "--epochs", "1", "--run-dir", str(run)]) == 2
        one_line_error(capsys, "being written by another running")
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
        holder.wait()
    assert main(["train", *QUICK, "--epochs", "1", "--run-dir", str(run)]) == 0
    assert (run / "results.json").exists()


def test_default_run_folders_started_in_the_same_second_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = [RunFolder.create(None, "digits", "linear") for _ in range(3)]
    try:
        assert len({r.path for r in runs}) == 3
    finally:
        for r in runs:
            r.close()


# ---- resume trusts the checkpoint ------------------------------------------------------------------

@pytest.mark.slow  # trains (the finished_run fixture)
@pytest.mark.parametrize("edit", [dict(epochs=5), dict(batch_size=32), dict(schedule="cosine"), dict(lr=0.5)])
def test_resume_refuses_a_config_json_that_disagrees_with_the_checkpoint(run_copy, capsys, edit):
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg.update(edit)
    (run_copy / "config.json").write_text(json.dumps(cfg))
    (run_copy / "results.json").unlink()  # not finished, so resume would train
    before = folder_hash(run_copy)
    assert main(["train", "--resume", str(run_copy)]) == 2
    key = next(iter(edit))
    one_line_error(capsys, f"config.json says {key}=")
    assert folder_hash(run_copy) == before


@pytest.mark.slow  # trains (the finished_run fixture)
def test_resume_refuses_an_unknown_value_in_config_json(run_copy, capsys):
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg["schedule"] = "cosin"
    (run_copy / "config.json").write_text(json.dumps(cfg))
    before = folder_hash(run_copy)
    assert main(["train", "--resume", str(run_copy)]) == 2
    one_line_error(capsys, "schedule = 'cosin'")
    assert folder_hash(run_copy) == before


@pytest.mark.slow  # trains a model
def test_resume_of_a_finished_run_changes_nothing(run_copy, capsys):
    before = folder_hash(run_copy)
    assert main(["train", "--resume", str(run_copy)]) == 0
    out = capsys.readouterr().out
    assert "finished all 2 epochs; nothing to resume" in out
    assert folder_hash(run_copy) == before


@pytest.mark.slow
def test_orphan_temp_files_of_a_killed_write_are_removed_on_resume(tmp_path):
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-m", "mnistlab", "train", *QUICK, "--epochs", "2",
                             "--run-dir", str(run)], capture_output=True, text=True,
                            env=dict(os.environ, MNISTLAB_TEST_KILL="step:25"))
    assert killed.returncode == -9, killed.stderr
    orphan = run / ".checkpoint.safetensors.k1ll3d.tmp"
    orphan.write_bytes(b"\0" * 1000)
    resumed = subprocess.run([sys.executable, "-m", "mnistlab", "train", "--resume", str(run)],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert not orphan.exists() and "removed .checkpoint.safetensors.k1ll3d.tmp" in resumed.stderr
    assert not list(run.glob(".*.tmp"))


# ---- damaged checkpoints ----------------------------------------------------------------------------

def flip_a_byte_in_tensor_data(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 + header_len + 100] ^= 0x40  # inside the first tensor's bytes
    path.write_bytes(bytes(data))


@pytest.mark.slow  # trains (the finished_run fixture)
def test_flipped_bytes_in_tensor_data_are_refused_by_eval_and_resume(run_copy, capsys):
    flip_a_byte_in_tensor_data(run_copy / "checkpoint.safetensors")
    (run_copy / "results.json").unlink()
    before = folder_hash(run_copy)
    assert main(["eval", str(run_copy)]) == 2
    one_line_error(capsys, "does not match the checksum")
    assert main(["train", "--resume", str(run_copy)]) == 2
    one_line_error(capsys, "does not match the checksum")
    assert folder_hash(run_copy) == before


def rewrite_checkpoint(path: Path, edit_meta=None, edit_tensors=None) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mnistlab.checkpoint import payload_sha256

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["mnistlab"])
    tensors = load_file(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    meta["payload_sha256"] = payload_sha256(tensors)  # a consistent file whose content does not fit
    save_file(tensors, path, metadata={"mnistlab": json.dumps(meta)})


@pytest.mark.slow  # trains (the finished_run fixture)
@pytest.mark.parametrize("case", ["other model", "missing tensor", "missing key"])
def test_a_checkpoint_that_does_not_fit_its_model_is_one_clear_line(run_copy, capsys, case):
    ckpt = run_copy / "checkpoint.safetensors"
    if case == "other model":
        rewrite_checkpoint(ckpt, edit_meta=lambda m: m.update(model="mlp"))
        expected = "does not fit the model"
    elif case == "missing tensor":
        rewrite_checkpoint(ckpt, edit_tensors=lambda t: t.pop(next(k for k in t if k.startswith("model/"))))
        expected = "does not fit the model"
    else:
        rewrite_checkpoint(ckpt, edit_meta=lambda m: m.pop("num_classes"))
        expected = "lacks num_classes"
    (run_copy / "results.json").unlink()  # so that resume has work to do and must load the weights
    before = folder_hash(run_copy)
    assert main(["eval", str(run_copy)]) == 2
    one_line_error(capsys, expected)
    assert main(["train", "--resume", str(run_copy)]) == 2
    one_line_error(capsys)
    assert folder_hash(run_copy) == before


@pytest.mark.slow  # trains (the finished_run fixture)
@pytest.mark.parametrize("content", [None, "", "{not json", "[1, 2]"])
def test_eval_needs_only_the_checkpoint_not_config_json(run_copy, capsys, content):
    cfg = run_copy / "config.json"
    if content is None:
        cfg.unlink()
    else:
        cfg.write_text(content)
    results = json.loads((run_copy / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run_copy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == results["test_accuracy"]


@pytest.mark.slow  # trains (the finished_run fixture)
def test_resume_with_a_malformed_metrics_file_is_one_clear_line(run_copy, capsys):
    (run_copy / "results.json").unlink()
    (run_copy / "metrics.jsonl").write_text("{garbage\n")
    before = folder_hash(run_copy)
    assert main(["train", "--resume", str(run_copy)]) == 2
    one_line_error(capsys, "metrics.jsonl: line 1 is not a JSON record")
    assert folder_hash(run_copy) == before


# ---- a full disk ------------------------------------------------------------------------------------

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.slow  # trains an epoch or two before the disk fills
@pytest.mark.parametrize("target", ["checkpoint.safetensors", "results.json"])
def test_a_full_disk_while_writing_is_one_line_and_keeps_the_previous_file(tmp_path, capsys, monkeypatch, target):
    import mnistlab.files

    run = tmp_path / "run"
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        # the disk fills up after the first checkpoint: every later write of the target fails
        if Path(dst).name == target and (target == "results.json" or Path(dst).exists()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(mnistlab.files.os, "replace", replace)
    assert main(["train", *QUICK, "--epochs", "2", "--run-dir", str(run)]) == 2
    one_line_error(capsys, f"cannot write {run / target}: No space left on device")
    assert not list(run.glob(".*.tmp"))  # no half-written temp file left behind
    from mnistlab.checkpoint import read_checkpoint

    _, meta = read_checkpoint(run / "checkpoint.safetensors")  # the last good checkpoint, intact
    assert meta["step"] == (21 if target == "checkpoint.safetensors" else 42)
    assert not (run / "results.json").exists()


@pytest.mark.slow  # trains an epoch or two before the disk fills
def test_a_full_disk_while_appending_metrics_is_one_line(tmp_path, capsys, monkeypatch):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    real_start = RunFolder.start_metrics

    def start_then_fill_the_disk(self):
        real_start(self)
        self.file("metrics.jsonl").unlink()
        self.file("metrics.jsonl").symlink_to("/dev/full")  # a real device: every write fails with ENOSPC

    monkeypatch.setattr(RunFolder, "start_metrics", start_then_fill_the_disk)
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "1", "--run-dir", str(run)]) == 2
    one_line_error(capsys, f"cannot write {run / 'metrics.jsonl'}: No space left on device")


# ---- absurd values and resources ----------------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--seed", "99999999999999999999999"], ["--seed", "-1"], ["--threads", "0"],
                                   ["--epochs", "3.5"], ["--val-size", "0"], ["--eval-batch-size", "-5"]])
def test_out_of_range_numbers_are_refused_by_the_parser(flags, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *QUICK, *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


@pytest.mark.slow  # trains a model
def test_threads_beyond_the_cores_are_capped_with_a_warning(tmp_path, capsys):
    run = tmp_path / "run"
    flags = [f for f in QUICK if f not in ("--threads", "1")]
    assert main(["train", *flags, "--epochs", "1", "--threads", "999", "--run-dir", str(run)]) == 0
    assert f"--threads 999 is more than the {os.cpu_count()} cores" in capsys.readouterr().err
    assert json.loads((run / "env.json").read_text())["torch_threads"] == os.cpu_count()


def test_a_batch_that_does_not_fit_in_memory_is_one_line(tmp_path, capsys, monkeypatch):
    from mnistlab.models.linear import SoftmaxRegression

    def oom(self, x):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 98304000000 bytes.")

    monkeypatch.setattr(SoftmaxRegression, "forward", oom)
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "1", "--run-dir", str(run)]) == 2
    one_line_error(capsys, "a batch of 64 images does not fit in memory on cpu")


def _out_of_memory_at_the_first_step(monkeypatch) -> None:
    from mnistlab.models.linear import SoftmaxRegression

    def oom(self, x):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 98304000000 bytes.")

    monkeypatch.setattr(SoftmaxRegression, "forward", oom)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path, capsys, monkeypatch):
    _out_of_memory_at_the_first_step(monkeypatch)
    monkeypatch.chdir(tmp_path)
    for where in (["--run-dir", str(tmp_path / "given" / "run")], []):  # a folder it names, and runs/<time>-...
        assert main(["train", *QUICK, "--epochs", "1", *where]) == 2
        one_line_error(capsys, "does not fit in memory")
    assert not (tmp_path / "given" / "run").exists() and list((tmp_path / "runs").iterdir()) == []


def test_a_failed_run_in_an_existing_folder_removes_only_what_it_wrote(tmp_path, capsys, monkeypatch):
    _out_of_memory_at_the_first_step(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert main(["train", *QUICK, "--epochs", "1", "--run-dir", str(run)]) == 2
    one_line_error(capsys, "does not fit in memory")
    assert [p.name for p in run.iterdir()] == ["notes.txt"]


# ---- output a user can keep -------------------------------------------------------------------------

@pytest.mark.slow
def test_epoch_lines_and_result_go_to_stdout_and_files_get_normal_permissions(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(["sh", "-c", f"umask 022 && exec {sys.executable} -m mnistlab train "
                           f"{' '.join(QUICK)} --epochs 2 --run-dir {run}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert [ln.split()[1] for ln in out if ln.startswith("epoch ")] == ["1/2", "2/2"]
    assert out[-1].startswith("test accuracy ")
    assert "epoch 1/2" not in proc.stderr  # notes and progress only
    assert max(len(ln) for ln in proc.stderr.splitlines()) <= 200  # the config is readable, not one long line
    for p in run.iterdir():
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, p.name
    def refuse(constant):
        pytest.fail(f"{constant} in a JSON file")

    for name in ("config.json", "env.json", "results.json"):
        json.loads((run / name).read_text(), parse_constant=refuse)


def test_every_json_file_is_strict_json():
    from mnistlab.files import to_json

    with pytest.raises(ValueError):
        to_json({"loss": float("nan")})
    assert to_json({"loss": 1.5}, indent=None) == '{"loss": 1.5}'


def test_checkpoint_payload_hash_covers_every_tensor(tmp_path):
    from mnistlab.checkpoint import payload_sha256

    a = {"x": torch.zeros(3), "y": torch.ones(2, dtype=torch.int64)}
    b = {"x": torch.zeros(3), "y": torch.tensor([1, 2])}
    c = {"x": torch.zeros(3).reshape(1, 3), "y": torch.ones(2, dtype=torch.int64)}
    assert len({payload_sha256(a), payload_sha256(b), payload_sha256(c)}) == 3


# ---- found in review ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mnistlab", "train", *QUICK, "--epochs", "1", "--run-dir", str(run)]
    killed = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MNISTLAB_TEST_KILL="step:5"))
    assert killed.returncode == -9 and not (run / "checkpoint.safetensors").exists()
    again = subprocess.run(cmd, capture_output=True, text=True)  # a new run is refused: the folder holds one
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = subprocess.run([sys.executable, "-m", "mnistlab", "train", "--resume", str(run)],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "starting it again from step 0" in resumed.stderr and (run / "results.json").exists()


@pytest.mark.slow  # trains a model
def test_the_largest_accepted_seed_trains(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "1", "--seed", str(2**63 - 1), "--run-dir", str(run)]) == 0


@pytest.mark.parametrize("value", [10**400, -(10**400)])
def test_an_enormous_number_in_config_json_is_one_clear_line(tmp_path, value):
    from mnistlab.config import TrainConfig
    from mnistlab.errors import UserError

    d = TrainConfig().to_dict()
    d["lr"] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="lr = "):
        TrainConfig.load(tmp_path / "config.json")


@pytest.mark.slow  # trains (the finished_run fixture)
def test_resuming_a_checkpoint_of_an_older_format_is_one_clear_line(run_copy, capsys):
    rewrite_checkpoint(run_copy / "checkpoint.safetensors",
                       edit_meta=lambda m: [m.pop(k) for k in ("epoch_loss_sum", "epoch_correct", "format_version")])
    (run_copy / "results.json").unlink()
    before = folder_hash(run_copy)
    assert main(["train", "--resume", str(run_copy)]) == 2
    one_line_error(capsys, "written by an older mnistlab, format 1")
    assert folder_hash(run_copy) == before


@pytest.mark.slow  # trains a model
def test_resuming_a_finished_run_needs_no_data(tmp_path, idx_dir, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(idx_dir, data)
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(data), "--model", "linear", "--epochs", "1", "--val-size", "20",
                 "--run-dir", str(run)]) == 0
    shutil.rmtree(data)  # the data is gone (or the network is): a finished run still says so, exit 0
    before = folder_hash(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--threads", "1"]) == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert folder_hash(run) == before


@pytest.mark.slow  # trains a model
def test_only_mnistlab_temp_files_are_removed_from_a_run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    theirs = run / ".someone-elses.tmp"
    ours = run / ".metrics.jsonl.abc123.tmp"
    theirs.write_text("keep me")
    ours.write_text("left by a kill")
    assert main(["train", *QUICK, "--epochs", "1", "--run-dir", str(run)]) == 0
    assert theirs.read_text() == "keep me" and not ours.exists()


def test_out_of_memory_in_the_optimizer_step_is_one_line(tmp_path, capsys, monkeypatch):
    def oom(self, *args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4000000000 bytes.")

    monkeypatch.setattr(torch.optim.AdamW, "step", oom)
    assert main(["train", *QUICK, "--epochs", "1", "--run-dir", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "does not fit in memory")


def test_a_runtime_error_that_is_not_about_memory_is_not_called_one(tmp_path, monkeypatch):
    from mnistlab.models.linear import SoftmaxRegression

    def bug(self, x):
        raise RuntimeError("channels_last memory format is not supported here")

    monkeypatch.setattr(SoftmaxRegression, "forward", bug)
    with pytest.raises(RuntimeError, match="memory format"):
        main(["train", *QUICK, "--epochs", "1", "--run-dir", str(tmp_path / "run")])


def test_a_metrics_record_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    run = RunFolder.create(str(tmp_path / "run"), "digits", "linear")
    try:
        run.start_metrics()
        run.append_metrics({"epoch": 1, "val_accuracy": 0.5})
        with open(run.file("metrics.jsonl"), "a") as f:
            f.write('{"epoch": 2, "val_acc')  # the kill came mid-append
        assert run.read_metrics() == [{"epoch": 1, "val_accuracy": 0.5}]
    finally:
        run.close()
