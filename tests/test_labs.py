"""Every lab runs, passes its own checks, and draws its figure; the CLI lists them and reports failures."""

from __future__ import annotations

import re
import sys

import pytest

from mnistlab.cli import main
from mnistlab.labs import LABS, Check, load_lab

SLOW_LABS = {
    "activations": "trains six MLPs",
    "attention": "softmax over 64 x 256 x 256 scores of head size 512: seconds on 2 cores",
    "masking": "pre-trains a small MAE for 400 steps: about 10 s on 2 cores",
    "fft": "convolutions by FFT and directly on many sizes: about 4 s",
    "phase": "2-D FFTs of several images and a figure of many panels: about 2 s",
    "backprop": "trains a small network by hand and checks it against torch: about 2 s",
}  # linear-map (about 1 s) is the quick loop's one whole lab


@pytest.mark.parametrize("topic", [pytest.param(t, marks=pytest.mark.slow) if t in SLOW_LABS else t for t in LABS])
def test_lab_passes_its_checks_and_writes_a_png(topic, tmp_path, capsys):
    out = tmp_path / f"{topic}.png"
    assert main(["lab", topic, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "FAIL" not in text
    passed, total = map(int, re.search(r"(\d+)/(\d+) checks passed", text).groups())
    assert passed == total >= 3, text  # every lab verifies several claims, and all of them held
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


def test_lab_without_topic_lists_every_lab_with_its_title(capsys):
    assert main(["lab"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for topic in LABS:
        assert any(line.split()[:1] == [topic] and line.endswith(load_lab(topic).TITLE) for line in lines), topic


def test_a_failed_check_makes_exit_status_1(monkeypatch, tmp_path, capsys):
    lab = load_lab("linear-map")
    monkeypatch.setattr(lab, "run", lambda out: [Check("a claim that is false", False, "1 != 2")])
    assert main(["lab", "linear-map", "-o", str(tmp_path / "x.png")]) == 1
    assert "FAIL  a claim that is false: 1 != 2" in capsys.readouterr().out


def test_backprop_torch_check_fails_as_not_run_when_torch_cannot_be_imported(monkeypatch, tmp_path):
    lab = load_lab("backprop")
    monkeypatch.setattr(lab, "backward_forward_ratio", lambda: (1e-3, 2e-3))  # the timing is not under test
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    checks = {c.claim: c for c in lab.run(tmp_path / "backprop.png")}
    assert (tmp_path / "backprop.png").read_bytes()[:4] == b"\x89PNG"  # the figure needs no torch either
    torch_check = checks["gradients equal torch.autograd's"]
    assert not torch_check.passed and torch_check.detail.startswith("not run: torch cannot be imported")
    assert torch_check.line().startswith("FAIL")
    assert all(c.passed for claim, c in checks.items() if claim != torch_check.claim)  # the rest still ran


def test_unknown_lab_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["lab", "nonsense"])
    assert e.value.code == 2
