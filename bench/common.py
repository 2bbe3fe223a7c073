"""What the bench scripts share: run `mnistlab train` as a user would, and read its run folder."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mnistlab.run import METRICS, read_metrics


def run_train(args: list[str]) -> tuple[dict, float, list[dict]]:
    """Run `mnistlab train ARGS` in a fresh process with a temporary run folder.

    Returns (results.json, wall seconds of the whole process, metrics.jsonl records); a failed run
    raises RuntimeError with the last line it printed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "mnistlab", "train", *args, "--run-dir", str(run)],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"mnistlab train {' '.join(args)} failed ({proc.returncode}): {last}")
        metrics = read_metrics(run / METRICS)
        return json.loads((run / "results.json").read_text()), wall, metrics


def machine_line() -> str:
    """The CPU model, core count and torch version: what a timing was measured on."""
    from mnistlab.inspect.leaderboard import machine_line as line

    return line()


def accuracy_spread(values: list[float]) -> str:
    """'91.10% +- 0.55%' from accuracies in [0, 1]: mean and sample std over seeds (0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2%} +- {std:.2%}"
