"""`mnistlab eval`: test-time augmentation names the views it averaged and warns, in one line, of views the
run's training augmentation did not include; --json is compact (a matrix row per line) and parses."""

from __future__ import annotations

import json

import pytest
from conftest import train_digits

from mnistlab.cli import main
from mnistlab.evaluate import describe_views, eval_json, tta_views, untrained_views_warning


@pytest.mark.parametrize("hflip, shifts, n", [(False, False, 1), (True, False, 2), (False, True, 9), (True, True, 18)])
def test_tta_views_are_named_one_per_view_evaluate_averages(hflip, shifts, n):
    views = tta_views(hflip, shifts)
    assert len(views) == len(set(views)) == n and views[0] == "identity"
    assert sum("hflip" in v for v in views) == (n // 2 if hflip else 0)
    assert sum("shift" in v for v in views) == (8 * (2 if hflip else 1) if shifts else 0)
    text = describe_views(hflip, shifts)
    assert (f"TTA over {n} views" in text) == (n > 1) and ("hflip" in text) == hflip and ("shift" in text) == shifts


def test_a_view_the_training_augmentation_lacked_is_one_warning_line_naming_it():
    assert untrained_views_warning(True, True, trained_flips=True, trained_shifts=True) is None
    assert untrained_views_warning(False, False, trained_flips=False, trained_shifts=False) is None
    flips = untrained_views_warning(True, False, trained_flips=False, trained_shifts=False)
    assert "\n" not in flips and "hflip" in flips and "shift" not in flips and "--tta off" in flips
    shifts = untrained_views_warning(True, True, trained_flips=True, trained_shifts=False)
    assert "hflip" not in shifts and "one-pixel shifts" in shifts and "--tta-shifts off" in shifts


def test_eval_json_parses_and_puts_each_matrix_row_on_one_line():
    confusion = [[i * 10 + j for j in range(10)] for i in range(10)]
    summary = dict(model="cnn", views=["identity", "hflip"], accuracy=0.5, per_class_accuracy={"a": 0.25, "b": 1.0},
                   confusion=confusion)
    text = eval_json(summary)
    assert json.loads(text) == summary
    # one line per field, one per matrix row, the braces and the matrix's closing bracket: not one per number
    assert len(text.splitlines()) == len(summary) + len(confusion) + 3
    with pytest.raises(ValueError):
        eval_json(dict(loss=float("nan")))  # strict JSON, as before


@pytest.fixture(scope="module")
def run_without_flips(tmp_path_factory):
    """A digits linear run trained without flips or shifts (the defaults for digits)."""
    return train_digits(tmp_path_factory.mktemp("eval"), "--model", "linear", "--epochs", "1")


@pytest.mark.slow
def test_eval_tta_says_its_views_and_warns_of_flips_the_run_never_trained_on(run_without_flips, capsys):
    capsys.readouterr()
    assert main(["eval", str(run_without_flips), "--tta", "on"]) == 0
    out, err = capsys.readouterr()
    assert "(TTA over 2 views: identity, hflip)" in out
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "hflip" in warnings[0], err

    assert main(["eval", str(run_without_flips), "--tta", "on", "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["views"] == ["identity", "hflip"] and report["tta"].startswith("TTA over 2 views")
    assert report["warnings"] == warnings and err.strip() == warnings[0]
    assert len(out.splitlines()) < 40  # 10 classes: a row per line, not ~130 lines of single numbers

    assert main(["eval", str(run_without_flips)]) == 0  # auto: as trained, no TTA and nothing to warn of
    out, err = capsys.readouterr()
    assert "plain images (1 view, no TTA)" in out and "warning" not in err
