"""`mnistlab predict`: a person's picture -> the dataset's 28x28 view -> a calibrated answer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import train_digits
from PIL import Image

from mnistlab.calibration import fit_calibration
from mnistlab.cli import main
from mnistlab.deploy import preprocess
from mnistlab.deploy.predict import Predictor
from mnistlab.deploy.preprocess import prepare, render_as_picture, to_model_input

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: a second thread only waits


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return train_digits(tmp_path_factory.mktemp("predict"), "--model", "mlp", "--epochs", "6")


@pytest.fixture
def no_data(monkeypatch):
    """Loading any dataset fails the test: predicting must need the run folder only."""
    from mnistlab.data import dataset

    monkeypatch.setattr(dataset, "load_dataset", lambda *a, **k: pytest.fail("a dataset was loaded"))


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


def test_a_blank_picture_is_blank_before_the_model_runs(tmp_path, untrained_run, monkeypatch):
    Image.new("L", (200, 120), 255).save(tmp_path / "blank.png")
    noise = (250 + np.random.default_rng(0).integers(0, 5, (200, 200))).astype(np.uint8)  # paper texture
    Image.fromarray(noise).save(tmp_path / "paper.png")
    predictor = Predictor(untrained_run)
    monkeypatch.setattr(predictor, "logits", lambda x: pytest.fail("the model ran on a blank picture"))
    results, errors = predictor.predict_files([str(tmp_path / "blank.png"), str(tmp_path / "paper.png")])
    assert [r.status for r in results] == ["blank", "blank"] and errors == []


def test_unreadable_files_are_one_line_each_and_the_others_are_answered(tmp_path, untrained_run, capsys):
    Image.fromarray(stroke_picture()).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "doc.gif").write_bytes(b"GIF89a" + b"\0" * 20)  # a format we do not decode
    capsys.readouterr()
    assert main(["predict", str(untrained_run), str(tmp_path / "good.png"), str(tmp_path / "bad.png"),
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


def test_without_calibration_predict_is_uncalibrated_loads_no_data_and_says_so_once(tmp_path, untrained_run,
                                                                                       no_data, capsys):
    Image.fromarray(stroke_picture()).save(tmp_path / "a.png")
    Image.fromarray(stroke_picture(dark_on_light=False)).save(tmp_path / "b.png")
    capsys.readouterr()
    assert main(["predict", str(untrained_run), str(tmp_path / "a.png"), str(tmp_path / "b.png")]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and "unsure" not in out
    assert err.count("\n") == 1 and "no calibration.json" in err and f"mnistlab calibrate {untrained_run}" in err
    predictor = Predictor(untrained_run, warn_uncalibrated=False)
    assert predictor.temperature == 1.0 and predictor.threshold is None and predictor.calibration is None
    assert not (untrained_run / "calibration.json").exists()  # predict never writes it


def test_a_calibration_for_another_checkpoint_is_not_used(untrained_run, no_data, capsys):
    cal = fit_calibration(torch.randn(300, 10) * 5, torch.arange(300) % 10, step=2)  # the checkpoint is at step 3
    (untrained_run / "calibration.json").write_text(json.dumps(cal))
    predictor = Predictor(untrained_run)
    assert predictor.temperature == 1.0 and predictor.threshold is None
    assert "another checkpoint (step 2, not 3)" in capsys.readouterr().err


def test_calibrate_fits_once_and_then_a_run_folder_without_its_dataset_predicts(tmp_path, untrained_run,
                                                                                 monkeypatch, capsys):
    capsys.readouterr()
    assert main(["calibrate", str(untrained_run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {untrained_run}/calibration.json: temperature ") and "threshold" in out
    assert "ECE" in out and "before" in out and "after" in out
    cal = json.loads((untrained_run / "calibration.json").read_text())
    assert cal["step"] == 3 and cal["val_images"] == 50
    copied = shutil.copytree(untrained_run, tmp_path / "elsewhere" / "run")
    shutil.rmtree(tmp_path / "data")  # config.json's data_dir is gone
    from mnistlab.data import dataset

    monkeypatch.setattr(dataset, "load_dataset", lambda *a, **k: pytest.fail("a dataset was loaded"))
    Image.fromarray(stroke_picture()).save(tmp_path / "a.png")
    predictor = Predictor(copied)
    assert predictor.calibration == cal and predictor.temperature == cal["temperature"]
    assert predictor.threshold == cal["threshold"] and predictor.calibration_note == ""
    results, errors = predictor.predict_files([str(tmp_path / "a.png")])
    assert errors == [] and results[0].label in list("0123456789")
    assert capsys.readouterr().err == ""


def test_no_threshold_calls_nothing_unsure_and_a_threshold_does(tmp_path, untrained_run, capsys):
    Image.fromarray(stroke_picture()).save(tmp_path / "a.png")
    predictor = Predictor(untrained_run, warn_uncalibrated=False)
    results, _ = predictor.predict_files([str(tmp_path / "a.png")])
    assert results[0].status == "ok" and results[0].probability < 0.99  # an untrained model is not sure
    predictor.threshold = results[0].probability
    assert predictor.predict_files([str(tmp_path / "a.png")])[0][0].status == "ok"  # at the threshold: accepted
    predictor.threshold = 0.99
    assert predictor.predict_files([str(tmp_path / "a.png")])[0][0].status == "unsure"
    cal = fit_calibration(torch.randn(300, 10) * 5, torch.arange(300) % 10, step=3)
    (untrained_run / "calibration.json").write_text(json.dumps(dict(cal, threshold=0.99)))
    capsys.readouterr()
    assert main(["predict", str(untrained_run), str(tmp_path / "a.png")]) == 0
    assert "(unsure: below the 99.0% threshold)" in capsys.readouterr().out


def test_predict_help_shows_the_percent_sign_once(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    out = capsys.readouterr().out
    assert "95%" in out and "%%" not in out


@pytest.mark.slow
def test_training_writes_the_calibration_that_predict_uses_without_data(digits_run, monkeypatch):
    from mnistlab.data.dataset import load_dataset

    ds = load_dataset("digits")
    cal = json.loads((digits_run / "calibration.json").read_text())
    monkeypatch.setattr("mnistlab.data.dataset.load_dataset", lambda *a, **k: pytest.fail("a dataset was loaded"))
    predictor = Predictor(digits_run)
    assert cal["step"] == predictor.meta["step"] and predictor.calibration == cal
    assert predictor.temperature == cal["temperature"] and predictor.threshold == cal["threshold"]
    logits = predictor.logits(ds.val_images)  # the logits predict computes: the fit at the end of training saw them
    again = fit_calibration(logits, ds.val_labels, predictor.meta["step"])
    assert again["temperature"] == pytest.approx(cal["temperature"], rel=1e-4)
    assert again["val_errors"] == cal["val_errors"] and again["threshold_reason"] == cal["threshold_reason"]
    if cal["threshold"] is not None:
        assert again["threshold"] == pytest.approx(cal["threshold"], abs=1e-4)
        probs = (logits / predictor.temperature).softmax(1)
        score, pred = probs.max(1)
        correct = pred == ds.val_labels
        accepted = (score[correct] >= predictor.threshold).double().mean().item()
        assert 0.94 <= accepted <= 0.97  # 95% of the correctly classified validation images (143 images)
    assert torch.equal(logits.argmax(1), (logits / predictor.temperature).argmax(1))


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
