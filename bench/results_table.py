"""Run the README's results commands over several seeds and print the full table of docs/experiments.md.

    python bench/results_table.py                        # every row, seeds 0 1 2 (about 75 minutes on 2 cores)
    python bench/results_table.py --rows 0 1 --seeds 0   # a quick look

Each row is a `mnistlab train` command as a user would type it. The script trains it as a
`mnistlab compare` grid of one model over the seeds, in its own folder (-o DIR/row<i>), then prints
one leaderboard over every row (`mnistlab compare DIR/row0 DIR/row1 ...`): test accuracy as mean +-
std over the seeds (sample std), whether each row is distinguishable from the best, costs and
latencies, on the machine it names. Run it again and the finished runs are reused: only what is
missing trains (change the seeds, or remove DIR, for new numbers). Settings are chosen on validation
accuracy; test accuracy is reported, never used to choose.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROWS = [
    "mnistlab train --dataset digits",
    "mnistlab train --dataset fashion-mnist --model linear",
    "mnistlab train --dataset fashion-mnist --model mlp",
    "mnistlab train --dataset fashion-mnist --model lenet5",
    "mnistlab train --dataset fashion-mnist",
    "mnistlab train --dataset fashion-mnist --model rnn",
    "mnistlab train --dataset fashion-mnist --model gru",
    "mnistlab train --dataset fashion-mnist --model lstm",
    "mnistlab train --dataset fashion-mnist --model vit",
    "mnistlab train --dataset fashion-mnist --recipe fast",
    "mnistlab train --dataset fashion-mnist --recipe best",
]


def grid_flags(command: str) -> list[str]:
    """The `mnistlab compare` flags that train `command`'s configuration: its model named (the default cnn,
    or its recipe's), its dataset and recipe as given."""
    from mnistlab.config import RECIPES, TrainConfig

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--dataset", required=True)
    p.add_argument("--model")
    p.add_argument("--recipe")
    row = p.parse_args(shlex.split(command)[2:])
    model = row.model or (RECIPES[row.recipe]["model"] if row.recipe else TrainConfig.model)
    return ["--dataset", row.dataset, "--models", model, *(["--recipe", row.recipe] if row.recipe else [])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", help="indices of the rows to run (default: all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per row (default: 0 1 2)")
    ap.add_argument("-o", "--output", default="runs/results-table",
                    help="folder for the rows' runs and the leaderboard (default: runs/results-table)")
    args = ap.parse_args()
    out = Path(args.output)
    compare = [sys.executable, "-m", "mnistlab", "compare"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = args.rows if args.rows is not None else range(len(ROWS))
    finished: list[str] = []
    for i in rows:
        row_dir = out / f"row{i}"
        flags = [*grid_flags(ROWS[i]), "--seeds", *map(str, args.seeds), "-o", str(row_dir)]
        print(f"row {i}: `{ROWS[i]}` -> `mnistlab compare {shlex.join(flags)}`", file=sys.stderr, flush=True)
        # the row's own leaderboard stays in its folder; its progress lines go to stderr
        subprocess.run([*compare, *flags], stdout=subprocess.DEVNULL)
        runs = sorted(p.parent for p in row_dir.glob("*/results.json"))
        all_done = len(runs) == len(list(row_dir.glob("*/config.json")))
        finished += [str(row_dir)] if runs and all_done else [str(p) for p in runs]  # a failed run stays out
    if not finished:
        print("no run finished: no table", file=sys.stderr)
        return 1
    print(f"commit {commit or 'unknown'}; seeds {' '.join(map(str, args.seeds))}; rows (`mnistlab train` as typed): "
          + "; ".join(f"row{i} `{ROWS[i]}`" for i in rows) + "\n", flush=True)
    return subprocess.run([*compare, *finished, "-o", str(out)]).returncode


if __name__ == "__main__":
    sys.exit(main())
