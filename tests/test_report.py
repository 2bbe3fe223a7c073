"""`mnistlab report`: the HTML report of a run builds from the folder alone, has every section that
applies to the run's model and no other, is self-contained (nothing outside the file is referenced),
and fails in one line on a folder that is not a run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from mnistlab.cli import main

pytestmark = pytest.mark.slow

EVERY_RUN = {"run", "curves", "confusion", "mistakes", "calibration", "saliency", "features"}
BY_MODEL = {"cnn": {"filters"}, "lenet5": {"filters"}, "vit": {"attention"}, "lstm": {"hidden", "grad-flow"}}
MODEL_ONLY = {"filters", "attention", "hidden", "grad-flow"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Digits runs of a conv model, the ViT and an LSTM (with --grad-flow), trained for a few seconds."""
    root = tmp_path_factory.mktemp("report-runs")
    out = {}
    for model, extra in (("cnn", ["--epochs", "3"]), ("vit", ["--epochs", "1"]),
                         ("lstm", ["--epochs", "1", "--grad-flow"])):
        out[model] = root / model
        assert main(["train", "--dataset", "digits", "--model", model, "--threads", "1", *extra,
                     "--run-dir", str(out[model])]) == 0
    return out


def section_ids(page: str) -> set[str]:
    return set(re.findall(r'<section id="([^"]+)"', page))


@pytest.mark.parametrize("model", ["cnn", "vit", "lstm"])
def test_report_has_every_section_that_applies_and_no_other(runs, model, tmp_path):
    out = tmp_path / "r.html"
    assert main(["report", str(runs[model]), "-o", str(out)]) == 0
    page = out.read_text()
    ids = section_ids(page)
    assert ids == EVERY_RUN | BY_MODEL[model], ids
    # every section has a figure, and the page names the run's classes
    for sid in ids - {"run"}:
        chunk = page.split(f'<section id="{sid}">', 1)[1].split("</section>", 1)[0]
        assert "data:image/png;base64," in chunk, f"section {sid} has no figure"
    assert "test accuracy" in page


def test_report_is_self_contained(runs, tmp_path):
    """No src, href or url() points outside the file: images are data: URIs, links are anchors."""
    out = tmp_path / "r.html"
    assert main(["report", str(runs["cnn"]), "-o", str(out)]) == 0
    page = out.read_text()
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page) + re.findall(r"url\(([^)]*)\)", page)
    assert refs, "the report should contain images"
    outside = [r for r in refs if not (r.startswith("data:") or r.startswith("#"))]
    assert not outside, outside[:3]
    assert "<script" not in page  # nothing runs: a report is a document


def test_report_defaults_to_the_run_folder_and_is_repeatable(runs, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(runs["cnn"], run)
    assert main(["report", str(run)]) == 0
    first = (run / "report.html").read_text()
    assert main(["report", str(run)]) == 0
    second = (run / "report.html").read_text()
    strip = lambda s: re.sub(r"Time per part:[^<]*", "", s)  # noqa: E731  (timings differ between builds)
    assert strip(first) == strip(second)


def test_report_of_an_unfinished_run_says_so(runs, tmp_path):
    run = tmp_path / "unfinished"
    shutil.copytree(runs["cnn"], run)
    (run / "results.json").unlink()
    assert main(["report", str(run), "-o", str(tmp_path / "r.html")]) == 0
    assert "has not finished" in (tmp_path / "r.html").read_text()


def test_report_of_a_scratch_run_shows_what_it_can(tmp_path):
    run = tmp_path / "scratch"
    assert main(["train", "--engine", "scratch", "--dataset", "digits", "--epochs", "1", "--run-dir", str(run)]) == 0
    assert main(["report", str(run), "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert section_ids(page) == {"run", "curves"}
    assert "scratch" in page


def test_report_of_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint" in err[0], err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "report.html").exists()
