"""Every lab runs, passes its own checks, and draws its figure; the CLI lists them and reports failures."""

from __future__ import annotations

import pytest

from mnistlab.cli import main
from mnistlab.labs import LABS, Check, load_lab


@pytest.mark.parametrize("topic", list(LABS))
def test_lab_passes_its_checks_and_writes_a_png(topic, tmp_path, capsys):
    out = tmp_path / f"{topic}.png"
    assert main(["lab", topic, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "FAIL" not in text and "checks passed" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


def test_lab_without_topic_lists_every_lab(capsys):
    assert main(["lab"]) == 0
    out = capsys.readouterr().out
    assert all(topic in out for topic in LABS)


def test_a_failed_check_makes_exit_status_1(monkeypatch, tmp_path, capsys):
    lab = load_lab("linear-map")
    monkeypatch.setattr(lab, "run", lambda out: [Check("a claim that is false", False, "1 != 2")])
    assert main(["lab", "linear-map", "-o", str(tmp_path / "x.png")]) == 1
    assert "FAIL  a claim that is false: 1 != 2" in capsys.readouterr().out


def test_unknown_lab_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["lab", "nonsense"])
    assert e.value.code == 2
