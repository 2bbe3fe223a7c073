"""run.py without training: the run folder's life (create, open, lock, clean, follow), its files, and the
helpers around a run (output, metrics, provenance, threads, the allocator, Ctrl-C, test kill points)."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import threading
from types import SimpleNamespace

import pytest

from mnistlab import distributed, run
from mnistlab.errors import UserError
from mnistlab.run import RunFolder, StopFlag, cap_threads, epoch_summary, kill_point_for_tests, read_metrics


@pytest.fixture
def folder(tmp_path):
    with RunFolder.create(str(tmp_path / "run"), "digits", "linear") as r:
        yield r


# ---- creating, opening and locking -----------------------------------------------------------------

def test_create_makes_the_folder_and_its_parents_and_holds_the_lock(tmp_path):
    path = tmp_path / "a" / "b"
    with RunFolder.create(str(path), "digits", "linear") as r:
        assert r.path == path and r.writes and (path / ".lock").exists()
        umask = os.umask(0)
        os.umask(umask)
        assert (path / ".lock").stat().st_mode & 0o777 == 0o666 & ~umask  # anyone may take it after us
        with pytest.raises(UserError, match=r"b is being written by another running `mnistlab train`; wait for it "
                                            r"to end \(or stop it\), or choose another --run-dir$"):
            RunFolder.open(path)
    RunFolder.open(path).close()  # closing released the lock


@pytest.mark.parametrize("existing", ["config.json", "checkpoint.safetensors", "checkpoint-best.safetensors"])
def test_create_refuses_a_folder_that_holds_a_run_and_lets_go_of_its_lock(tmp_path, existing):
    (tmp_path / existing).write_text("{}")
    with pytest.raises(UserError, match=rf"^{tmp_path} already holds a run; continue it with `mnistlab train "
                                        rf"--resume {tmp_path}` or choose another --run-dir$"):
        RunFolder.create(str(tmp_path), "digits", "linear")
    RunFolder.open(tmp_path).close()


def test_create_in_a_folder_without_a_run_removes_only_the_temps_of_run_files(tmp_path, capsys):
    (tmp_path / ".checkpoint.safetensors.k1ll3d.tmp").write_bytes(b"half")
    for name in ("metrics.jsonl", "config.json", "env.json", "results.json", "grad_flow.jsonl"):
        (tmp_path / f".{name}.x.tmp").write_text("")
    (tmp_path / ".notes.txt.x.tmp").write_text("another program's")
    with RunFolder.create(str(tmp_path), "digits", "linear"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", ".notes.txt.x.tmp"]
    err = capsys.readouterr().err
    assert "removed .checkpoint.safetensors.k1ll3d.tmp, left by an interrupted write" in err
    assert "removed .metrics.jsonl.x.tmp" in err


def test_a_run_dir_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^--run-dir .*file/run: cannot create it \(Not a directory\)$"):
        RunFolder.create(str(tmp_path / "file" / "run"), "digits", "linear")


def test_a_folder_where_the_lock_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / ".lock").mkdir()
    with pytest.raises(UserError, match=rf"^{tmp_path}: cannot write there \(Is a directory\)$"):
        RunFolder.open(tmp_path)


def test_without_fcntl_there_is_no_lock_and_the_folder_still_works(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "fcntl", None)  # not POSIX: `import fcntl` fails
    with RunFolder.open(tmp_path) as r, RunFolder.open(tmp_path) as again:
        assert r._lock_fd is None and again._lock_fd is None
        r.write_json("results.json", {"a": 1})
    assert not (tmp_path / ".lock").exists() and json.loads((tmp_path / "results.json").read_text()) == {"a": 1}


def test_open_refuses_a_folder_that_is_not_there(tmp_path):
    with pytest.raises(UserError, match=r"^--resume .*nowhere: no such folder$"):
        RunFolder.open(tmp_path / "nowhere")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="no such folder"):
        RunFolder.open(tmp_path / "file")


def test_open_clears_the_temps_a_killed_write_left(tmp_path, capsys):
    (tmp_path / ".results.json.abc.tmp").write_text("{")
    with RunFolder.open(tmp_path):
        assert not (tmp_path / ".results.json.abc.tmp").exists()
    assert "removed .results.json.abc.tmp" in capsys.readouterr().err


def test_close_twice_is_harmless(folder):
    folder.close()
    folder.close()
    assert folder._lock_fd is None


# ---- default run folders -----------------------------------------------------------------------------

class FixedClock:
    @staticmethod
    def now():
        from datetime import datetime

        return datetime(2026, 1, 2, 3, 4, 5)


def test_default_folders_are_named_by_time_dataset_and_model_then_numbered(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run, "datetime", FixedClock)
    runs = [RunFolder.create(None, "digits", "mlp") for _ in range(3)]
    try:
        assert [str(r.path) for r in runs] == ["runs/20260102-030405-digits-mlp", "runs/20260102-030405-digits-mlp-2",
                                               "runs/20260102-030405-digits-mlp-3"]
        assert all((r.path / ".lock").exists() for r in runs)
    finally:
        for r in runs:
            r.close()


def test_a_thousandth_run_in_the_same_second_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run, "datetime", FixedClock)
    (tmp_path / "runs").mkdir()
    tried = []
    real_mkdir = run.Path.mkdir

    def taken(self, *args, **kwargs):  # every name is already taken, but the 999th when `free` says so
        if self.parent.name != "runs":
            return real_mkdir(self, *args, **kwargs)
        tried.append(self.name)
        if self.name != free:
            raise FileExistsError(17, "File exists")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(run.Path, "mkdir", taken)
    stem, free = "20260102-030405-digits-mlp", None
    with pytest.raises(UserError, match=rf"^runs/{stem}: too many runs started in the same second$"):
        RunFolder.create(None, "digits", "mlp")
    assert tried == [stem] + [f"{stem}-{i}" for i in range(2, 1000)]
    free = f"{stem}-999"
    with RunFolder.create(None, "digits", "mlp") as r:
        assert r.path.name == free


def test_no_runs_folder_here_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("")
    with pytest.raises(UserError, match=r"^cannot create runs/ here \(File exists\); give --run-dir$"):
        RunFolder.create(None, "digits", "mlp")


def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    real_mkdir = run.Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.parent.name == "runs":
            raise PermissionError(13, "Permission denied")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(run.Path, "mkdir", refuse)
    with pytest.raises(UserError, match=r"^cannot create runs/.*-digits-mlp \(Permission denied\)$"):
        RunFolder.create(None, "digits", "mlp")


# ---- the files of a run ------------------------------------------------------------------------------

def test_config_metrics_and_results_are_written_where_a_reader_finds_them(folder, capsys):
    folder.write_config('{"epochs": 2}')
    assert folder.file("config.json").read_text() == '{"epochs": 2}\n'
    folder.start_metrics()
    for epoch in (1, 2, 3):
        folder.append_metrics({"epoch": epoch, "val_loss": 0.5})
    assert [r["epoch"] for r in folder.read_metrics()] == [1, 2, 3]
    folder.keep_metrics(2)  # the checkpoint holds 2 epochs: the third's record goes
    assert [r["epoch"] for r in folder.read_metrics()] == [1, 2]
    folder.start_metrics()
    assert folder.read_metrics() == []
    folder.write_results({"test_accuracy": 0.98765, "test_loss": 0.04321, "val_accuracy": 0.97, "train_seconds": 12.34})
    assert json.loads(folder.file("results.json").read_text())["test_accuracy"] == 0.98765
    assert capsys.readouterr().out == (f"test accuracy 98.77% (loss 0.0432), val 97.00%, 12.3s of training; "
                                       f"results in {folder.path / 'results.json'}\n")


def test_a_follower_writes_nothing_and_holds_no_lock(tmp_path, capsys):
    (tmp_path / ".metrics.jsonl.x.tmp").write_text("")  # rank 0's business, not a follower's
    with RunFolder.follow(str(tmp_path)) as r:
        assert r.path == tmp_path and not r.writes and r._lock_fd is None
        r.clean()
        r.write_config("{}")
        r.write_json("results.json", {})
        r.start_metrics()
        r.append_metrics({"epoch": 1})
        r.keep_metrics(0)
    assert [p.name for p in tmp_path.iterdir()] == [".metrics.jsonl.x.tmp"]
    assert capsys.readouterr().err == ""


def test_read_metrics_of_no_file_is_empty_and_blank_lines_are_skipped(tmp_path):
    assert read_metrics(tmp_path / "metrics.jsonl") == []
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n\n  \n{"epoch": 2}\n')
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"epoch": 1}, {"epoch": 2}]


def test_only_a_last_line_without_its_newline_is_taken_as_torn(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2, "val')
    assert read_metrics(path) == [{"epoch": 1}]
    path.write_text('{"epoch": 1}\n{"epoch": 2, "val\n')  # complete line, broken record: the file is damaged
    with pytest.raises(UserError, match=r"metrics.jsonl: line 2 is not a JSON record; restore the file or start a "
                                        r"new run$"):
        read_metrics(path)
    path.write_text('{"ep\n{"epoch": 2}')  # a broken line before the last is never a torn append
    with pytest.raises(UserError, match="line 1 is not a JSON record"):
        read_metrics(path)


# ---- what a run says -----------------------------------------------------------------------------------

def test_say_goes_to_stdout_and_note_to_stderr_from_rank_0_only(capsys, monkeypatch):
    run.say("result")
    run.note("progress")
    assert capsys.readouterr() == ("result\n", "progress\n")
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    run.say("result")
    run.note("progress")
    assert capsys.readouterr() == ("", "")


def test_an_epoch_line_shows_accuracies_only_when_the_record_has_them():
    record = {"epoch": 3, "train_loss": 0.12345, "val_loss": 0.2, "seconds": 4.56, "images_per_second": 12345.6}
    assert epoch_summary(record, 10) == ("epoch 3/10  train loss 0.1235  val loss 0.2000  4.6s  12,346 img/s")
    record.update(train_accuracy=0.9, val_accuracy=0.875)
    assert epoch_summary(record, 10) == ("epoch 3/10  train loss 0.1235 acc 90.00%  val loss 0.2000 acc 87.50%  "
                                         "4.6s  12,346 img/s")


@pytest.mark.parametrize("asked, used, warned", [(None, None, False), (1, 1, False), (3, 3, False), (4, 3, True)])
def test_threads_beyond_the_cores_this_process_may_use_are_capped_with_a_warning(monkeypatch, capsys, asked, used,
                                                                                  warned):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 7} if pid == 0 else set(range(64)))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's, not this process's share of it
    assert cap_threads(asked) == used
    err = capsys.readouterr().err
    assert (err == "warning: --threads 4 is more than the 3 cores; using 3\n") == warned and (err == "") != warned


def test_cores_come_from_cpu_count_where_affinity_is_unknown(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert cap_threads(4) == 3
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert cap_threads(4) == 1


# ---- provenance --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("result, commit", [
    (SimpleNamespace(returncode=0, stdout="abc123\n"), "abc123"),
    (SimpleNamespace(returncode=0, stdout="\n"), None),
    (SimpleNamespace(returncode=128, stdout="fatal: not a git repository\n"), None),
    (OSError("no git"), None),
    (subprocess.TimeoutExpired("git", 5), None),
])
def test_git_commit_is_the_head_or_none(monkeypatch, result, commit):
    def fake_run(cmd, **kwargs):
        assert cmd == ["git", "rev-parse", "HEAD"]
        assert kwargs == {"cwd": run.Path(run.__file__).parent, "capture_output": True, "text": True, "timeout": 5}
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert run.git_commit() == commit


def test_environment_records_versions_device_code_and_data(monkeypatch):
    import platform
    from datetime import datetime

    import numpy
    import torch

    import mnistlab

    monkeypatch.setattr(run, "git_commit", lambda: "abc123")
    dataset = SimpleNamespace(name="digits", source="bundled", location="sklearn", file_sha256={"x": "00"})
    env = run.environment("cpu", dataset, ddp_world_size=1)
    assert {k: env[k] for k in ("mnistlab", "python", "numpy", "platform", "cpu_count")} == {
        "mnistlab": mnistlab.__version__, "python": platform.python_version(), "numpy": numpy.__version__,
        "platform": platform.platform(), "cpu_count": os.cpu_count()}
    assert env["processor"] and datetime.fromisoformat(env["started"]).tzinfo is not None
    assert env["cpu"] == str(run.cpu())
    assert sorted(env) == sorted(["mnistlab", "python", "torch", "numpy", "platform", "processor", "cpu", "cpu_count",
                                  "torch_threads", "device", "cuda_device", "git_commit", "dataset", "data_source",
                                  "data_sha256", "started", "ddp_world_size"])
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["cuda_device"] is None
    assert env["git_commit"] == "abc123" and env["dataset"] == "digits" and env["data_source"] == "bundled: sklearn"
    assert env["data_sha256"] == {"x": "00"} and env["ddp_world_size"] == 1 and env["torch_threads"] >= 1
    monkeypatch.setattr(platform, "processor", lambda: "")  # where Python cannot name the processor
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert run.environment("cpu", dataset)["processor"] == "arm64"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"gpu{i}")
    assert run.environment("cuda:1", dataset)["cuda_device"] == "gpu0"


# /proc/cpuinfo's start, as three kinds of machine show it (one processor's block; the next begins after a blank line)
XEON_AMX = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8580\n"
            "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n\n"
            "processor\t: 1\nmodel name\t: another\nflags\t\t: fpu\n")
XEON_AVX512 = "vendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6148\nflags\t\t: sse2 avx2 avx512f\n"
EPYC_AVX2 = "vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B12\nflags\t\t: sse2 avx2 fma\n"


@pytest.mark.parametrize("text, name", [
    (XEON_AMX, "Intel(R) Xeon(R) Platinum 8580 (AVX-512, VNNI, AMX)"),
    (XEON_AVX512, "Intel(R) Xeon(R) Gold 6148 (AVX-512)"),
    (EPYC_AVX2, "AMD EPYC 7B12 (AVX2)"),
    ("model name\t: Old\nflags\t\t: sse2\n", "Old (no AVX2)"),
])
def test_cpu_names_the_model_and_its_vector_units(text, name):
    """A timing is named by its CPU and the units that decide much of it: AVX2, AVX-512, VNNI (int8), AMX (bf16)."""
    assert str(run.cpu(text)) == name


def test_cpu_reads_the_first_processor_and_falls_back_where_there_is_no_cpuinfo(monkeypatch):
    amx = run.cpu(XEON_AMX)
    assert (amx.vendor, amx.model) == ("GenuineIntel", "Intel(R) Xeon(R) Platinum 8580")
    assert "amx_bf16" in amx.flags and "fpu" in amx.flags and amx.units == "AVX-512, VNNI, AMX"
    monkeypatch.setattr(platform, "processor", lambda: "")  # no /proc/cpuinfo (macOS) and no name from Python
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    unknown = run.cpu("")
    assert (unknown.model, unknown.vendor, unknown.flags, unknown.units) == ("", "", frozenset(), "")
    assert str(unknown) == "arm64"
    assert run.cpu("\n" + XEON_AVX512).model == "Intel(R) Xeon(R) Gold 6148"  # a blank line before the first block


# ---- the allocator -------------------------------------------------------------------------------------------

class FakeLibc:
    def __init__(self, name):
        assert name == "libc.so.6"
        self.calls = CALLS
        self.mallopt = lambda option, value: CALLS.append((option, value))


CALLS: list[tuple[int, int]] = []


@pytest.mark.parametrize("platform, env, tuned", [
    ("linux", {}, True),
    ("darwin", {}, False),
    ("linux", {"MALLOC_MMAP_THRESHOLD_": "1"}, False),
    ("linux", {"MNISTLAB_ALLOCATOR": "default"}, False),
    ("linux", {"MNISTLAB_ALLOCATOR": "tuned"}, True),
])
def test_tune_allocator_raises_glibcs_thresholds_unless_told_not_to(monkeypatch, platform, env, tuned):
    CALLS.clear()
    monkeypatch.setattr(run.sys, "platform", platform)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MNISTLAB_ALLOCATOR", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(run.ctypes, "CDLL", FakeLibc)
    run.tune_allocator()
    assert CALLS == ([(-3, 32 << 20), (-1, 1 << 30)] if tuned else [])


def test_tune_allocator_does_nothing_without_glibc(monkeypatch):
    def no_libc(name):
        raise OSError("no libc.so.6")

    monkeypatch.setattr(run.sys, "platform", "linux")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MNISTLAB_ALLOCATOR", raising=False)
    monkeypatch.setattr(run.ctypes, "CDLL", no_libc)
    run.tune_allocator()


# ---- Ctrl-C and the test kill points ---------------------------------------------------------------------------

def test_the_first_ctrl_c_asks_to_stop_the_second_interrupts_and_the_handler_is_restored(capsys):
    before = signal.getsignal(signal.SIGINT)
    with StopFlag() as stop:
        handler = signal.getsignal(signal.SIGINT)
        assert not stop.requested
        handler(signal.SIGINT, None)
        assert stop.requested
        assert "stopping after this step (Ctrl-C again to abort without saving)" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) is before


def test_off_the_main_thread_ctrl_c_is_left_alone():
    before = signal.getsignal(signal.SIGINT)
    seen = []

    def body():
        with StopFlag() as stop:
            seen.append((stop._previous, signal.getsignal(signal.SIGINT)))

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    assert seen == [(None, before)] and signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("env, sent", [
    ({"MNISTLAB_TEST_KILL": "step:3"}, [signal.SIGKILL]),
    ({"MNISTLAB_TEST_INTERRUPT": "step:3"}, [signal.SIGINT]),
    ({"MNISTLAB_TEST_KILL": "step:4"}, []),
    ({"MNISTLAB_TEST_KILL": "metrics:3"}, []),
    ({"MNISTLAB_TEST_KILL": "step:3", "MNISTLAB_TEST_KILL_RANK": "0"}, [signal.SIGKILL]),
    ({"MNISTLAB_TEST_KILL": "step:3", "MNISTLAB_TEST_KILL_RANK": "1"}, []),
    ({"MNISTLAB_TEST_KILL": "step:3", "MNISTLAB_TEST_KILL_RANK": "1", "RANK": "1"}, [signal.SIGKILL]),
    ({"MNISTLAB_TEST_KILL": "step:3", "MNISTLAB_TEST_KILL_RANK": "0", "TORCHELASTIC_RESTART_COUNT": "1"}, []),
])
def test_kill_points_signal_only_where_and_on_the_rank_asked(monkeypatch, env, sent):
    for key in ("MNISTLAB_TEST_KILL", "MNISTLAB_TEST_INTERRUPT", "MNISTLAB_TEST_KILL_RANK", "RANK",
                "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    signals = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: signals.append((pid, sig)))
    kill_point_for_tests("step", 3)
    assert signals == [(os.getpid(), s) for s in sent]


# ---- a new run that fails before its first checkpoint leaves nothing behind ----------------------------------

class Boom(Exception):
    pass


def fail_inside(r: RunFolder, write_checkpoint: bool = False) -> None:
    with pytest.raises(Boom), r:
        r.write_config("{}")
        r.start_metrics()
        (r.path / "tb").mkdir()
        (r.path / "tb" / "events").write_text("x")
        if write_checkpoint:
            r.file("checkpoint.safetensors").write_bytes(b"weights")
        raise Boom


def test_a_failed_new_run_removes_the_folder_it_made(tmp_path):
    fail_inside(RunFolder.create(str(tmp_path / "new" / "run"), "digits", "linear"))
    assert not (tmp_path / "new" / "run").exists() and (tmp_path / "new").is_dir()


def test_a_failed_default_run_removes_its_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fail_inside(RunFolder.create(None, "digits", "linear"))
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_failed_run_in_a_given_folder_keeps_what_was_there(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    target = tmp_path.parent / f"{tmp_path.name}-target"
    target.mkdir(exist_ok=True)
    r = RunFolder.create(str(tmp_path), "digits", "linear")
    (tmp_path / "link").symlink_to(target, target_is_directory=True)  # the run's own link to a folder elsewhere
    fail_inside(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt"] and target.is_dir()


@pytest.mark.parametrize("how", ["checkpoint", "no-error", "resumed", "follower"])
def test_a_run_with_a_checkpoint_or_no_error_or_not_new_keeps_its_files(tmp_path, how):
    path = tmp_path / "run"
    if how == "checkpoint":
        fail_inside(RunFolder.create(str(path), "digits", "linear"), write_checkpoint=True)
    elif how == "no-error":
        with RunFolder.create(str(path), "digits", "linear") as r:
            r.write_config("{}")
    else:
        path.mkdir()
        (path / "config.json").write_text("{}")
        fail_inside(RunFolder.open(path) if how == "resumed" else RunFolder.follow(path))
    assert (path / "config.json").exists() and (path / "tb" / "events").exists() == (how != "no-error")


def test_a_clean_up_that_fails_never_hides_the_runs_own_error(tmp_path, monkeypatch):
    def refuse(p, *args, **kwargs):
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(run.shutil, "rmtree", refuse)
    fail_inside(RunFolder.create(str(tmp_path / "run"), "digits", "linear"))  # Boom, not OSError
    assert (tmp_path / "run" / "tb").is_dir()


def test_begin_writes_the_first_files_and_names_the_folder(folder, capsys):
    config = SimpleNamespace(to_json=lambda: '{"epochs": 3}', describe=lambda: "mlp on digits, 3 epochs")
    folder.begin(config, {"python": "3.11"})
    assert folder.file("config.json").read_text() == '{"epochs": 3}\n'
    assert folder.file("metrics.jsonl").read_text() == ""
    assert json.loads(folder.file("env.json").read_text()) == {"python": "3.11"}
    assert capsys.readouterr().err == f"run folder {folder.path}\nmlp on digits, 3 epochs\n"


# ---- counts and durations in messages ---------------------------------------------------------------------

@pytest.mark.parametrize("n, text", [(0, "0 threads"), (1, "1 thread"), (2, "2 threads"), (1200, "1,200 threads")])
def test_plural(n, text):
    assert run.plural(n, "thread") == text


@pytest.mark.parametrize("seconds, text", [(59.94, "59.9 s"), (60, "1.0 min"), (3599, "60.0 min"), (3600, "1.0 h"),
                                           (5400, "1.5 h"), (90, "1.5 min"), (3780, "1.1 h")])
def test_durations_are_seconds_then_minutes_then_hours(seconds, text):
    assert run.duration_text(seconds) == text
