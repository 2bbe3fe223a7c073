"""Time to accuracy on a CUDA GPU: MNIST to 99% test accuracy, Fashion-MNIST to 93% and 94%.

    python bench/gpu.py                                   # every target, seeds 0 1 2, on the GPU
    python bench/gpu.py --compile                         # the same with torch.compile
    python bench/gpu.py --data-dir mnist=/data/mnist      # MNIST from a folder (the GPU machine is offline)
    python bench/gpu.py --datasets fashion-mnist --seeds 0
    python bench/gpu.py --smoke --device cpu -o /tmp/g    # the plumbing only: digits, 1 epoch, on the CPU

Each (dataset, seed) is one `python -m mnistlab train` process as a user would start it, with the
configuration in CONFIGS below, --device cuda, --precision auto (bf16 autocast where the GPU computes
it natively) and --offline, its run folder under -o DIR. The two Fashion-MNIST targets read the same
runs. Reported per target, as mean +- sample std over the seeds: training seconds (results.json's
train_seconds: the training steps only, without validation, evaluation or process start; with
--compile it includes the compilation, in the first epoch), the first epoch whose validation accuracy
reached the target and the training seconds up to the end of it (metrics.jsonl), the final test
accuracy, and images/s (the median of the epochs', so a compiled first epoch does not count). A target
is met when the mean test accuracy reaches it and, where it has one, the mean training seconds are
within its time limit (the limits are for an H100/H200-class GPU). A dataset that is not on the
machine is skipped with one line: nothing is downloaded.

Without a CUDA device the script exits 2 with one line, unless --device cpu is given (then it runs on
the CPU: slow, except with --smoke).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mnistlab.run import METRICS, read_metrics

# The `mnistlab train` flags per dataset. On a big GPU a step of these small CNNs costs about the same at
# batch 512 as at 256 (kernel launches, not arithmetic, bound it), so time to accuracy is set by the
# number of steps: twice the CPU recipes' batch with twice their learning rate (linear scaling) halves
# the steps. MNIST: the `fast` recipe's CNN (3 epochs). Fashion-MNIST: the `best` recipe (30 epochs,
# shifts, flips, shift TTA at the end), whose ~94% needs its full schedule. A larger evaluation batch
# only shortens the (untimed) validation. Written without a GPU to measure on: a starting point, and
# the table says whether it meets the targets.
CONFIGS: dict[str, list[str]] = {
    "mnist": ["--recipe", "fast", "--batch-size", "512", "--lr", "0.4", "--eval-batch-size", "10000"],
    "fashion-mnist": ["--recipe", "best", "--batch-size", "512", "--lr", "0.2", "--eval-batch-size", "10000"],
}
# --smoke: the script's plumbing in seconds on any device (bundled digits, a narrow CNN, one epoch)
SMOKE_CONFIG = ["--model", "cnn", "--model-arg", "widths=[8,16,32]", "--epochs", "1", "--batch-size", "32"]


@dataclass(frozen=True)
class Target:
    dataset: str
    accuracy: float  # test accuracy to reach (and validation accuracy for the epoch columns)
    seconds: float | None  # training-time limit on an H100/H200-class GPU; None: accuracy only

    def label(self) -> str:
        limit = f" in < {self.seconds:g} s" if self.seconds is not None else ""
        return f"{self.dataset} {self.accuracy:.0%}{limit}"


TARGETS = [Target("mnist", 0.99, 1.0), Target("fashion-mnist", 0.93, None), Target("fashion-mnist", 0.94, 5.0)]
SMOKE_TARGETS = [Target("digits", 0.5, None)]


def data_dirs(pairs: list[str]) -> dict[str, str]:
    """--data-dir NAME=DIR values as {name: dir}."""
    dirs = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--data-dir {pair!r}: expected DATASET=DIR, e.g. mnist=/data/mnist")
        dirs[name] = folder
    return dirs


def unavailable(dataset: str, folder: str | None) -> str | None:
    """Why `dataset` cannot be trained offline here, or None when its files are on disk (or bundled)."""
    from mnistlab.data.registry import get_spec
    from mnistlab.data.resolve import find_idx_files, find_present

    if folder is not None:
        return None if find_idx_files(Path(folder)) else f"--data-dir {folder} lacks its four IDX files"
    spec = get_spec(dataset)
    if not spec.is_idx or find_present(spec) is not None:
        return None
    return f"not on this machine and nothing is downloaded (give --data-dir {dataset}=DIR)"


def free_dir(path: Path) -> Path:
    """`path`, or path-2, path-3, ... if it is taken: an earlier run's folder is never overwritten."""
    candidate, i = path, 1
    while candidate.exists():
        i += 1
        candidate = path.with_name(f"{path.name}-{i}")
    return candidate


def train(flags: list[str], run_dir: Path) -> tuple[dict, list[dict]] | str:
    """Run `python -m mnistlab train FLAGS --run-dir RUN_DIR`; (results.json, metrics records), or why it failed."""
    cmd = [sys.executable, "-m", "mnistlab", "train", *flags, "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"exit {proc.returncode}: {last}"
    metrics = read_metrics(run_dir / METRICS)
    return json.loads((run_dir / "results.json").read_text()), metrics


def first_reaching(metrics: list[dict], accuracy: float) -> tuple[int, float] | None:
    """(epoch, training seconds to its end) of the first epoch whose validation accuracy reached `accuracy`."""
    seconds = 0.0
    for record in metrics:
        seconds += record["seconds"]
        if record["val_accuracy"] >= accuracy:
            return record["epoch"], seconds
    return None


def mean_std(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} +- {format(statistics.stdev(values), fmt)}"


def row(target: Target, runs: list[tuple[dict, list[dict]]], n_seeds: int) -> tuple[str, bool]:
    """The table row of `target` over its finished runs, and whether the target was met."""
    train_s = [r["train_seconds"] for r, _ in runs]
    test = [r["test_accuracy"] for r, _ in runs]
    rate = [statistics.median(m["images_per_second"] for m in metrics) for _, metrics in runs]
    reached = [hit for _, metrics in runs if (hit := first_reaching(metrics, target.accuracy)) is not None]
    if reached:
        some = "" if len(reached) == len(runs) else f" ({len(reached)}/{len(runs)} runs)"
        epoch = mean_std([float(e) for e, _ in reached], ".1f") + some
        to_target = mean_std([s for _, s in reached], ".2f") + some
    else:
        epoch = to_target = "not reached"
    problems = []
    if statistics.mean(test) < target.accuracy:
        problems.append(f"test {statistics.mean(test):.2%} < {target.accuracy:.0%}")
    if target.seconds is not None and statistics.mean(train_s) > target.seconds:
        problems.append(f"{statistics.mean(train_s):.2f} s > {target.seconds:g} s")
    met = not problems
    cells = [target.label(), f"{len(runs)}/{n_seeds}", mean_std(train_s, ".2f"), epoch, to_target,
             mean_std([100 * t for t in test], ".2f") + "%", mean_std(rate, ",.0f"),
             "yes" if met else "no: " + ", ".join(problems)]
    return "| " + " | ".join(cells) + " |", met


def device_line(device: str) -> str:
    """What the timings were measured on: the GPU and torch's CUDA build, then the CPU (machine_line)."""
    import torch

    from mnistlab.inspect.leaderboard import machine_line

    if device != "cuda":
        return f"device {device}; {machine_line()}"
    props = torch.cuda.get_device_properties(0)
    return (f"GPU {torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, compute capability "
            f"{props.major}.{props.minor}), torch {torch.__version__}, CUDA {torch.version.cuda}; {machine_line()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds per dataset (default: 0 1 2; with --smoke: 0)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cuda (default), or cpu: a smoke run of the plumbing where there is no GPU")
    ap.add_argument("--compile", action="store_true", help="train with --compile (torch.compile)")
    ap.add_argument("--datasets", nargs="+", choices=list(CONFIGS), help="only these datasets' targets")
    ap.add_argument("--data-dir", action="append", default=[], metavar="DATASET=DIR",
                    help="train DATASET from the IDX files in DIR (repeatable), e.g. mnist=/data/mnist")
    ap.add_argument("--train-args", default="", metavar="ARGS",
                    help='more `mnistlab train` flags for every run, one string: --train-args="--threads 4"')
    ap.add_argument("--smoke", action="store_true", help="digits for 1 epoch instead of the targets (seconds)")
    ap.add_argument("-o", "--output", default="runs/bench-gpu",
                    help="folder for the run folders (default: runs/bench-gpu); earlier runs there are kept")
    args = ap.parse_args()
    try:
        dirs = data_dirs(args.data_dir)
    except ValueError as e:
        ap.error(str(e))

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees no GPU; "
              "run on a CUDA machine, or give --device cpu (with --smoke) to check the plumbing", file=sys.stderr)
        return 2
    seeds = args.seeds if args.seeds is not None else ([0] if args.smoke else [0, 1, 2])
    targets = SMOKE_TARGETS if args.smoke else [t for t in TARGETS if not args.datasets or t.dataset in args.datasets]
    configs = {"digits": SMOKE_CONFIG} if args.smoke else CONFIGS
    common = ["--device", args.device, "--precision", "auto", "--offline", *(["--compile"] if args.compile else []),
              *shlex.split(args.train_args)]
    out = Path(args.output)

    runs: dict[str, list[tuple[dict, list[dict]]]] = {}
    commands = []
    for dataset in dict.fromkeys(t.dataset for t in targets):  # each dataset once, in the targets' order
        why = unavailable(dataset, dirs.get(dataset))
        if why is not None:
            print(f"skipping {dataset}: {why}", file=sys.stderr, flush=True)
            continue
        source = ["--data-dir", dirs[dataset]] if dataset in dirs else []
        flags = ["--dataset", dataset, *source, *configs[dataset], *common]
        commands.append(f"`mnistlab train {shlex.join(flags)} --seed S`")
        runs[dataset] = []
        for seed in seeds:
            run_dir = free_dir(out / f"{dataset}{'-compile' if args.compile else ''}-seed{seed}")
            print(f"{dataset} seed {seed}: {run_dir}", file=sys.stderr, flush=True)
            result = train([*flags, "--seed", str(seed)], run_dir)
            if isinstance(result, str):
                print(f"{dataset} seed {seed} failed ({result})", file=sys.stderr, flush=True)
                continue
            runs[dataset].append(result)
    rows = [(t, runs[t.dataset]) for t in targets if runs.get(t.dataset)]
    if not rows:
        print("no run finished: no table", file=sys.stderr)
        return 1

    print("| target | runs | train s | first epoch at target (val) | train s to it | test accuracy | images/s | met |")
    print("|---|---|---|---|---|---|---|---|")
    for target, finished in rows:
        print(row(target, finished, len(seeds))[0])
    precisions = sorted({r["precision"] for finished in runs.values() for r, _ in finished})
    print(f"\nseeds {' '.join(map(str, seeds))}; precision {', '.join(precisions)}; "
          f"compile {'on' if args.compile else 'off'}; commands: " + "; ".join(commands))
    print(device_line(args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
