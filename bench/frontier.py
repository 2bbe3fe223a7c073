"""Accuracy against wall time for a recipe: the same recipe trained for several budgets (epochs), over seeds.

    python bench/frontier.py                                 # --recipe best at 15, 30, 50 (its own) and 80 epochs
    python bench/frontier.py --epochs 15 30 --seeds 0        # a quick look
    python bench/frontier.py --extra "--optimizer sgd"       # the frontier of a variant of the recipe

Why budgets rather than one long run's epoch-by-epoch curve: the recipes' learning rate falls to zero at the
last epoch (one-cycle), and most of the accuracy comes in that fall, so epoch 20 of a 50-epoch run says little
about a 20-epoch run. Each point is a whole run of its own.

Each run is `mnistlab train --recipe RECIPE --dataset fashion-mnist --epochs E --seed S` in a fresh process,
timed from process start to exit (imports, data, training, the final evaluation with its test-time
augmentation); runs go one after the other, so nothing else should run on the machine meanwhile. Finished runs
are kept in --out (one JSON line each) and reused: run the script again and only what is missing trains.

Printed: per budget the median wall time (and range), training seconds, validation and test accuracy mean +- std;
then the time to --target (default 94.0%): the shortest budget whose mean validation accuracy passes it, and the
shortest whose mean test accuracy does. Choices are made on validation; test is reported.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from common import accuracy_spread, machine_line, run_train

from mnistlab.config import RECIPES


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="best", choices=sorted(RECIPES))
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--epochs", type=int, nargs="+",
                    help="budgets (default: 0.3, 0.6, 1 and 1.6 times the recipe's own epochs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per budget (default: 0 1 2)")
    ap.add_argument("--extra", default="", help="more `mnistlab train` flags, as one quoted string")
    ap.add_argument("--target", type=float, default=0.94, help="the accuracy to time (default: 0.94)")
    ap.add_argument("--out", default="runs/frontier.jsonl", help="finished runs, reused (default: %(default)s)")
    args = ap.parse_args()
    own = RECIPES[args.recipe]["epochs"]
    budgets = sorted(set(args.epochs or [max(1, round(f * own)) for f in (0.3, 0.6, 1.0, 1.6)]))
    extra = shlex.split(args.extra)
    out = Path(args.out)
    done: dict[tuple, dict] = {}
    if out.exists():
        for line in out.read_text().splitlines():
            record = json.loads(line)
            done[(record["recipe"], record["dataset"], record["extra"], record["epochs"], record["seed"])] = record

    rows = []
    for epochs in budgets:
        records = []
        for seed in args.seeds:
            key = (args.recipe, args.dataset, args.extra, epochs, seed)
            if key not in done:
                flags = ["--recipe", args.recipe, "--dataset", args.dataset, "--epochs", str(epochs),
                         "--seed", str(seed), *extra]
                print(f"mnistlab train {shlex.join(flags)}", file=sys.stderr, flush=True)
                results, wall, _ = run_train(flags)
                done[key] = dict(recipe=args.recipe, dataset=args.dataset, extra=args.extra, epochs=epochs, seed=seed,
                                 wall=wall, train_seconds=results["train_seconds"], precision=results["precision"],
                                 val_accuracy=results["val_accuracy"], test_accuracy=results["test_accuracy"])
                out.parent.mkdir(parents=True, exist_ok=True)
                with out.open("a") as f:
                    f.write(json.dumps(done[key]) + "\n")
                print(f"  {wall:.1f} s, validation {100 * results['val_accuracy']:.2f}%", file=sys.stderr, flush=True)
            records.append(done[key])
        walls = [r["wall"] for r in records]
        rows.append(dict(epochs=epochs, wall=statistics.median(walls), low=min(walls), high=max(walls),
                         train=statistics.median(r["train_seconds"] for r in records),
                         val=[r["val_accuracy"] for r in records], test=[r["test_accuracy"] for r in records],
                         precision=",".join(sorted({r["precision"] for r in records}))))

    print(f"`mnistlab train --recipe {args.recipe} --dataset {args.dataset}{' ' + args.extra if args.extra else ''}"
          f" --epochs E`, seeds {' '.join(map(str, args.seeds))}; {machine_line()}\n")
    print("| epochs | wall, median (range) | training | precision | validation | test |")
    print("|---:|---|---:|---|---|---|")
    for r in rows:
        print(f"| {r['epochs']} | {r['wall']:.0f} s ({r['low']:.0f}-{r['high']:.0f}) | {r['train']:.0f} s | "
              f"{r['precision']} | {accuracy_spread(r['val'])} | {accuracy_spread(r['test'])} |")
    print()
    for split in ("val", "test"):
        passed = [r for r in rows if statistics.mean(r[split]) >= args.target]
        name = "validation" if split == "val" else "test"
        if passed:
            r = passed[0]
            print(f"time to {100 * args.target:.1f}% ({name}, mean of the seeds): {r['epochs']} epochs, "
                  f"{r['wall']:.0f} s of wall time")
        else:
            print(f"time to {100 * args.target:.1f}% ({name}): not reached within {budgets[-1]} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
