"""Run the README's results commands over several seeds and print the table the README shows.

    python bench/results_table.py                  # every row, seeds 0 1 2 (about 50 minutes on 2 cores)
    python bench/results_table.py --rows 0 1 --seeds 0   # a quick look

Each command runs in its own process as a user would type it (with `--seed S` appended), with a
fresh run folder. A row reports validation and test accuracy as mean +- std over the seeds (sample
std, ddof=1), and the mean training seconds (the loop alone) and wall seconds (the whole process).
The header names the machine: a timing means nothing without the CPU it was taken on. Settings
are chosen on validation accuracy; test accuracy is reported, never used to choose.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys

from common import machine_line, run_train

ROWS = [
    "mnistlab train --dataset digits",
    "mnistlab train --dataset fashion-mnist --model linear",
    "mnistlab train --dataset fashion-mnist --model mlp",
    "mnistlab train --dataset fashion-mnist --model lenet5",
    "mnistlab train --dataset fashion-mnist",
    "mnistlab train --dataset fashion-mnist --recipe fast",
    "mnistlab train --dataset fashion-mnist --recipe best",
]


def mean_std(values: list[float]) -> str:
    """'mean +- std' in percent; a single value has no spread to report."""
    m = statistics.mean(values)
    if len(values) < 2:
        return f"{m:.2%}"
    return f"{m:.2%} +- {statistics.stdev(values) * 100:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", help="indices of the rows to run (default: all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per row (default: 0 1 2)")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"{machine_line()}; commit {commit or 'unknown'}; seeds {' '.join(map(str, args.seeds))}", flush=True)
    print("\n| dataset | model | val accuracy | test accuracy | training | wall | command |")
    print("|---|---|---|---|---|---|---|")
    for i in args.rows if args.rows is not None else range(len(ROWS)):
        cmd = ROWS[i]
        runs = []
        for seed in args.seeds:
            try:
                r, wall, _ = run_train([*shlex.split(cmd)[2:], "--seed", str(seed)])
            except RuntimeError as e:
                print(f"| failed | | | | | | `{cmd} --seed {seed}`: {e} |", flush=True)
                continue
            runs.append((r, wall))
            print(f"  seed {seed}: val {r['val_accuracy']:.2%} test {r['test_accuracy']:.2%} "
                  f"training {r['train_seconds']:.0f} s wall {wall:.0f} s", file=sys.stderr, flush=True)
        if not runs:
            continue
        r0 = runs[0][0]
        print(f"| {r0['dataset']} | {r0['model']} | {mean_std([r['val_accuracy'] for r, _ in runs])} "
              f"| {mean_std([r['test_accuracy'] for r, _ in runs])} "
              f"| {statistics.mean(r['train_seconds'] for r, _ in runs):.0f} s "
              f"| {statistics.mean(w for _, w in runs):.0f} s | `{cmd}` |", flush=True)


if __name__ == "__main__":
    main()
