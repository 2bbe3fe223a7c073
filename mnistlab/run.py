"""A run folder and everything around a run that is not the training step, shared by both engines.

    runs/<time>-<dataset>-<model>/
        .lock                    held (an OS file lock) by the one process writing this run
        config.json              the TrainConfig or PretrainConfig (the checkpoint carries the same, and
                                 wins on resume)
        env.json                 provenance: versions, CPU, device, threads, git commit, data hashes
        metrics.jsonl            one record per finished epoch
        checkpoint.safetensors   weights, optimizer state, step (checkpoint.py)
        results.json             at the end: accuracies (pre-training: losses), seconds, parameters
        calibration.json         at the end of training: temperature and "unsure" threshold (calibration.py)
        labelled_subset.json     with --labels-per-class: the labelled images' indices (data/subset.py)
        grad_flow.jsonl          with --grad-flow: gradient norms per layer (gradflow.py)
        tb/                      with --tensorboard: TensorBoard event files (tensorboard.py)
        reconstructions/         pre-training: a figure per epoch, and reconstruction_loss.png (pretrain.py)
        report.html              written later by `mnistlab report` (inspect/report.py)

One writer: `RunFolder.open` takes an exclusive `flock` on `.lock` for the life of the process. The
kernel drops it when the process dies, SIGKILL included, so a killed run never leaves a stale lock;
a second training into a live run's folder is refused before it reads or writes anything. A new run
that fails (an error, not a kill) before its first checkpoint leaves nothing behind: what it wrote
goes, and the folder too when the run created it (a folder holding only `.lock` is no run). Output:
the per-epoch lines and the final result go to stdout (so `mnistlab train > log` keeps them),
progress bars, notes and warnings to stderr.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from mnistlab.errors import UserError
from mnistlab.files import append_line, atomic_write_text, remove_orphan_temps, to_json, write_json

CONFIG, ENV, METRICS, RESULTS, LOCK = "config.json", "env.json", "metrics.jsonl", "results.json", ".lock"
CHECKPOINT, GRAD_FLOW = "checkpoint.safetensors", "grad_flow.jsonl"  # written by checkpoint.py and gradflow.py
RUN_FILES = (CONFIG, ENV, METRICS, RESULTS, CHECKPOINT, GRAD_FLOW)


def _is_main() -> bool:
    """Rank 0 under torchrun (always, in one process). Imported here, not at the top: distributed.py imports
    torch, and this module is read without it (the leaderboard, the numpy engine)."""
    from mnistlab.distributed import is_main

    return is_main()


def note(msg: str) -> None:
    """Progress and warnings: stderr (from rank 0 only, under torchrun)."""
    if _is_main():
        print(msg, file=sys.stderr, flush=True)


def say(msg: str) -> None:
    """What a run reports (epoch lines, the result): stdout, so it can be piped and kept (rank 0 only)."""
    if _is_main():
        print(msg, flush=True)


class RunFolder:
    """A run folder held by this process (see the module docstring), or followed by one that does not write
    (the ranks after 0 of a distributed run: `follow`)."""

    def __init__(self, path: Path, lock_fd: int | None, writes: bool = True,
                 new: tuple[bool, frozenset[str]] | None = None) -> None:
        self.path = path
        self._lock_fd = lock_fd
        self.writes = writes
        self._new = new  # a run this process creates: (whether it made the folder, the names already there)

    @classmethod
    def follow(cls, run_dir: str | Path) -> RunFolder:
        """The folder rank 0 holds, seen from another rank: no lock, and every write is skipped."""
        return cls(Path(run_dir), None, writes=False)

    @classmethod
    def create(cls, run_dir: str | None, dataset: str, model: str) -> RunFolder:
        """A new run: the given folder (which must not hold a run), or a fresh default one."""
        if run_dir is None:
            return cls._create_default(dataset, model)
        path = Path(run_dir)
        made = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            before = frozenset() if made else frozenset(p.name for p in path.iterdir())
        except OSError as e:
            raise UserError(f"--run-dir {path}: cannot create it ({e.strerror})") from None
        run = cls(path, _lock(path), new=(made, before))
        if (path / CONFIG).exists() or any(path.glob("checkpoint*.safetensors")):
            run.close()
            raise UserError(f"{path} already holds a run; continue it with `mnistlab train --resume {path}` "
                            "or choose another --run-dir")
        run.clean()
        return run

    @classmethod
    def _create_default(cls, dataset: str, model: str) -> RunFolder:
        # mkdir without exist_ok claims a name atomically: two runs started in the same second get -2, -3, ...
        stem = f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{dataset}-{model}"
        try:
            Path("runs").mkdir(exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create runs/ here ({e.strerror}); give --run-dir") from None
        for i in range(1, 1000):
            path = Path("runs") / (stem if i == 1 else f"{stem}-{i}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                raise UserError(f"cannot create {path} ({e.strerror})") from None
            return cls(path, _lock(path), new=(True, frozenset()))
        raise UserError(f"runs/{stem}: too many runs started in the same second")

    @classmethod
    def open(cls, run_dir: str | Path) -> RunFolder:
        """An existing run folder, to resume: locked, and cleared of temp files a killed write left."""
        path = Path(run_dir)
        if not path.is_dir():
            raise UserError(f"--resume {path}: no such folder")
        run = cls(path, _lock(path))
        run.clean()
        return run

    def clean(self) -> None:
        if not self.writes:
            return
        for p in remove_orphan_temps(self.path, RUN_FILES):
            note(f"removed {p.name}, left by an interrupted write")

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and self._new is not None and self.writes and not self.file(CHECKPOINT).exists():
            self._discard()
        self.close()

    def _discard(self) -> None:
        """Remove what this new run wrote, and its folder if it made it: it failed before its first checkpoint,
        so there is nothing to resume or compare, and a half-made folder would trouble `mnistlab compare`."""
        made, before = self._new
        self.close()
        try:
            for p in self.path.iterdir():
                if p.name not in before:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            if made:
                self.path.rmdir()
        except OSError:  # never let the clean-up hide the error that ended the run
            pass

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> None:
        if not self.writes:
            return
        write_json(self.path / name, obj)

    def write_config(self, config_json: str) -> None:
        if not self.writes:
            return
        atomic_write_text(self.path / CONFIG, config_json + "\n")

    def begin(self, config: Any, env: dict[str, Any]) -> None:
        """A new run's first files: config.json (`config`, a TrainConfig or PretrainConfig), env.json, an empty
        metrics.jsonl; and the note that names the folder and prints the config."""
        self.write_config(config.to_json())
        self.write_json(ENV, env)
        self.start_metrics()
        note(f"run folder {self.path}\n{config.describe()}")

    # metrics.jsonl: one JSON record per finished epoch
    def start_metrics(self) -> None:
        if not self.writes:
            return
        atomic_write_text(self.path / METRICS, "")

    def append_metrics(self, record: dict[str, Any]) -> None:
        if not self.writes:
            return
        append_line(self.path / METRICS, to_json(record, indent=None))

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path / METRICS)

    def keep_metrics(self, epochs_done: int) -> None:
        """Drop records of epochs after the checkpoint (a kill between the metrics and checkpoint writes)."""
        if not self.writes:
            return
        keep = [r for r in self.read_metrics() if r["epoch"] <= epochs_done]
        atomic_write_text(self.path / METRICS, "".join(to_json(r, indent=None) + "\n" for r in keep))

    def write_results(self, results: dict[str, Any]) -> None:
        """Write results.json and report the outcome on stdout."""
        self.write_json(RESULTS, results)
        say(f"test accuracy {results['test_accuracy']:.2%} (loss {results['test_loss']:.4f}), "
            f"val {results['val_accuracy']:.2%}, {results['train_seconds']:.1f}s of training; "
            f"results in {self.path / RESULTS}")


def _lock(path: Path) -> int | None:
    """Take the run folder's exclusive lock, or refuse: another process is writing this run."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (documented in the README)
        return None
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"{path}: cannot write there ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{path} is being written by another running `mnistlab train`; wait for it to end "
                        "(or stop it), or choose another --run-dir") from None
    return fd


def epoch_summary(record: dict[str, Any], epochs: int) -> str:
    """The one line of a finished epoch, from its metrics.jsonl record (every engine; pre-training has no
    accuracy)."""
    train_acc = f" acc {record['train_accuracy']:.2%}" if "train_accuracy" in record else ""
    val_acc = f" acc {record['val_accuracy']:.2%}" if "val_accuracy" in record else ""
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f}{train_acc}  "
            f"val loss {record['val_loss']:.4f}{val_acc}  {record['seconds']:.1f}s  "
            f"{record['images_per_second']:,.0f} img/s")


def plural(n: int, noun: str) -> str:
    """'1 thread', '4 threads', '1,200 steps'."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def duration_text(seconds: float) -> str:
    """Seconds under a minute, minutes under an hour, then hours: '12.3 s', '4.5 min', '2.1 h'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def tune_allocator() -> None:
    """Keep freed activation buffers in glibc's heap instead of returning them to the OS.

    By default glibc serves blocks above 128 KiB with mmap and gives them back on free, so every
    step pays page faults to re-zero the same activation memory; raising the mmap and trim
    thresholds makes CNN training markedly faster on CPU (bench/speed.py measures both).
    mallopt is glibc's runtime equivalent of MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_;
    elsewhere this does nothing. An explicitly set MALLOC_ variable wins, and
    MNISTLAB_ALLOCATOR=default turns this off.
    """
    if (sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ
            or os.environ.get("MNISTLAB_ALLOCATOR") == "default"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum on 64-bit
    libc.mallopt(m_trim_threshold, 1 << 30)


def cap_threads(threads: int | None) -> int | None:
    """More threads than cores only adds contention (999 made an epoch 280x slower): cap with a warning."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads is not None and threads > cores:
        note(f"warning: --threads {threads} is more than the {cores} cores; using {cores}")
        return cores
    return threads


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl ([] when there is none); a torn last line is dropped."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for n, ln in enumerate(lines, 1):
        if ln.strip():
            try:
                records.append(json.loads(ln))
            except ValueError:
                if n == len(lines) and not text.endswith("\n"):
                    break  # a record torn by a kill mid-append: its epoch has no checkpoint, and is redone
                raise UserError(f"{path}: line {n} is not a JSON record; restore the file or start a new "
                                "run") from None
    return records


@dataclass(frozen=True)
class Cpu:
    """What /proc/cpuinfo says of this machine's first CPU. Empty where there is no such file (macOS, Windows) and
    partly on ARM Linux, whose cpuinfo has "Features" rather than "model name" and "flags": str() then falls back
    to what Python knows ("aarch64")."""

    model: str  # "Intel(R) Xeon(R) Processor"
    vendor: str  # "GenuineIntel", "AuthenticAMD"
    flags: frozenset[str]  # the kernel's feature flags: "avx2", "avx512f", "amx_bf16", ...

    @property
    def units(self) -> str:
        """The vector and matrix units behind much of a CPU timing, in words: "AVX-512, VNNI, AMX" on a Xeon with
        Intel's matrix unit, "AVX2" on an older or smaller core, "" when the flags are unknown. bf16 autocast, for one,
        trained the default CNN 1.57x faster than fp32 on an AMD EPYC with AVX512_BF16, 0.80x as fast on a Xeon
        with AVX512_BF16 but no AMX, and 0.25x on an AVX2 EPYC (docs/distributed.md, "Precision")."""
        if not self.flags:
            return ""
        f = self.flags
        units = ["AVX-512" if "avx512f" in f else "AVX2" if "avx2" in f else "no AVX2"]
        if {"avx512_vnni", "avx_vnni"} & f:
            units.append("VNNI")  # int8 dot products in the vector unit
        if "amx_tile" in f:
            units.append("AMX")  # Intel's matrix unit (int8 and bf16 tiles)
        return ", ".join(units)

    def __str__(self) -> str:
        """The name a timing is given beside: "Intel(R) Xeon(R) Processor (AVX-512, VNNI, AMX)"."""
        name = self.model or platform.processor() or platform.machine()
        return f"{name} ({self.units})" if self.units else name


def cpu(cpuinfo: str | None = None) -> Cpu:
    """This machine's CPU from /proc/cpuinfo (or from `cpuinfo`, its text, for tests): the first processor's
    model name, vendor and flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block ends at its blank line
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return Cpu(model=fields.get("model name", ""), vendor=fields.get("vendor_id", ""),
               flags=frozenset(fields.get("flags", "").split()))


def environment(device: str, dataset: Any, **extra: Any) -> dict[str, Any]:
    """Provenance for env.json: versions, machine, device, code and data."""
    import numpy
    import torch

    from mnistlab import __version__

    return {
        "mnistlab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": str(cpu()),  # the model and its vector units: where the run's seconds were measured
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "cuda_device": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "git_commit": git_commit(),
        "dataset": dataset.name,
        "data_source": f"{dataset.source}: {dataset.location}",
        "data_sha256": dataset.file_sha256,
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        **extra,
    }


class StopFlag:
    """Ctrl-C sets a flag the loop checks between steps (so a step is never half-applied);
    a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopFlag:
        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            note("\nstopping after this step (Ctrl-C again to abort without saving)")

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def kill_point_for_tests(where: str, n: int) -> None:
    """Signal this process at a named point when a test asks (deterministic where a timer is not).

    MNISTLAB_TEST_KILL=<where>:<n> sends SIGKILL, MNISTLAB_TEST_INTERRUPT=<where>:<n> SIGINT (Ctrl-C).
    Points: 'step:N' right after step N is applied (mid-epoch), 'metrics:E' after epoch E's metrics
    record is written and before its checkpoint. Under torchrun, MNISTLAB_TEST_KILL_RANK=R limits it to
    rank R, and only the first attempt is killed (a group torchrun restarted runs through).
    """
    rank = os.environ.get("MNISTLAB_TEST_KILL_RANK")
    if rank is not None and (os.environ.get("RANK", "0") != rank
                             or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"):
        return
    point = f"{where}:{n}"
    if os.environ.get("MNISTLAB_TEST_KILL") == point:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("MNISTLAB_TEST_INTERRUPT") == point:
        os.kill(os.getpid(), signal.SIGINT)
