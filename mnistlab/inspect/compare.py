"""`mnistlab compare`: train a grid of models x seeds, or gather finished runs, into a leaderboard.

    mnistlab compare --dataset fashion-mnist --models cnn vit lstm --seeds 0 1 2 -o runs/cmp
    mnistlab compare --dataset digits --models linear mlp --seeds 0 1 --epochs 1 -o /tmp/cmp
    mnistlab compare runs/cmp/cnn-seed0 runs/other-run      # aggregate finished runs (printed only)
    mnistlab compare runs/* -o runs                        # ... and write the leaderboard files into runs/
    mnistlab compare runs/cmp                              # a folder of runs stands for the runs inside

The grid. Every (model, seed) trains in its own process, `python -m mnistlab train ...`, into
DIR/<model>[-<recipe>]-seed<S>, its output kept in that folder's train.log. The whole grid is checked
before anything trains (model names, the recipe fits each model, the dataset exists, and a folder
already there holds the same configuration), so a typo costs nothing. Run again, it picks up where it
stopped: a finished run (results.json) is skipped, a run killed after it wrote its config is continued
with `mnistlab train --resume`, which restarts from its last checkpoint. A failed run is one line naming
its log; the others go on, and the exit status is 1 at the end. Ctrl-C stops the run in progress the
way `mnistlab train` does (it saves a checkpoint), so the next invocation continues it.

The leaderboard (inspect/leaderboard.py: grouping, statistics, files) goes to DIR as leaderboard.md,
.csv and .png; the markdown is printed on stdout, the progress lines on stderr. Aggregating RUN_DIRs
prints the leaderboard and writes files only where -o says: a command that reads runs does not drop
files into whatever folder it was started from. Folders among the RUN_DIRs that are not finished
training runs (pre-training runs, unfinished runs, a failed start's `.lock`, anything else) are skipped,
one line each saying why; only when none is left is it an error.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mnistlab.errors import UserError
from mnistlab.files import disk_error
from mnistlab.inspect.leaderboard import (
    CHECKPOINT,
    CONFIG,
    RESULTS,
    WHERE_FIELDS,
    gather_runs,
    load_run,
    write_leaderboard,
)

DEFAULT_DATASET, DEFAULT_SEEDS, DEFAULT_GRID_DIR = "fashion-mnist", (0, 1, 2), "runs/compare"
LOG = "train.log"


def note(msg: str, end: str = "\n") -> None:
    print(msg, end=end, file=sys.stderr, flush=True)


@dataclass
class GridRun:
    """One cell of the grid: what to train and where."""

    model: str
    seed: int
    path: Path
    train_args: list[str]  # the `mnistlab train` flags, --run-dir included

    @property
    def name(self) -> str:
        return f"{self.model} seed {self.seed}"

    def state(self) -> str:
        """finished, resume (a config or checkpoint is there) or new."""
        if (self.path / RESULTS).is_file():
            return "finished"
        if (self.path / CONFIG).is_file() or (self.path / CHECKPOINT).is_file():
            return "resume"
        return "new"


def plan_grid(dataset: str, models: list[str], seeds: list[int], out: Path, recipe: str | None = None,
              epochs: int | None = None) -> list[GridRun]:
    """Every (model, seed) of the grid, each config resolved and checked before anything trains."""
    from mnistlab.config import TrainConfig, resolve_config
    from mnistlab.data.registry import get_spec
    from mnistlab.models import model_entry

    get_spec(dataset)
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out}: not a folder")
    for model in models:
        model_entry(model)  # every unknown name fails here, before any training
    plan = []
    for model in dict.fromkeys(models):
        for seed in dict.fromkeys(seeds):
            path = out / (f"{model}-{recipe}-seed{seed}" if recipe else f"{model}-seed{seed}")
            flags = dict(dataset=dataset, model=model, recipe=recipe, epochs=epochs, seed=seed)
            cfg = resolve_config(dict(flags, run_dir=str(path)))  # a recipe for another model fails here
            if (path / CONFIG).is_file():
                saved = TrainConfig.load(path / CONFIG).to_dict()
                differ = [k for k, v in cfg.to_dict().items() if k not in WHERE_FIELDS and saved[k] != v]
                if differ:
                    k = differ[0]
                    raise UserError(f"{path} holds a run with {k}={saved[k]!r}, not {cfg.to_dict()[k]!r} as this "
                                    f"grid asks ({len(differ)} field(s) differ); choose another -o DIR")
            args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items() if v is not None]
            plan.append(GridRun(model, seed, path, [*args, f"--run-dir={path}"]))
    return plan


def _last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def run_one(run: GridRun, threads: int | None) -> int:
    """Train (or resume) one cell in a child process, its stdout and stderr appended to its train.log."""
    how = ["--resume", str(run.path)] if run.state() == "resume" else run.train_args
    cmd = [sys.executable, "-m", "mnistlab", "train", *how, *([f"--threads={threads}"] if threads else [])]
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        log = open(run.path / LOG, "a")  # closed below, once the child ends
        log.write(f"$ mnistlab train {shlex.join(cmd[4:])}\n")
        log.flush()
    except OSError as e:
        raise disk_error(run.path / LOG, e) from None
    with log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            # the child got the same Ctrl-C: let it finish its step and write its checkpoint
            note(f"\nwaiting for {run.name} to save its checkpoint (Ctrl-C again to abort it)")
            proc.wait()
            raise


def run_grid(plan: list[GridRun], threads: int | None) -> list[GridRun]:
    """Train what is left of the grid, one progress line per run; return the runs that failed."""
    failed = []
    for i, run in enumerate(plan, 1):
        state = run.state()
        head = f"[{i}/{len(plan)}] {run.name}:"
        if state == "finished":
            note(f"{head} finished earlier, skipped ({run.path})")
            continue
        # one line per run: its start, then its outcome once the child process ends
        note(f"{head} {'resuming' if state == 'resume' else 'training'} in {run.path} ...", end=" ")
        t0 = time.perf_counter()
        code = run_one(run, threads)
        wall = time.perf_counter() - t0
        if code == 0 and (run.path / RESULTS).is_file():
            note(f"done in {wall:.1f} s")
            continue
        failed.append(run)
        last = _last_line(run.path / LOG)
        note(f"FAILED ({_exit_reason(code)}{': ' + last if last else ''}); log: {run.path / LOG}")
    return failed


def _command(args: argparse.Namespace, dataset: str, seeds: list[int], out: Path) -> str:
    """The grid's command line as a user would type it (the leaderboard names it)."""
    parts = ["mnistlab", "compare", "--dataset", dataset, "--models", *args.models,
             "--seeds", *map(str, seeds)]
    parts += ["--recipe", args.recipe] if args.recipe else []
    parts += ["--epochs", str(args.epochs)] if args.epochs else []
    parts += ["--threads", str(args.threads)] if args.threads else []
    return shlex.join([*parts, "-o", str(out)])


def aggregate(args: argparse.Namespace) -> int:
    """Leaderboard of the finished training runs among args.run_dirs, printed; files only with -o."""
    runs, skipped = gather_runs(args.run_dirs)
    if not runs and len(skipped) == 1:
        raise UserError(skipped[0][1])  # the one folder named: its reason is the error
    for _, reason in skipped:
        note(f"skipped {reason}")
    if not runs:
        raise UserError(f"nothing to aggregate: none of the {len(skipped)} folders is a finished training run "
                        "(each is named above)")
    out = Path(args.output) if args.output else None
    command = shlex.join(["mnistlab", "compare", *args.run_dirs, *(["-o", args.output] if args.output else []),
                          *(["--threads", str(args.threads)] if args.threads else [])])
    print(write_leaderboard(runs, out, command, threads=args.threads), flush=True)
    if out is None:
        note("leaderboard printed only; -o DIR writes leaderboard.md, .csv and .png there")
    else:
        note(f"wrote {out / 'leaderboard.md'}, leaderboard.csv, leaderboard.png")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """The `mnistlab compare` command: a grid (with --models) or an aggregation (RUN_DIRs)."""
    grid_flags = [f for f in ("dataset", "seeds", "recipe", "epochs") if getattr(args, f) is not None]
    if args.run_dirs and args.models:
        raise UserError("compare: give RUN_DIRs to aggregate, or --models to train a grid, not both")
    if args.run_dirs:
        if grid_flags:
            raise UserError(f"compare: --{grid_flags[0]} sets up a grid (with --models); RUN_DIRs are compared as "
                            "they were trained")
        return aggregate(args)
    if not args.models:
        raise UserError("compare: nothing to aggregate; give finished RUN_DIRs, or --models (and --seeds) to "
                        "train a grid")
    dataset, seeds = args.dataset or DEFAULT_DATASET, list(args.seeds or DEFAULT_SEEDS)
    out = Path(args.output or DEFAULT_GRID_DIR)
    plan = plan_grid(dataset, args.models, seeds, out, args.recipe, args.epochs)
    failed = run_grid(plan, args.threads)
    done = [r.path for r in plan if r.state() == "finished"]
    if failed:
        note(f"{len(failed)} of {len(plan)} runs failed: {', '.join(r.name for r in failed)}; run the same command "
             "again to retry them (finished runs are kept)")
    if not done:
        note("no run of the grid finished: nothing to aggregate")
        return 1
    runs = [load_run(p) for p in done]
    print(write_leaderboard(runs, out, _command(args, dataset, seeds, out), threads=args.threads), flush=True)
    note(f"wrote {out / 'leaderboard.md'}, leaderboard.csv, leaderboard.png")
    return 1 if failed else 0
