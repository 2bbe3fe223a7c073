"""`mnistlab report`: the HTML report of a run builds from the folder alone, has every section that
applies to the run's model and no other, is self-contained (nothing outside the file is referenced),
and fails in one line on a folder that is not a run."""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

import pytest

from mnistlab.cli import main
from mnistlab.inspect.report import SCRATCH_NOTE

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_report_defaults_to_the_run_folder_and_is_repeatable(runs, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(runs["cnn"], run)
    assert main(["report", str(run)]) == 0
    first = (run / "report.html").read_text()
    assert main(["report", str(run)]) == 0
    second = (run / "report.html").read_text()
    strip = lambda s: re.sub(r"Time per part:[^<]*", "", s)  # noqa: E731  (timings differ between builds)
    assert strip(first) == strip(second)


@pytest.mark.slow
def test_report_of_an_unfinished_run_says_so(runs, tmp_path):
    run = tmp_path / "unfinished"
    shutil.copytree(runs["cnn"], run)
    (run / "results.json").unlink()
    assert main(["report", str(run), "-o", str(tmp_path / "r.html")]) == 0
    assert "has not finished" in (tmp_path / "r.html").read_text()


@pytest.mark.slow
def test_report_of_a_scratch_run_shows_what_it_can(tmp_path, capsys):
    run = tmp_path / "numpy-run"  # a neutral name: the page must say "scratch" of itself
    assert main(["train", "--engine", "scratch", "--dataset", "digits", "--epochs", "1", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["report", str(run), "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert section_ids(page) == {"run", "curves"}
    run_section = page.split('<section id="run">', 1)[1].split("</section>", 1)[0]
    assert html.escape(SCRATCH_NOTE, quote=True) in run_section  # only a scratch-engine run's section says this
    assert re.findall(r"report: (\w+)", capsys.readouterr().err) == ["run", "curves"]  # no step it then skips


@pytest.mark.slow
def test_a_cnn_report_lists_no_attention_hidden_or_grad_flow_step(runs, tmp_path, capsys):
    assert main(["report", str(runs["cnn"]), "-o", str(tmp_path / "r.html")]) == 0
    steps = re.findall(r"report: ([\w_]+)", capsys.readouterr().err)
    assert steps == ["run", "curves", "confusion", "mistakes", "calibration", "saliency", "filters", "features"]
    assert "Not applicable" not in (tmp_path / "r.html").read_text()


@pytest.mark.slow
def test_report_of_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint" in err[0], err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "report.html").exists()


HOSTILE = '<script>alert("x")</script>'


def test_hostile_strings_in_a_run_come_out_as_text(monkeypatch):
    """A class name, a config value, the model name and the folder name holding markup are shown, not run."""
    import torch
    from markupsafe import escape

    from mnistlab.inspect import predictions, report
    from mnistlab.inspect.report import Context, Image, render, section_confusion, section_run

    monkeypatch.setattr(predictions, "confusion_figure", lambda *a: None)  # the figure is not under test: no drawing
    monkeypatch.setattr(report, "image", lambda fig, alt, dpi=90: Image("data:,", alt))

    classes = [HOSTILE, "b&c", "plain"]
    labels = torch.tensor([0, 0, 1, 2])
    logits = torch.eye(3)[torch.tensor([1, 1, 1, 2])] * 5  # both images of class 0 read as class 1
    ctx = Context(run_dir=Path(HOSTILE), config={"model": HOSTILE, "dataset": "digits", "note": HOSTILE},
                  env={"host": HOSTILE}, results=None, metrics=[], meta={"step": 1}, model=None, classes=classes,
                  mean=0.0, std=1.0, val_images=torch.zeros(0, 28, 28, dtype=torch.uint8), val_labels=labels[:0],
                  test_images=torch.zeros(4, 28, 28, dtype=torch.uint8), test_labels=labels, test_logits=logits)
    page = render(ctx, [section_run(ctx), section_confusion(ctx)])
    assert "<script" not in page
    escaped = str(escape(HOSTILE))
    assert page.count(escaped) >= 5, page  # title, header, folder, config and env tables, the confusion caption
    assert f"images of <b>{escaped}</b> predicted as <b>b&amp;c</b>" in page  # the page's own markup is kept
