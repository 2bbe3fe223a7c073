"""Training on a CUDA GPU (marked gpu, skipped without one), --precision on the CPU, and bench/gpu.py's plumbing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnistlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gpu.py"
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")
# a small, quick configuration on the bundled digits (1,294 train images), as in test_train.py
QUICK_DATA = ["--dataset", "digits", "--batch-size", "32", "--threads", "1"]
QUICK = [*QUICK_DATA, "--model", "cnn", "--model-arg", "widths=[8,16,32]"]


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def env(run: Path) -> dict:
    return json.loads((run / "env.json").read_text())


def native_bf16() -> bool:
    """What --precision auto asks of a CUDA GPU (lifecycle.pick_precision): bf16 computed natively, not emulated."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


# --- on a CUDA GPU -----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_trains_on_cuda_with_bf16_where_native(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--device", "cuda", "--precision", "auto", "--epochs", "2", "--run-dir",
                 str(run)]) == 0
    r = results(run)
    assert r["device"].startswith("cuda"), r
    assert r["precision"] == ("bf16" if native_bf16() else "fp32"), r
    assert env(run)["precision"] == r["precision"]
    assert env(run)["cuda_device"] == torch.cuda.get_device_name(0)
    assert r["test_accuracy"] >= 0.5, r  # it learned under the chosen precision: chance is 10%


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_fp32_on_cuda_learns_as_well_as_the_cpu(tmp_path):
    # the same initial weights and batch order (both made on the CPU); only the kernels differ
    accuracy = {}
    for device in ("cpu", "cuda"):
        run = tmp_path / device
        assert main(["train", *QUICK, "--device", device, "--precision", "fp32", "--epochs", "3",
                     "--run-dir", str(run)]) == 0
        r = results(run)
        assert r["precision"] == "fp32" and r["device"].startswith(device), r
        accuracy[device] = r["test_accuracy"]
    assert accuracy["cpu"] >= 0.85, accuracy
    assert abs(accuracy["cuda"] - accuracy["cpu"]) <= 0.05, accuracy


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_compile_trains_on_cuda(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--device", "cuda", "--compile", "--epochs", "2", "--run-dir", str(run)]) == 0
    r = results(run)
    assert r["device"].startswith("cuda") and env(run)["compile"] is True, r
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in records] == [1, 2]
    assert r["test_accuracy"] >= 0.5, r  # it learned: chance is 10%


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_checkpoint_written_on_cuda_evaluates_without_a_gpu(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--device", "cuda", "--epochs", "2", "--run-dir", str(run)]) == 0
    r = results(run)
    # `mnistlab eval` rebuilds the model on the CPU; with CUDA hidden, nothing in the checkpoint may need a GPU
    proc = subprocess.run([sys.executable, "-m", "mnistlab", "eval", str(run), "--json"], capture_output=True,
                          text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    # fp32 on the CPU against the GPU's (bf16 autocast, TF32 convolutions) evaluation: a few of 360 images may flip
    assert report["accuracy"] == pytest.approx(r["test_accuracy"], abs=0.02), (report["accuracy"], r)
    assert sum(map(sum, report["confusion"])) == 360


# --- --precision on the CPU --------------------------------------------------------------------------------

@pytest.mark.slow
def test_bf16_on_the_cpu_trains_and_is_recorded(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *QUICK_DATA, "--model", "mlp", "--precision", "bf16", "--device", "cpu", "--epochs", "1",
                 "--run-dir", str(run)]) == 0
    assert results(run)["precision"] == "bf16"
    assert env(run)["precision"] == "bf16"
    assert json.loads((run / "config.json").read_text())["precision"] == "bf16"


@pytest.mark.slow
def test_the_default_precision_is_fp32_and_auto_follows_the_hardware_rule(tmp_path):
    from mnistlab.lifecycle import bf16_is_fast

    assert main(["train", *QUICK_DATA, "--model", "linear", "--device", "cpu", "--epochs", "1",
                 "--run-dir", str(tmp_path / "default")]) == 0
    assert results(tmp_path / "default")["precision"] == "fp32"
    assert main(["train", *QUICK_DATA, "--model", "linear", "--precision", "auto", "--device", "cpu",
                 "--epochs", "1", "--run-dir", str(tmp_path / "auto")]) == 0
    expected = "bf16" if bf16_is_fast(torch.device("cpu")) else "fp32"
    assert results(tmp_path / "auto")["precision"] == expected
    assert env(tmp_path / "auto")["precision"] == expected


CPUINFO = "processor\t: 0\nvendor_id\t: {vendor}\nmodel name\t: x\nflags\t\t: fpu sse2 avx2 {flags}\n"


@pytest.mark.parametrize("vendor, flags, fast", [
    ("AuthenticAMD", "avx512f avx512_bf16", True),  # Zen 4: measured 1.12-1.57x (docs/distributed.md)
    ("GenuineIntel", "avx512f avx512_bf16", False),  # no AMX: measured 0.70-0.80x
    ("GenuineIntel", "avx512f avx512_bf16 amx_tile amx_bf16", True),  # AMX: bf16 matrix unit
    ("AuthenticAMD", "", False),  # AVX2: measured 0.25x
    ("GenuineIntel", "avx512f", False),
])
def test_auto_precision_rule_reads_the_cpu_flags(vendor, flags, fast):
    from mnistlab.lifecycle import bf16_is_fast

    assert bf16_is_fast(torch.device("cpu"), CPUINFO.format(vendor=vendor, flags=flags)) is fast


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compile_on_the_cpu_trains_the_same_model(tmp_path):
    """--compile changes how the step runs, not what it computes: the same accuracies as without it."""
    flags = [*QUICK_DATA, "--model", "mlp", "--epochs", "1", "--device", "cpu"]
    assert main(["train", *flags, "--run-dir", str(tmp_path / "plain")]) == 0
    assert main(["train", *flags, "--compile", "--run-dir", str(tmp_path / "compiled")]) == 0
    plain, compiled = results(tmp_path / "plain"), results(tmp_path / "compiled")
    assert compiled["val_accuracy"] == plain["val_accuracy"] and compiled["test_accuracy"] == plain["test_accuracy"]
    assert env(tmp_path / "compiled")["compile"] is True


def test_bf16_with_the_scratch_engine_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *QUICK_DATA, "--model", "mlp", "--engine", "scratch", "--precision", "bf16",
                 "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "invalid config" in err and "precision" in err and "scratch" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not run.exists()  # refused before anything was written


# --- bench/gpu.py ------------------------------------------------------------------------------------------

def run_bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_bench_smoke_run_on_the_cpu_prints_a_table_row(tmp_path):
    out = tmp_path / "bench"
    proc = run_bench("--smoke", "--device", "cpu", "-o", str(out), "--train-args=--threads 1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("| target |"), proc.stdout
    rows = [line for line in lines[2:] if line.startswith("| digits ")]
    assert len(rows) == 1, proc.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "1/1" and cells[-1] == "yes", cells  # 1 epoch of digits is far above the smoke's 50%
    assert float(cells[2]) > 0  # training seconds
    assert lines[-1].startswith("device cpu; CPU "), proc.stdout
    assert (out / "digits-seed0" / "results.json").is_file()


@pytest.mark.slow  # starts a process
@pytest.mark.skipif(CUDA, reason="a CUDA device is present: the bench runs instead of refusing")
def test_bench_without_cuda_exits_2_with_one_line(tmp_path):
    proc = run_bench("-o", str(tmp_path / "bench"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no CUDA device: "), proc.stderr
    assert not (tmp_path / "bench").exists()
