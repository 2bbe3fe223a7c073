"""The leaderboard: finished runs grouped by configuration, test accuracy as mean +- std over seeds.

    from mnistlab.inspect.leaderboard import gather_runs, write_leaderboard
    runs, skipped = gather_runs(["runs/a", "runs/b", "runs/pretrained"])  # skipped: (folder, why) of the others
    markdown = write_leaderboard(runs, "out/", command="mnistlab compare runs/a runs/b")  # out None: print only

Groups. Runs belong together when their configs agree on everything but the seed and the fields that
say where or how a run was executed, not what it computes (WHERE_FIELDS): the run folder, threads and
device (the same arithmetic, other hardware), where the data was found (the dataset name is kept),
the evaluation batch size, deterministic kernels (bit-level, not meaning), torch.compile (the same
function, compiled), and the diagnostics: gradient flow (recorded on a copy of the model) and TensorBoard
logs (written at epoch ends) do not touch training. Dataset, model and recipe are config fields, so they
are part of the key; a recipe run and a run given the recipe's values by hand stay apart, as they were
asked for differently.

Statistics (after airbench: mean +- std over seeds, never a single lucky run). Test accuracy: mean and
sample standard deviation (ddof=1) over the group's runs. "vs best": a two-sided Welch's t-test (unequal
variances) of each group against the group with the best mean on the same dataset, at the 5% level.
"tie" means the seeds cannot tell the two apart, not that they are equal: with 2 or 3 seeds only large
gaps are detected, and there is no correction for the number of comparisons. With one run in either
group there is no spread to test against, and the leaderboard says it cannot tell.

Costs. Parameters and forward MFLOPs (one image, models/flops.py) of the trained model; training
seconds and images/s as the runs recorded them (metrics.jsonl); inference latency measured here, on
the CPU, at batch 1 and 256: one run of the group loaded, warmed up, median of repeated forwards.

Which folders count. Finished training runs only (config.json, results.json with a test accuracy, the
checkpoint): `gather_runs` sets aside, each with its reason, pre-training runs (an encoder, no test
accuracy), unfinished runs, folders a failed start left holding only `.lock`, and anything else.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from mnistlab.config import TrainConfig
from mnistlab.errors import UserError
from mnistlab.files import atomic_write_text
from mnistlab.record import RunRecord
from mnistlab.run import CHECKPOINT, CONFIG, ENV, LOCK, RESULTS, cpu

# Config fields that say where or how a run executed, not what it computes (module docstring).
WHERE_FIELDS = frozenset({"run_dir", "threads", "device", "data_dir", "offline", "eval_batch_size", "deterministic",
                          "grad_flow", "grad_flow_steps", "tensorboard", "compile"})  # compile: how, not what
ALPHA = 0.05  # the level of the tie test
LATENCY_BATCHES = (1, 256)


@dataclass
class Run:
    """A finished run folder, read."""

    path: Path
    config: dict[str, Any]  # the full TrainConfig, as TrainConfig.from_dict normalises it
    results: dict[str, Any]
    metrics: list[dict[str, Any]]
    env: dict[str, Any]

    @property
    def images_per_second(self) -> float | None:
        """Training throughput over all epochs: images seen / seconds spent."""
        timed = [r for r in self.metrics if "seconds" in r and "images_per_second" in r]
        seconds = sum(r["seconds"] for r in timed)
        seen = sum(r["images_per_second"] * r["seconds"] for r in timed)
        return seen / seconds if seconds > 0 else None


@dataclass
class Verdict:
    """How a group stands against the best group of its dataset."""

    text: str  # best, tie, worse, cannot tell
    p_value: float | None = None


@dataclass
class Row:
    """One group of runs and everything the leaderboard says about it."""

    runs: list[Run]
    label: str = ""
    verdict: Verdict = field(default_factory=lambda: Verdict("best"))
    rank: int = 0
    mflops: float | None = None
    latency_ms: dict[int, float] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config

    @property
    def test(self) -> list[float]:
        return [r.results["test_accuracy"] for r in self.runs]

    @property
    def mean(self) -> float:
        return statistics.mean(self.test)

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof=1); None for a single run."""
        return statistics.stdev(self.test) if len(self.test) > 1 else None

    @property
    def best_val(self) -> float | None:
        return _mean(r.results.get("best_val_accuracy") for r in self.runs)

    @property
    def params(self) -> float | None:
        return _mean(r.results.get("params") for r in self.runs)

    @property
    def train_seconds(self) -> list[float]:
        return [r.results["train_seconds"] for r in self.runs if "train_seconds" in r.results]

    @property
    def images_per_second(self) -> float | None:
        return _mean(r.images_per_second for r in self.runs)


def _mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values known (a field an older run did not record is None); None if none is."""
    known = [v for v in values if v is not None]
    return statistics.mean(known) if known else None


def load_run(path: str | Path) -> Run:
    """Read a finished training run folder; anything else is a UserError saying what it is."""
    record = RunRecord(path)
    path = record.path
    if not path.is_dir():
        raise UserError(f"{path}: {'not a folder' if path.exists() else 'no such run folder'}")
    if record.is_pretraining():
        raise UserError(f"{path}: a pre-training run (an encoder: no test accuracy to compare)")
    if [p.name for p in path.iterdir()] == [LOCK]:
        raise UserError(f"{path}: holds only {LOCK} (a run that stopped before its first checkpoint); delete it")
    missing = [n for n in (CONFIG, RESULTS, CHECKPOINT) if not record.has(n)]
    if missing:
        hint = (f"; unfinished: `mnistlab train --resume {path}` finishes it"
                if record.has(CONFIG) and RESULTS in missing else "")
        raise UserError(f"{path}: not a finished run (no {', '.join(missing)}){hint}")
    config = TrainConfig.from_dict(record.config(), source=str(path / CONFIG)).to_dict()
    results = record.results()
    if "test_accuracy" not in results:
        raise UserError(f"{path / RESULTS}: no test_accuracy in it")
    env = record.env() if record.has(ENV) else {}
    return Run(path, config, results, record.metrics(), env)


def expand_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """The run folders named: a folder that is no run but holds runs (a grid's -o DIR) stands for them.
    The same folder named twice counts once."""
    out: list[Path] = []
    for p in map(Path, paths):
        is_run = (p / CONFIG).is_file() or (p / RESULTS).is_file()
        inner = sorted(d for d in p.iterdir() if (d / CONFIG).is_file()) if p.is_dir() and not is_run else []
        for d in inner or [p]:
            if d.resolve() not in {o.resolve() for o in out}:
                out.append(d)
    return out


def gather_runs(paths: Sequence[str | Path]) -> tuple[list[Run], list[tuple[Path, str]]]:
    """The finished training runs among `paths` (a folder of runs stands for the runs inside), and the
    folders set aside, each with the one-line reason load_run gives."""
    runs, skipped = [], []
    for path in expand_run_dirs(paths):
        try:
            runs.append(load_run(path))
        except UserError as e:
            skipped.append((path, str(e)))
    return runs, skipped


def group_key(config: dict[str, Any]) -> str:
    """What makes runs comparable: the config less the seed and WHERE_FIELDS, as canonical JSON."""
    return json.dumps({k: v for k, v in config.items() if k not in WHERE_FIELDS | {"seed"}}, sort_keys=True)


def group_runs(runs: Iterable[Run]) -> list[list[Run]]:
    """Runs grouped by group_key, each group sorted by seed, groups in order of first appearance."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_key(run.config), []).append(run)
    return [sorted(g, key=lambda r: r.config["seed"]) for g in groups.values()]


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test for equal means; None when either sample has one value."""
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb, va, vb = statistics.mean(a), statistics.mean(b), statistics.variance(a), statistics.variance(b)
    se2 = va / len(a) + vb / len(b)
    if se2 == 0:  # no spread in either: equal means are the same, any gap is certain
        return 1.0 if ma == mb else 0.0
    from scipy import stats

    t = (ma - mb) / math.sqrt(se2)
    # Welch-Satterthwaite degrees of freedom; a zero-variance term contributes nothing
    df = se2**2 / sum((v / n) ** 2 / (n - 1) for v, n in ((va, len(a)), (vb, len(b))) if v > 0)
    return float(2 * stats.t.sf(abs(t), df))


def compare_to_best(samples: Sequence[Sequence[float]], alpha: float = ALPHA) -> list[Verdict]:
    """For each sample of accuracies: best (highest mean, the first of equals), tie, worse, or cannot tell."""
    best = max(range(len(samples)), key=lambda i: (statistics.mean(samples[i]), -i))
    verdicts = []
    for i, s in enumerate(samples):
        if i == best:
            verdicts.append(Verdict("best"))
            continue
        p = welch_p_value(samples[best], s)
        if p is None:
            verdicts.append(Verdict("cannot tell"))
        else:
            verdicts.append(Verdict("tie" if p >= alpha else "worse", p))
    return verdicts


def _labels(rows: list[Row]) -> None:
    """The model, its recipe, and the config values that set a row apart from the others of that model and recipe."""
    for row in rows:
        c = row.config
        same = [r.config for r in rows if [r.config[k] for k in ("dataset", "model", "recipe")] ==
                [c[k] for k in ("dataset", "model", "recipe")]]
        differ = [k for k in c if k not in WHERE_FIELDS | {"seed"} and any(o[k] != c[k] for o in same)]
        parts = [c["model"]] + ([f"recipe {c['recipe']}"] if c["recipe"] else [])
        parts += [f"{k}={c[k] if isinstance(c[k], str) else json.dumps(c[k], separators=(',', ':'))}" for k in differ]
        row.label = " ".join(parts)




def measure_latency_ms(model: Any, batch: int, in_chans: int = 1, repeats: int = 30, budget_s: float = 1.0) -> float:
    """Median milliseconds of one forward of `batch` images on the CPU, after 3 warm-up forwards."""
    import torch

    x = torch.randn(batch, in_chans, 28, 28)
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        deadline = time.perf_counter() + budget_s
        while len(times) < repeats and (len(times) < 5 or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(row: Row, threads: int | None = None) -> None:
    """MFLOPs and latency of the row's first run (scratch-engine runs: not measured)."""
    import torch

    from mnistlab.models.flops import forward_flops
    from mnistlab.record import load_run_checkpoint

    model, meta = load_run_checkpoint(row.runs[0].path)
    if meta.get("engine") == "scratch":
        return
    saved = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        model = model.cpu().eval()
        row.mflops = forward_flops(model, (meta["in_chans"], 28, 28)) / 1e6
        row.latency_ms = {b: measure_latency_ms(model, b, meta["in_chans"]) for b in LATENCY_BATCHES}
    finally:
        torch.set_num_threads(saved)


def build_rows(runs: Sequence[Run], *, latency: bool = True, threads: int | None = None) -> list[Row]:
    """Group, label, rank within each dataset by mean test accuracy, test against the best, measure."""
    if not runs:
        raise UserError("nothing to aggregate: no finished runs")
    rows = [Row(g) for g in group_runs(runs)]
    _labels(rows)
    rows.sort(key=lambda r: (r.config["dataset"], -r.mean, r.label))
    for dataset in {r.config["dataset"] for r in rows}:
        mine = [r for r in rows if r.config["dataset"] == dataset]
        for rank, (row, verdict) in enumerate(zip(mine, compare_to_best([r.test for r in mine]), strict=True), 1):
            row.rank, row.verdict = rank, verdict
    if latency:
        for row in rows:
            measure(row, threads)
    return rows


def machine_line(threads: int | None = None) -> str:
    """This machine's CPU (its model and vector units), cores and torch: where the latency was measured."""
    import torch

    threads = threads or torch.get_num_threads()
    return f"CPU {cpu()}, {os.cpu_count()} cores, torch {torch.__version__}, {_threads(threads)}"


def _threads(n: Any) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.2%}"


def _num(x: float | None, fmt: str, unit: str = "") -> str:
    return "" if x is None else f"{x:{fmt}}{unit}"


def _verdict_text(v: Verdict) -> str:
    return v.text if v.p_value is None else f"{v.text} (p={v.p_value:.2g})"


def render_markdown(rows: list[Row], command: str, machine: str) -> str:
    """The leaderboard as markdown: one table per dataset, its command and machine, how to read it."""
    lines = ["# Leaderboard", "", f"`{command}`", "",
             f"{date.today().isoformat()}. Latency measured on {machine}. Training time and images/s as each run "
             f"recorded them ({_training_hardware(rows)}).", ""]
    for dataset in sorted({r.config["dataset"] for r in rows}):
        lines += [f"## {dataset}", "",
                  "| rank | model | n | test accuracy | vs best | best val | params | MFLOPs | training | images/s "
                  "| latency b=1 | latency b=256 |",
                  "|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r.config["dataset"] == dataset):
            acc = f"{r.mean:.2%}" + ("" if r.std is None else f" +- {r.std * 100:.2f}")
            lines.append(
                f"| {r.rank} | {r.label} | {len(r.runs)} | {acc} | {_verdict_text(r.verdict)} "
                f"| {_pct(r.best_val)} "
                f"| {_num(r.params, ',.0f')} | {_num(r.mflops, '.2f')} "
                f"| {_num(_mean(r.train_seconds), '.1f', ' s')} "
                f"| {_num(r.images_per_second, ',.0f')} "
                f"| {_num(r.latency_ms.get(1), '.3g', ' ms')} | {_num(r.latency_ms.get(256), '.3g', ' ms')} |")
        lines.append("")
    lines += [
        "Test accuracy: mean +- sample std (ddof=1, in points) over the n seeds. vs best: Welch's two-sided t-test "
        f"against the dataset's best mean, at the {ALPHA:.0%} level; *tie* means the seeds cannot tell the two apart "
        "(not that they are equal), *cannot tell* that one side has a single run. Best val: mean over seeds of the "
        "best per-epoch validation accuracy. Training: mean seconds of the loop. Latency: one run of the group, "
        "CPU, median of repeated forwards after warm-up. Groups: runs whose configs agree on all but the seed and "
        f"what says where or how a run executed ({', '.join(sorted(WHERE_FIELDS))}).", ""]
    return "\n".join(lines)


def _training_hardware(rows: list[Row]) -> str:
    seen = sorted({f"{r.env.get('device', '?')}, {_threads(r.env.get('torch_threads', '?'))}"
                   for row in rows for r in row.runs})
    return "; ".join(seen)


def render_csv(rows: list[Row]) -> str:
    """One line per group; accuracies as fractions, full precision (for other tools)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "rank", "group", "model", "recipe", "n", "test_accuracy_mean", "test_accuracy_std",
                "vs_best", "p_value", "best_val_accuracy", "params", "mflops", "train_seconds", "images_per_second",
                "latency_ms_b1", "latency_ms_b256", "seeds", "runs"])
    for r in rows:
        w.writerow([r.config["dataset"], r.rank, r.label, r.config["model"], r.config["recipe"] or "", len(r.runs),
                    r.mean, "" if r.std is None else r.std, r.verdict.text,
                    "" if r.verdict.p_value is None else r.verdict.p_value,
                    r.best_val,
                    r.params, _blank(r.mflops),
                    _mean(r.train_seconds),
                    _blank(r.images_per_second),
                    _blank(r.latency_ms.get(1)), _blank(r.latency_ms.get(256)),
                    " ".join(str(x.config["seed"]) for x in r.runs), ";".join(str(x.path) for x in r.runs)])
    return buf.getvalue()


def _blank(x: float | None) -> Any:
    return "" if x is None else x


def _short_seconds(v: float) -> str:
    return f"{v:g}"


def _short_count(v: float) -> str:
    """10k, 2M: parameter counts a reader takes in at a glance."""
    for scale, unit in ((1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:g}{unit}"
    return f"{v:g}"


def accuracy_error_bar(mean: float, std: float) -> list[list[float]]:
    """The error bar of an accuracy in percent, as matplotlib's [[below], [above]]: one std either way, but never
    above 100% (three seeds at 99.5, 100, 100 have a std of 0.29 points; no accuracy lies above 100)."""
    return [[std], [max(0.0, min(std, 100.0 - mean))]]


def _log_ticks(low: float, high: float) -> tuple[float, ...]:
    """Where a log axis from low to high gets labelled ticks, as multiples of each power of ten: 1, 2 and 5, unless
    fewer than three of those fall in the range (one group's runs all took 7 to 11 s), then every integer 1-9."""
    coarse = (1.0, 2.0, 5.0)
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    shown = [m * 10.0**d for d in decades for m in coarse if low <= m * 10.0**d <= high]
    return coarse if len(shown) >= 3 else tuple(float(m) for m in range(1, 10))


def plot_leaderboard(rows: list[Row], out: str | Path) -> Path:
    """Test accuracy against training time and against parameters, error bars over seeds; a row per dataset."""
    from mnistlab.plots import pyplot, save_figure

    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    datasets = sorted({r.config["dataset"] for r in rows})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(14.5, 4.6 * len(datasets) + 0.4), squeeze=False)
    colors, markers = plt.get_cmap("tab10").colors, "osD^v<>pP*"
    for ax_row, dataset in zip(axes, datasets, strict=True):
        mine = [r for r in rows if r.config["dataset"] == dataset]
        for r in mine:
            i = r.rank - 1
            style = dict(color=colors[i % 10], marker=markers[i % len(markers)], markersize=8, capsize=4,
                         linestyle="none")
            y, yerr = r.mean * 100, accuracy_error_bar(r.mean * 100, (r.std or 0.0) * 100)
            seconds = r.train_seconds
            label = f"{r.rank}. {r.label} (n={len(r.runs)})"
            for ax, x, xerr in ((ax_row[0], _mean(seconds), statistics.stdev(seconds) if len(seconds) > 1 else 0),
                                (ax_row[1], r.params, 0)):
                if x is None:  # a run that did not record it: no point rather than a wrong one
                    continue
                ax.errorbar(x, y, yerr=yerr, xerr=xerr, label=label, **style)
                ax.annotate(str(r.rank), (x, y), xytext=(7, 5), textcoords="offset points", fontsize=10,
                            color=style["color"], fontweight="bold")
        for ax, xlabel, fmt in ((ax_row[0], "training time (s, log scale)", _short_seconds),
                                (ax_row[1], "parameters (log scale)", _short_count)):
            ax.set_xscale("log")
            ax.margins(x=0.15, y=0.12)
            ax.xaxis.set_major_locator(LogLocator(subs=_log_ticks(*ax.get_xlim())))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _, fmt=fmt: fmt(v)))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{dataset} test accuracy (%)")
            ax.grid(True, which="both", alpha=0.3)
        ax_row[0].set_title(f"{dataset}: accuracy against training time")
        ax_row[1].set_title(f"{dataset}: accuracy against size")
        # beside the plots, never over a point
        ax_row[1].legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                         title="rank. group\n(error bars: std over seeds,\ncapped at 100%)", title_fontsize=9)
    return save_figure(fig, out, dpi=110)


def write_leaderboard(runs: Sequence[Run], out_dir: str | Path | None, command: str,
                      threads: int | None = None) -> str:
    """Aggregate finished runs into out_dir/leaderboard.{md,csv,png} (no files when out_dir is None);
    return the markdown."""
    rows = build_rows(runs, threads=threads)
    markdown = render_markdown(rows, command, machine_line(threads))
    if out_dir is None:
        return markdown
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "leaderboard.md", markdown)
    atomic_write_text(out_dir / "leaderboard.csv", render_csv(rows))
    plot_leaderboard(rows, out_dir / "leaderboard.png")
    return markdown
