"""`mnistlab train` under torchrun: 2 processes with gloo on the CPU, one thread each.

- Exactness: a model without BatchNorm, dropout or augmentation trained on 2 ranks equals the 1-process run
  with the same global batch within PyTorch's own DDP test tolerance (rtol 1.3e-6, atol 1e-5), uneven last
  batches included (one of a single image, so that one rank's share is empty).
- Every registered model trains under torchrun; the CNN with per-rank BatchNorm passes the 1-process floor.
- Fault tolerance: torchrun --max-restarts 1, one worker SIGKILLed mid-epoch (its own pid, not the agent's),
  the group restarts and resumes, and the final weights are bit-identical to an uninterrupted 2-process run;
  `--resume` by hand does the same.
- Refusals are one line and exit 2.

A lost peer fails a test instead of hanging it: MNISTLAB_DIST_TIMEOUT=60 and a subprocess timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mnistlab
from mnistlab.checkpoint import read_checkpoint
from mnistlab.models import list_models

pytestmark = pytest.mark.slow

ENV = dict(os.environ, MNISTLAB_DIST_TIMEOUT="60", OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
DIGITS = ["--dataset", "digits", "--threads", "1"]


def torchrun(*args: str, nproc: int = 2, restarts: int = 0, env: dict | None = None,
             timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "--max-restarts", str(restarts), "-m", "mnistlab", *args]
    return subprocess.run(cmd, env=dict(ENV, **(env or {})), capture_output=True, text=True, timeout=timeout)


def one_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnistlab", *args], env=dict(ENV, **(env or {})),
                          capture_output=True, text=True, timeout=240)


def weights(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(run / "checkpoint.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


# (model, extra flags): no BatchNorm, no dropout, no augmentation. The batch sizes make the last batch of an
# epoch uneven: 1,294 digits = 21 x 61 + 13 (shares 7 and 6), and = 3 x 431 + 1 (shares 1 and 0).
EXACT = {
    "mlp-uneven": ["--model", "mlp", "--batch-size", "61", "--epochs", "2"],
    "mlp-one-image-last": ["--model", "mlp", "--batch-size", "431", "--epochs", "3"],
    "vit": ["--model", "vit", "--batch-size", "64", "--epochs", "1", "--hflip", "off"],
    "lstm": ["--model", "lstm", "--batch-size", "61", "--epochs", "1"],
}


@pytest.mark.parametrize("case", list(EXACT))
def test_two_processes_train_the_one_process_weights(tmp_path, case):
    flags = [*DIGITS, *EXACT[case]]
    ok(one_process("train", *flags, "--run-dir", str(tmp_path / "one")))
    ok(torchrun("train", *flags, "--run-dir", str(tmp_path / "two")))
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1.3e-6, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # the metrics mean the same: losses summed over ranks, counts added, validation and test sharded
    a = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(a, b, strict=True):
        assert ra["train_accuracy"] == rb["train_accuracy"] and ra["val_accuracy"] == rb["val_accuracy"]
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-4)
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert ra["test_accuracy"] == rb["test_accuracy"] and rb["world_size"] == 2 and ra["world_size"] == 1
    env = json.loads((tmp_path / "two" / "env.json").read_text())
    assert (env["world_size"], env["backend"], env["precision"]) == (2, "gloo", "fp32")


def test_a_distributed_step_differs_from_a_one_rank_step_when_the_weighting_is_dropped(tmp_path, monkeypatch):
    """The exactness above depends on each rank's loss weighted by its share: with equal weights on an
    uneven batch the weights move elsewhere (so the test can fail)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(13, 4), torch.randint(0, 3, (13,))
    full = torch.autograd.grad(F.cross_entropy(model(x), y), model.weight)[0]
    shares = [torch.arange(13).tensor_split(2)[r] for r in range(2)]  # 7 and 6
    weighted = sum(torch.autograd.grad(F.cross_entropy(model(x[s]), y[s]) * (len(s) * 2 / 13), model.weight)[0]
                   for s in shares) / 2
    naive = sum(torch.autograd.grad(F.cross_entropy(model(x[s]), y[s]), model.weight)[0] for s in shares) / 2
    torch.testing.assert_close(weighted, full, rtol=1.3e-6, atol=1e-7)
    assert not torch.allclose(naive, full, rtol=1e-3, atol=1e-5)


def test_shards_cover_a_batch_once_in_rank_order(monkeypatch):
    from mnistlab import distributed

    idx = torch.randperm(13)
    for size in (1, 2, 3, 5, 20):
        parts = []
        for rank in range(size):
            monkeypatch.setattr(distributed, "_WORLD", distributed.World(rank=rank, local_rank=rank, size=size,
                                                                         backend="gloo" if size > 1 else None))
            parts.append(distributed.shard(idx))
        assert torch.equal(torch.cat(parts), idx)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("model", list_models())
def test_every_model_trains_under_torchrun(tmp_path, model):
    run = tmp_path / model
    ok(torchrun("train", *DIGITS, "--model", model, "--epochs", "1", "--run-dir", str(run)))
    results = json.loads((run / "results.json").read_text())
    # one epoch on one process gives 29% (gru) to 89% (linear) here: twice chance says it learned
    assert results["world_size"] == 2 and results["test_accuracy"] >= 0.2, results
    assert not list(run.glob("*.tmp*"))


def test_the_cnn_with_per_rank_batchnorm_passes_the_one_process_floor(tmp_path):
    ok(torchrun("train", "--dataset", "digits", "--run-dir", str(tmp_path / "cnn")))
    results = json.loads((tmp_path / "cnn" / "results.json").read_text())
    assert results["test_accuracy"] >= 0.95, results  # test_train.py's floor for the same run in one process


KILL_RUN = [*DIGITS, "--model", "mlp", "--epochs", "3", "--batch-size", "61"]  # 22 steps an epoch


def test_torchrun_restarts_a_killed_worker_and_the_run_ends_bit_identical(tmp_path):
    ok(torchrun("train", *KILL_RUN, "--run-dir", str(tmp_path / "whole")))
    # rank 1 SIGKILLs itself after step 30 (mid-epoch 2) on the first attempt only; the agent restarts the group
    proc = torchrun("train", *KILL_RUN, "--run-dir", str(tmp_path / "killed"), restarts=1,
                    env=dict(MNISTLAB_TEST_KILL="step:30", MNISTLAB_TEST_KILL_RANK="1"))
    ok(proc)
    assert "torchrun restart 1: resuming" in proc.stderr
    assert "SIGKILL" in proc.stderr or "Signal 9" in proc.stderr or "exitcode: -9" in proc.stderr, proc.stderr[-3000:]
    whole, killed = weights(tmp_path / "whole"), weights(tmp_path / "killed")
    for k in whole:
        assert torch.equal(whole[k], killed[k]), f"{k} differs"
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "killed"))
    assert a["test_accuracy"] == b["test_accuracy"] and a["steps"] == b["steps"]


def test_a_killed_distributed_run_resumes_by_hand_bit_identical(tmp_path):
    ok(torchrun("train", *KILL_RUN, "--run-dir", str(tmp_path / "whole")))
    proc = torchrun("train", *KILL_RUN, "--run-dir", str(tmp_path / "killed"),
                    env=dict(MNISTLAB_TEST_KILL="step:40", MNISTLAB_TEST_KILL_RANK="0"))
    assert proc.returncode != 0
    assert not (tmp_path / "killed" / "results.json").exists()
    ok(torchrun("train", "--resume", str(tmp_path / "killed")))
    whole, killed = weights(tmp_path / "whole"), weights(tmp_path / "killed")
    for k in whole:
        assert torch.equal(whole[k], killed[k]), f"{k} differs"


@pytest.mark.parametrize("args, expected", [
    (["train", *DIGITS, "--sync-bn"], "SyncBatchNorm runs only on CUDA"),
    (["train", *DIGITS, "--engine", "scratch", "--model", "mlp"], "trains in one process"),
    (["pretrain", *DIGITS], "pretrain runs in one process"),
])
def test_what_cannot_run_distributed_is_refused_in_one_line(tmp_path, args, expected):
    proc = torchrun(*args, "--run-dir", str(tmp_path / "r"))
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert f'File "{Path(mnistlab.__file__).parent}' not in proc.stderr  # no traceback through mnistlab's code


def test_restarts_without_a_run_folder_are_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--max-restarts", "1", "-m", "mnistlab", "train", *DIGITS], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "under torchrun --max-restarts, give --run-dir" in proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_diverging_distributed_run_stops_every_rank_with_one_line(tmp_path):
    """The loss is summed over ranks before it is checked, so every rank sees the NaN at the same step and
    stops: exit 1 with the usual message, no rank left waiting for the process-group timeout."""
    # A rank left waiting would sit out the group timeout, here 900 s: the run must end by itself long before
    # (subprocess.run's 300 s raises TimeoutExpired otherwise), however slow the machine is today.
    proc = torchrun("train", *DIGITS, "--model", "mlp", "--optimizer", "sgd", "--lr", "1e30", "--run-dir",
                    str(tmp_path / "r"), env={"MNISTLAB_DIST_TIMEOUT": "900"}, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("mnistlab: error: the loss became nan at step 1") == 1, proc.stderr[-3000:]
    # rank 1 says the same, naming its rank (unless the agent, seeing rank 0 exit first, ended it before it spoke)
    assert proc.stderr.count("mnistlab: error (rank 1): the loss became nan at step 1") <= 1
    assert not (tmp_path / "r" / "results.json").exists()


def test_a_restart_never_resumes_a_run_another_command_left_in_the_folder(tmp_path):
    """Attempt 0 refuses a --run-dir that already holds a run; the restarted attempt must refuse it too,
    not take it for its own (env.json's torchrun_job names the job that began a run)."""
    ok(one_process("train", *DIGITS, "--model", "linear", "--epochs", "1", "--run-dir", str(tmp_path / "old")))
    before = (tmp_path / "old" / "results.json").read_bytes()
    proc = torchrun("train", *DIGITS, "--model", "mlp", "--epochs", "1", "--run-dir", str(tmp_path / "old"),
                    restarts=1)
    assert proc.returncode != 0
    assert "already holds a run" in proc.stderr and "resuming" not in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "old" / "results.json").read_bytes() == before
