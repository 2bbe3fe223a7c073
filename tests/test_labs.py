"""Every lab runs, passes its own checks, and draws its figure; the CLI lists them and reports failures."""

from __future__ import annotations

import re
import shutil
import sys
import wave

import numpy as np
import pytest

from mnistlab.cli import main
from mnistlab.labs import LABS, Check, cocktail_party, load_lab

SLOW_LABS = {
    "activations": "trains six MLPs",
    "attention": "softmax over 64 x 256 x 256 scores of head size 512: seconds on 2 cores",
    "masking": "pre-trains a small MAE for 400 steps: about 10 s on 2 cores",
    "fft": "convolutions by FFT and directly on many sizes: about 4 s",
    "phase": "2-D FFTs of several images and a figure of many panels: about 2 s",
    "backprop": "trains a small network by hand and checks it against torch: about 2 s",
    "cocktail-party": "FastICA several times, complex ICA in 129 STFT bins, Griffin-Lim, 22 WAV files: about 4 s",
    "gradient-descent": "an LR range test and 315 steps of the MLP on digits, six panels: about 8 s (half imports)",
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


def test_si_sdr_of_a_known_case_ignores_scale_and_sign():
    reference = np.array([1.0, 0.0, 0.0, 0.0])
    estimate = np.array([3.0, 1.0, 0.0, 0.0])  # a = 3: target (3, 0, 0, 0), distortion (0, 1, 0, 0)
    assert cocktail_party.si_sdr(reference, estimate) == pytest.approx(10 * np.log10(9.0))
    assert cocktail_party.si_sdr(reference, -0.5 * estimate) == pytest.approx(10 * np.log10(9.0))
    assert cocktail_party.si_sdr(reference, 2 * reference) > 100  # a perfect estimate, at another scale


def test_match_sources_undoes_permutation_sign_and_scale():
    S = np.random.default_rng(0).standard_normal((3, 1000))
    S_hat = np.stack([0.5 * S[1], -2.0 * S[2], 3.0 * S[0]])  # ICA's order, scales and a flipped sign
    m = cocktail_party.match_sources(S, S_hat)
    assert m.order.tolist() == [2, 0, 1]
    np.testing.assert_allclose(m.aligned, S, atol=1e-12)  # the flipped one came back with its sign
    assert m.correlation[1, 0] == pytest.approx(1.0) and m.correlation[1, 1] < 0.2


def test_fastica_separates_a_small_instantaneous_mixture():
    rng = np.random.default_rng(1)
    S = np.stack([rng.laplace(size=4000), rng.uniform(-1, 1, 4000)])  # one peaky, one flat: both non-Gaussian
    X = cocktail_party.mix(S, np.array([[1.0, 0.6], [0.4, 1.0]]))
    assert cocktail_party.separation_db(S, cocktail_party.fastica(X).estimates).min() > 25
    assert cocktail_party.separation_db(S, cocktail_party.whiten(X)[0]).max() < 15  # PCA alone does not


def test_wav_files_are_16_bit_mono_at_the_lab_rate_and_full_length(tmp_path):
    x = np.sin(np.arange(cocktail_party.N_SAMPLES) * 0.05)
    (path,) = cocktail_party.write_sounds(tmp_path / "sounds", {"tone": x})
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, cocktail_party.FS)
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    assert pcm.size == x.size and np.abs(pcm / 32767 - 0.9 * x).max() < 1e-4  # scaled to 90% of full scale


@pytest.mark.slow  # the whole lab: about 4 s
def test_cocktail_party_passes_without_espeak_and_writes_its_wavs_beside_the_figure(monkeypatch, tmp_path, capsys):
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "espeak-ng" else which(name, *a, **k))
    assert main(["lab", "cocktail-party", "-o", str(tmp_path / "cp.png")]) == 0
    text = capsys.readouterr().out
    assert "FAIL" not in text and "voice 197 Hz" in text and "espeak" not in text  # the synthetic second voice
    folder = tmp_path / "cp_wav"
    assert f"sounds: {folder}/" in text
    names = {p.name for p in folder.iterdir()}
    assert {"source2_voice_197_Hz.wav", "mix_mic1.wav", "ica_estimate3.wav", "griffin_lim.wav",
            "phase_noise_1rad.wav", "echo_per_bin_estimate1.wav"} <= names and len(names) == 22
    for path in folder.iterdir():
        with wave.open(str(path)) as w:
            assert (w.getframerate(), w.getnframes(), w.getsampwidth()) == (8000, cocktail_party.N_SAMPLES, 2)


def test_gd_stability_check_fails_when_the_start_has_no_part_along_the_steepest_direction():
    gd = load_lab("gradient-descent")
    bowl = gd.quadratic(gd.BOWL_EIGENVALUES, angle=gd.BOWL_ANGLE)
    assert gd.stability_check(bowl, gd.BOWL_START).passed
    lam, vecs = np.linalg.eigh(bowl)
    flat_only = 3.0 * vecs[:, 0]  # all of it along the shallow direction (curvature 1): no part to blow up
    check = gd.stability_check(bowl, flat_only)
    assert not check.passed and check.line().startswith("FAIL")


def test_gd_path_is_the_closed_form_and_each_eigen_part_shrinks_by_its_factor():
    gd = load_lab("gradient-descent")
    H = gd.quadratic([1.0, 3.0, 30.0], seed=4)
    x0, eta = np.array([1.0, -2.0, 0.5]), 0.06
    path = gd.gd_path(H, x0, eta, 40)
    assert np.allclose(path[40], np.linalg.matrix_power(np.eye(3) - eta * H, 40) @ x0, rtol=1e-12, atol=1e-15)
    lam, factors = gd.eigen_contractions(H, path)
    assert np.allclose(lam, [1.0, 3.0, 30.0]) and np.allclose(factors, 1 - eta * lam, atol=1e-9)
    assert factors[2] < 0  # eta * 30 = 1.8 > 1: that part flips sides every step


def test_momentum_and_gd_best_settings_give_their_textbook_rates():
    gd = load_lab("gradient-descent")
    H = gd.quadratic([1.0, 100.0], seed=None)
    assert gd.gd_best(H) == pytest.approx((2 / 101, 99 / 101))
    eta, beta, rate = gd.momentum_best(H)
    assert (eta, beta, rate) == pytest.approx((4 / 121, (9 / 11) ** 2, 9 / 11))
    path = gd.momentum_path(H, [1.0, 1.0], eta, beta, 400)
    assert gd.measured_rate(path) == pytest.approx(rate, rel=0.01)
    assert gd.steps_to(gd.gd_path(H, [1.0, 1.0], 2.1 / 100, 200)) is None  # past 2/L it never gets there


def test_adam_path_matches_the_scratch_engines_adam_on_a_quadratic():
    from mnistlab.scratch import optim, tensor

    gd = load_lab("gradient-descent")
    H = gd.quadratic([1.0, 10.0, 100.0], seed=2)
    x0 = np.array([1.0, -1.0, 2.0])
    ours = gd.adam_path(H, x0, 0.05, 50)
    x = tensor(x0, requires_grad=True, dtype=np.float64)
    opt = optim.Adam([x], lr=0.05)  # tests/test_scratch.py matches it to torch.optim.Adam step for step
    for _ in range(50):
        opt.zero_grad()
        (x * tensor(H @ x.data, dtype=np.float64)).sum().backward()  # its gradient is the constant H x: f's
        opt.step()
    assert np.allclose(ours[-1], x.data, rtol=1e-10, atol=1e-12)


def test_range_test_reads_its_three_points_and_suggests_nothing_without_a_blow_up():
    gd = load_lab("gradient-descent")
    lrs = np.geomspace(1e-5, 1.0, 101)
    u = np.log10(lrs)  # -5 .. 0
    falls = 2.3 - 2.0 / (1 + np.exp(-4 * (u + 3)))  # steepest at 1e-3, then a floor of 0.3
    curve = falls + np.where(u > -2, 40 * (u + 2) ** 2, 0.0)  # rises from 1e-2 on, back above 2.3 by ~1.6e-2
    test = gd.RangeTest(lrs, curve, gd.centred_mean(curve))
    assert test.steepest == pytest.approx(1e-3, rel=0.15)
    assert 5e-3 < test.lowest < 2e-2 and 1e-2 < test.divergence < 3e-2
    assert test.suggestion == pytest.approx(test.divergence / 10)
    calm = gd.RangeTest(lrs, falls, gd.centred_mean(falls))  # the loss never comes back up: lr_max too small
    assert calm.divergence is None and calm.suggestion is None


def test_landscape_slice_is_the_start_at_0_and_the_end_at_1_and_leaves_the_end_loaded():
    import torch
    from torch.nn.utils import parameters_to_vector

    gd = load_lab("gradient-descent")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.randn(8, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    end = parameters_to_vector(model.parameters()).detach().clone()
    start = torch.zeros_like(end)  # all-zero weights: every class equally likely, loss ln 3
    losses = gd.landscape_slice(model, start, end, x, y, [0.0, 1.0])
    with torch.no_grad():
        assert losses[1] == pytest.approx(torch.nn.functional.cross_entropy(model(x), y).item(), rel=1e-6)
    assert losses[0] == pytest.approx(np.log(3), rel=1e-6)
    assert torch.equal(parameters_to_vector(model.parameters()), end)
