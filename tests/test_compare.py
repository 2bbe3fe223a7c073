"""`mnistlab compare`: the grid trains, skips and resumes; the leaderboard groups, averages and tests ties.

The grid tests start real `mnistlab train` processes on digits (one epoch, one thread); the grouping,
statistics and error tests use made-up run folders and numbers and take no time.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import statistics
from pathlib import Path

import pytest

from mnistlab.cli import main
from mnistlab.config import TrainConfig, resolve_config
from mnistlab.inspect.leaderboard import (
    _log_ticks,
    accuracy_error_bar,
    build_rows,
    compare_to_best,
    group_runs,
    load_run,
    render_markdown,
    welch_p_value,
)

GRID = ["compare", "--dataset", "digits", "--models", "linear", "mlp", "--seeds", "0", "1", "--epochs", "1",
        "--threads", "1"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A 2 models x 2 seeds digits grid, trained once for the module: (folder, exit status, stdout, stderr).
    Module scope has no capsys, so the output is redirected by hand."""
    out = tmp_path_factory.mktemp("grid")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([*GRID, "-o", str(out)])
    return out, code, stdout.getvalue(), stderr.getvalue()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_grid_leaderboard_has_one_group_per_model_with_mean_and_std_of_its_seeds(grid):
    out, code, stdout, stderr = grid
    assert code == 0, stderr
    assert stderr.count("done in") == 4
    rows = read_csv(out / "leaderboard.csv")
    assert [r["model"] for r in rows] == sorted(["linear", "mlp"], key=lambda m: -float(
        next(r["test_accuracy_mean"] for r in rows if r["model"] == m)))  # sorted by mean test accuracy
    for row in rows:
        accs = [json.loads((out / f"{row['model']}-seed{s}" / "results.json").read_text())["test_accuracy"]
                for s in (0, 1)]
        assert row["n"] == "2" and row["seeds"] == "0 1"
        assert float(row["test_accuracy_mean"]) == pytest.approx(statistics.mean(accs), abs=1e-12)
        assert float(row["test_accuracy_std"]) == pytest.approx(statistics.stdev(accs), abs=1e-12)
        assert float(row["latency_ms_b1"]) > 0 and float(row["latency_ms_b256"]) > 0
        assert float(row["mflops"]) > 0 and int(float(row["params"])) > 0
    markdown = (out / "leaderboard.md").read_text()
    assert markdown.strip() in stdout
    assert "CPU " in markdown and "mnistlab compare --dataset digits --models linear mlp" in markdown
    best = rows[0]
    assert f"{float(best['test_accuracy_mean']):.2%} +- {float(best['test_accuracy_std']) * 100:.2f}" in markdown
    assert (out / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_second_invocation_of_a_finished_grid_trains_nothing(grid, capsys):
    out = grid[0]
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/*") if p.name in ("train.log", "checkpoint.safetensors")}
    assert len(before) == 8
    assert main([*GRID, "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("finished earlier, skipped") == 4 and "training in" not in err
    assert {p: p.stat().st_mtime_ns for p in before} == before  # no process wrote to any run


@pytest.mark.slow
def test_killed_run_is_reported_failed_then_resumed_from_its_checkpoint(tmp_path, capsys, monkeypatch):
    argv = ["compare", "--dataset", "digits", "--models", "linear", "--seeds", "0", "--epochs", "2", "--threads", "1",
            "-o", str(tmp_path)]
    run = tmp_path / "linear-seed0"
    monkeypatch.setenv("MNISTLAB_TEST_KILL", "step:25")  # digits at batch 64: 21 steps an epoch
    assert main(argv) == 1
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "killed by SIGKILL" in failed[0] and str(run / "train.log") in failed[0]
    assert not (run / "results.json").exists() and (run / "checkpoint.safetensors").exists()
    first_epoch = (run / "metrics.jsonl").read_text()
    assert len(first_epoch.splitlines()) == 1

    monkeypatch.delenv("MNISTLAB_TEST_KILL")
    assert main(argv) == 0
    assert "resuming in" in capsys.readouterr().err
    log = (run / "train.log").read_text()
    assert "--resume" in log and "at step 21/42" in log  # continued from the checkpoint...
    assert log.count("epoch 1/2") == 1  # ...so epoch 1 trained once
    assert (run / "metrics.jsonl").read_text().startswith(first_epoch)
    assert json.loads((run / "results.json").read_text())["steps"] == 42


def fake_run(path: Path, seed: int, test_accuracy: float, **config) -> Path:
    """A finished run folder as `mnistlab train` leaves it (the checkpoint empty: not loaded here)."""
    path.mkdir(parents=True)
    cfg = TrainConfig(**{"dataset": "digits", "model": "mlp", "seed": seed, "run_dir": str(path), **config})
    (path / "config.json").write_text(cfg.to_json())
    (path / "results.json").write_text(json.dumps(dict(
        dataset="digits", model=cfg.model, test_accuracy=test_accuracy, val_accuracy=0.9, best_val_accuracy=0.9,
        train_seconds=1.0 + seed, params=1000)))
    (path / "metrics.jsonl").write_text(json.dumps(dict(epoch=1, seconds=1.0, images_per_second=500.0)) + "\n")
    (path / "checkpoint.safetensors").write_bytes(b"")
    return path


def test_a_different_lr_makes_another_group_a_different_seed_threads_or_folder_does_not(tmp_path):
    runs = [load_run(p) for p in (
        fake_run(tmp_path / "a", 0, 0.90, lr=0.01, threads=1),
        fake_run(tmp_path / "b", 1, 0.92, lr=0.01, threads=2, device="cpu"),
        fake_run(tmp_path / "c", 0, 0.95, lr=0.02),
    )]
    groups = group_runs(runs)
    assert [[r.path.name for r in g] for g in groups] == [["a", "b"], ["c"]]
    rows = build_rows(runs, latency=False)
    assert [(r.label, len(r.runs)) for r in rows] == [("mlp lr=0.02", 1), ("mlp lr=0.01", 2)]
    assert rows[1].mean == pytest.approx(0.91) and rows[1].std == pytest.approx(statistics.stdev([0.90, 0.92]))
    assert [r.verdict.text for r in rows] == ["best", "cannot tell"]  # one run: no spread to test
    markdown = render_markdown(rows, "mnistlab compare a b c", "CPU test")
    assert "| 1 | mlp lr=0.02 | 1 | 95.00% | best |" in markdown
    assert "| 2 | mlp lr=0.01 | 2 | 91.00% +- 1.41 | cannot tell |" in markdown


def test_welch_tie_logic_on_made_up_accuracies():
    from scipy import stats

    best, close, far = [0.910, 0.915, 0.920], [0.905, 0.912, 0.918], [0.880, 0.882, 0.879]
    assert welch_p_value(best, close) == pytest.approx(stats.ttest_ind(best, close, equal_var=False).pvalue)
    verdicts = compare_to_best([best, close, far, [0.5]])
    assert [v.text for v in verdicts] == ["best", "tie", "worse", "cannot tell"]  # n=1: no spread to test
    assert verdicts[1].p_value > 0.05 > verdicts[2].p_value
    assert welch_p_value([0.9, 0.9], [0.9, 0.9]) == 1.0  # no spread, same mean: a tie
    assert welch_p_value([0.9, 0.9], [0.8, 0.8]) == 0.0  # no spread, another mean: certain
    assert welch_p_value([0.9], [0.8, 0.85]) is None
    # a single lucky run has the best mean, and then nothing can be told apart from it
    assert [v.text for v in compare_to_best([close, [0.99], far])] == ["cannot tell", "best", "cannot tell"]


def test_equal_means_rank_the_first_best():
    assert [v.text for v in compare_to_best([[0.9, 0.92], [0.92, 0.9]])] == ["best", "tie"]


@pytest.mark.parametrize("argv, message", [
    (["--models", "linear", "nosuchmodel", "--dataset", "digits"], "unknown model 'nosuchmodel'"),
    (["--models", "vit", "--recipe", "fast", "--dataset", "digits"], "--recipe fast is a recipe for --model cnn"),
    (["--models", "linear", "--dataset", "nosuch"], "unknown dataset 'nosuch'"),
    ([], "nothing to aggregate"),
    (["RUN", "--models", "linear"], "not both"),
    (["RUN", "--seeds", "0"], "--seeds sets up a grid"),
    (["MISSING"], "no such run folder"),
    (["EMPTY"], "not a finished run (no config.json, results.json, checkpoint.safetensors)"),
    (["UNFINISHED"], "not a finished run (no results.json, checkpoint.safetensors); unfinished: `mnistlab train "
                     "--resume"),
    (["--models", "linear", "--seeds", "0", "--epochs", "2", "--dataset", "digits", "-o", "STALE"],
     "holds a run with epochs=1, not 2"),
])
def test_bad_inputs_are_one_line_errors_with_exit_2_before_training(tmp_path, capsys, argv, message):
    fake_run(tmp_path / "RUN", 0, 0.9)
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "UNFINISHED").mkdir()
    (tmp_path / "UNFINISHED" / "config.json").write_text(TrainConfig(dataset="digits").to_json())
    (tmp_path / "STALE" / "linear-seed0").mkdir(parents=True)
    (tmp_path / "STALE" / "linear-seed0" / "config.json").write_text(
        resolve_config(dict(dataset="digits", model="linear", epochs=1, seed=0)).to_json())
    names = {"RUN", "MISSING", "EMPTY", "UNFINISHED", "STALE"}
    argv = [str(tmp_path / a) if a in names else a for a in argv]
    grid_dir = tmp_path / "grid"
    if "-o" not in argv:
        argv += ["-o", str(grid_dir)]
    assert main(["compare", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mnistlab: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not grid_dir.exists()  # nothing trained, nothing written
    assert not list((tmp_path / "STALE").glob("*/train.log"))


@pytest.fixture
def no_latency(monkeypatch):
    """The made-up runs' checkpoints are empty: nothing to time."""
    from mnistlab.inspect import leaderboard

    monkeypatch.setattr(leaderboard, "measure", lambda row, threads=None: None)


def not_runs(root: Path) -> dict[str, str]:
    """Folders `runs/*` may hold beside finished training runs, and the reason each is skipped."""
    from mnistlab.config import PretrainConfig

    pre = root / "pretrained"
    pre.mkdir()
    (pre / "config.json").write_text(PretrainConfig(dataset="digits").to_json())
    (pre / "results.json").write_text(json.dumps(dict(kind="pretrain", val_loss=0.1)))
    (pre / "checkpoint.safetensors").write_bytes(b"")
    (root / "pretraining").mkdir()  # killed before its results: a config with pre-training fields only
    (root / "pretraining" / "config.json").write_text(PretrainConfig(dataset="digits").to_json())
    (root / "unfinished").mkdir()
    (root / "unfinished" / "config.json").write_text(TrainConfig(dataset="digits").to_json())
    (root / "failed-start").mkdir()
    (root / "failed-start" / ".lock").write_bytes(b"")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("try lstm")
    (root / "leaderboard.md").write_text("# an old leaderboard")
    return {"pretrained": "a pre-training run", "pretraining": "a pre-training run",
            "unfinished": "`mnistlab train --resume", "failed-start": "holds only .lock",
            "notes": "not a finished run (no config.json", "leaderboard.md": "not a folder"}


def test_compare_runs_star_skips_each_folder_that_is_not_a_finished_training_run(tmp_path, capsys, no_latency,
                                                                                monkeypatch):
    runs = tmp_path / "runs"
    fake_run(runs / "mlp-seed0", 0, 0.90)
    fake_run(runs / "mlp-seed1", 1, 0.92)
    reasons = not_runs(runs)
    monkeypatch.chdir(tmp_path)
    assert main(["compare", *sorted(str(p) for p in runs.iterdir())]) == 0
    out, err = capsys.readouterr()
    skipped = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == len(reasons), err
    for name, reason in reasons.items():
        line = next(line for line in skipped if line.startswith(f"skipped {runs / name}: "))
        assert reason in line, line
    assert "| 1 | mlp | 2 | 91.00% +- 1.41 | best |" in out
    # compare RUN... reads runs: without -o it writes no file, here or anywhere
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert [p.name for p in runs.glob("leaderboard.*")] == ["leaderboard.md"]
    assert (runs / "leaderboard.md").read_text() == "# an old leaderboard"
    assert "-o DIR writes" in err


def test_compare_with_nothing_left_after_skipping_is_one_error(tmp_path, capsys, no_latency):
    reasons = not_runs(tmp_path)
    assert main(["compare", *sorted(str(p) for p in tmp_path.iterdir())]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(reasons) + 1 and all(line.startswith("skipped ") for line in err[:-1])
    assert err[-1] == (f"mnistlab: error: nothing to aggregate: none of the {len(reasons)} folders is a finished "
                       "training run (each is named above)")


def test_compare_help_says_runs_are_aggregated_without_writing_files_unless_o(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: none written, the leaderboard is printed" in text


def test_leaderboard_text_names_every_field_it_groups_without(tmp_path):
    from mnistlab.inspect.leaderboard import WHERE_FIELDS

    rows = build_rows([load_run(fake_run(tmp_path / "a", 0, 0.9))], latency=False)
    markdown = render_markdown(rows, "mnistlab compare a", "CPU test")
    groups = markdown.split("Groups:", 1)[1]
    assert "compile" in WHERE_FIELDS and all(field in groups for field in WHERE_FIELDS)


def test_an_accuracy_error_bar_stops_at_100_percent():
    """The digits CNN's seeds at 99.44, 100, 100 (mean 99.81, std 0.32): the bar goes 0.32 down and 0.19 up."""
    below, above = accuracy_error_bar(99.81, 0.32)
    assert below == [0.32] and above[0] == pytest.approx(0.19)
    assert accuracy_error_bar(92.6, 0.12) == [[0.12], [0.12]]
    assert accuracy_error_bar(100.0, 0.0) == [[0.0], [0.0]]


def test_a_log_axis_narrower_than_its_coarse_ticks_gets_every_integer_multiple():
    """A group whose runs all took 7 to 11 s would show only "10" with ticks at 1, 2 and 5 times each power of ten
    (the digits panel did): such an axis is labelled at every multiple 1-9; a wide one keeps 1, 2 and 5."""
    assert _log_ticks(2.0, 300.0) == (1.0, 2.0, 5.0)  # 2, 5, 10, 20, 50, 100, 200
    assert _log_ticks(5_000.0, 600_000.0) == (1.0, 2.0, 5.0)
    assert _log_ticks(2.6, 14.0) == tuple(float(m) for m in range(1, 10))  # only 5 and 10 in range
    assert _log_ticks(3.0, 4.5) == tuple(float(m) for m in range(1, 10))  # none in range
