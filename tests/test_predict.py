"""`mnistlab predict`: a person's picture -> the dataset's 28x28 view -> a calibrated answer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mnistlab.cli import main
from mnistlab.deploy import preprocess
from mnistlab.deploy.predict import Predictor, expected_calibration_error, fit_temperature
from mnistlab.deploy.preprocess import prepare, render_as_picture, to_model_input


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("predict") / "run"
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "6", "--threads", "1",
                 "--run-dir", str(run)]) == 0
    return run


def stroke_picture(size=280, dark_on_light=True) -> np.ndarray:
    """An L-shaped stroke, off-centre, on a 280x280 canvas: (H, W) uint8."""
    ink = np.zeros((size, size), dtype=np.float32)
    ink[60:200, 40:70] = 1.0  # the upright
    ink[170:200, 40:150] = 1.0  # the foot
    return ((1 - ink) * 255 if dark_on_light else ink * 255).astype(np.uint8)


def ink_box(image: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero((image > 0).any(1)), np.flatnonzero((image > 0).any(0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def test_mnist_recipe_gives_a_20_pixel_box_centred_by_mass(tmp_path):
    Image.fromarray(stroke_picture()).save(tmp_path / "a.png")
    view = prepare(tmp_path / "a.png", "mnist")
    assert not view.blank and view.inverted and view.image.shape == (28, 28) and view.image.dtype == np.uint8
    assert max(ink_box(view.image)) == 20
    ys, xs = np.indices(view.image.shape)
    mass = view.image.astype(float)
    cy, cx = (ys * mass).sum() / mass.sum(), (xs * mass).sum() / mass.sum()
    assert abs(cy - 13.5) <= 0.6 and abs(cx - 13.5) <= 0.6
    assert 0 < (view.image[(view.image > 0) & (view.image < 255)]).size  # anti-aliased grey levels at the edges


@pytest.mark.parametrize("dataset, side", [("fashion-mnist", 28), ("digits", 20)])
def test_fashion_and_digits_recipes_centre_the_box(tmp_path, dataset, side):
    Image.fromarray(stroke_picture()).save(tmp_path / "a.png")
    view = prepare(tmp_path / "a.png", dataset)
    rows, cols = np.flatnonzero((view.image > 0).any(1)), np.flatnonzero((view.image > 0).any(0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 == side
    assert abs((rows[0] + rows[-1]) / 2 - 13.5) <= 0.5 and abs((cols[0] + cols[-1]) / 2 - 13.5) <= 0.5


def test_dark_on_light_light_on_dark_and_alpha_ink_give_the_same_view(tmp_path):
    dark = stroke_picture(dark_on_light=True)
    Image.fromarray(dark).save(tmp_path / "dark.png")
    Image.fromarray(255 - dark).save(tmp_path / "light.png")
    rgba = np.zeros((280, 280, 4), dtype=np.uint8)
    rgba[..., :3] = 30  # the stroke colour does not matter: the alpha is the ink
    rgba[..., 3] = 255 - dark
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    views = [prepare(tmp_path / f"{n}.png", "mnist").image.astype(int) for n in ("dark", "light", "alpha")]
    assert np.abs(views[0] - views[1]).max() <= 1 and np.abs(views[0] - views[2]).max() <= 1


def test_a_blank_picture_is_blank_before_the_model_runs(tmp_path, digits_run, monkeypatch):
    Image.new("L", (200, 120), 255).save(tmp_path / "blank.png")
    noise = (250 + np.random.default_rng(0).integers(0, 5, (200, 200))).astype(np.uint8)  # paper texture
    Image.fromarray(noise).save(tmp_path / "paper.png")
    predictor = Predictor(digits_run)
    monkeypatch.setattr(predictor, "logits", lambda x: pytest.fail("the model ran on a blank picture"))
    results, errors = predictor.predict_files([str(tmp_path / "blank.png"), str(tmp_path / "paper.png")])
    assert [r.status for r in results] == ["blank", "blank"] and errors == []


def test_unreadable_files_are_one_line_each_and_the_others_are_answered(tmp_path, digits_run, capsys):
    Image.fromarray(stroke_picture()).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "doc.gif").write_bytes(b"GIF89a" + b"\0" * 20)  # a format we do not decode
    capsys.readouterr()
    assert main(["predict", str(digits_run), str(tmp_path / "good.png"), str(tmp_path / "bad.png"),
                 str(tmp_path / "doc.gif"), "--json"]) == 2
    out, err = capsys.readouterr()
    answers = [json.loads(line) for line in out.splitlines()]
    assert len(answers) == 1 and answers[0]["path"].endswith("good.png") and answers[0]["label"] in list("0123456789")
    assert answers[0]["status"] in ("ok", "unsure") and len(answers[0]["top"]) == 3
    assert err.count("mnistlab: error:") == 2 and "Traceback" not in err


def test_an_image_too_large_is_refused_before_decoding(tmp_path, monkeypatch):
    Image.new("L", (40, 40), 0).save(tmp_path / "big.png")
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 100)
    with pytest.raises(preprocess.UnreadableImage, match="too large"):
        prepare(tmp_path / "big.png", "mnist")


def test_temperature_keeps_the_argmax_and_the_threshold_accepts_95_percent_of_correct_val(digits_run):
    from mnistlab.data.dataset import load_dataset

    predictor = Predictor(digits_run)
    ds = load_dataset("digits")
    logits = predictor.logits(ds.val_images)
    t = predictor.temperature
    assert 0.05 < t < 20
    assert torch.equal(logits.argmax(1), (logits / t).argmax(1))
    nll = torch.nn.functional.cross_entropy
    assert nll(logits / t, ds.val_labels) <= min(nll(logits / (t * 1.2), ds.val_labels),
                                                  nll(logits / (t / 1.2), ds.val_labels)) + 1e-9
    probs = (logits / t).softmax(1)
    score, pred = probs.max(1)
    correct = pred == ds.val_labels
    accepted = (score[correct] >= predictor.threshold).double().mean().item()
    assert 0.94 <= accepted <= 0.97  # 95% of the correctly classified validation images (143 images)
    cal = json.loads((digits_run / "calibration.json").read_text())
    assert cal["temperature"] == t and cal["ece_after"] <= cal["ece_before"] + 1e-9


def test_fit_temperature_recovers_a_known_temperature():
    torch.manual_seed(0)
    true_logits = torch.randn(4000, 10) * 2
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    assert fit_temperature(true_logits * 3, labels) == pytest.approx(3.0, rel=0.1)  # over-confident by 3
    probs = torch.full((100, 10), 0.1)  # 10% confident, and right 10% of the time: calibrated
    assert expected_calibration_error(probs, torch.arange(100) % 10) == pytest.approx(0.0, abs=1e-6)
    assert expected_calibration_error(probs, torch.zeros(100, dtype=torch.long)) == pytest.approx(0.9)


@pytest.mark.slow
def test_rerendered_test_digits_keep_their_accuracy(tmp_path, digits_run):
    from mnistlab.data.dataset import load_dataset

    ds = load_dataset("digits")
    predictor = Predictor(digits_run)
    n = 120
    original = predictor.logits(ds.test_images[:n]).argmax(1)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        picture = render_as_picture(ds.test_images[i].numpy(), rng)
        path = tmp_path / (f"{i}.jpg" if i % 2 else f"{i}.png")
        picture.save(path, quality=90) if i % 2 else picture.save(path)
        paths.append(str(path))
    results, errors = predictor.predict_files(paths)
    assert not errors
    labels = ds.test_labels[:n]
    acc_original = (original == labels).double().mean().item()
    acc_rerendered = np.mean([r.index == int(y) for r, y in zip(results, labels.tolist(), strict=True)])
    assert acc_original - acc_rerendered <= 0.05, (acc_original, acc_rerendered)


def test_to_model_input_of_an_empty_map_is_blank():
    image, blank = to_model_input(np.zeros((50, 50), dtype=np.float32), "mnist")
    assert blank and not image.any()
