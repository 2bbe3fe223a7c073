"""Run the README's results commands one after another and print the table the README shows.

    python bench/results_table.py            # every row (about 20 minutes on 2 cores)
    python bench/results_table.py --rows 0 1 # just the first two

Each command runs in its own process as a user would type it, with a fresh run folder; the table
gives its test accuracy, training seconds (the loop alone) and wall seconds (the whole process).
"""

from __future__ import annotations

import argparse
import shlex

from common import run_train

ROWS = [
    "mnistlab train --dataset digits",
    "mnistlab train --dataset fashion-mnist --model linear",
    "mnistlab train --dataset fashion-mnist --model mlp",
    "mnistlab train --dataset fashion-mnist --model lenet5",
    "mnistlab train --dataset fashion-mnist",
    "mnistlab train --dataset fashion-mnist --recipe fast",
    "mnistlab train --dataset fashion-mnist --recipe best",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", help="indices of the rows to run (default: all)")
    args = ap.parse_args()
    print("| dataset | model | test accuracy | training | wall | command |")
    print("|---|---|---|---|---|---|")
    for i in args.rows if args.rows is not None else range(len(ROWS)):
        cmd = ROWS[i]
        try:
            r, wall, _ = run_train(shlex.split(cmd)[2:])
        except RuntimeError as e:
            print(f"| failed | | | | | `{cmd}`: {e} |", flush=True)
            continue
        print(f"| {r['dataset']} | {r['model']} | {r['test_accuracy']:.2%} | {r['train_seconds']:.0f} s "
              f"| {wall:.0f} s | `{cmd}` |", flush=True)

if __name__ == "__main__":
    main()
