"""deploy/quantize.py: int8 static quantization, calibrated on training images, written only after its check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import train_digits

from mnistlab.cli import main
from mnistlab.data.dataset import load_dataset
from mnistlab.deploy import quantize
from mnistlab.deploy.predict import Predictor
from mnistlab.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: a second thread only waits


def test_calibration_and_check_images_are_disjoint_training_samples():
    train = torch.arange(5000)[:, None, None].expand(-1, 28, 28).contiguous()  # each image's pixels: its index
    cal, check = quantize.training_sample(train)
    ids_cal, ids_check = set(cal[:, 0, 0].tolist()), set(check[:, 0, 0].tolist())
    assert len(ids_cal) == quantize.CALIBRATION_IMAGES and len(ids_check) == quantize.CHECK_IMAGES
    assert not ids_cal & ids_check
    again, _ = quantize.training_sample(train)
    assert torch.equal(cal, again)  # seeded: the same file from the same run


def test_the_check_measures_agreement_and_logit_error_against_the_logits_spread():
    rng = np.random.default_rng(0)
    fp32 = rng.normal(0, 2.0, (1000, 10)).astype(np.float32)
    close = fp32 + rng.uniform(-0.01, 0.01, fp32.shape).astype(np.float32)
    check = quantize.compare(fp32, close)
    assert check["logit_error"] < 0.01 and check["max_abs_error"] <= 0.01 + 1e-6 and quantize.passes(check)
    flipped = fp32.copy()
    flipped[:20] = -flipped[:20]  # 2% of the images change class (and their logits by far more than the spread)
    check = quantize.compare(fp32, flipped)
    assert check["agreement"] <= 0.98 and not quantize.passes(check)


def test_quantize_is_for_onnx_files_not_model_folders(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "hf", "--quantize", "int8"]) != 0
    assert "--quantize int8 writes an ONNX file: drop --format hf" in capsys.readouterr().err


@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory):
    return train_digits(tmp_path_factory.mktemp("quantize"), "--model", "mlp", "--epochs", "6")


@pytest.mark.slow
def test_int8_export_agrees_with_fp32_on_the_digits_test_split(digits_mlp, tmp_path, capsys):
    out = tmp_path / "mlp.int8.onnx"
    assert main(["export", str(digits_mlp), "--quantize", "int8", "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out and out.is_file()
    assert out.stat().st_size < 0.4 * (digits_mlp / "checkpoint.safetensors").stat().st_size  # int8, not float32
    (digits_mlp / "model.int8.onnx").write_bytes(out.read_bytes())
    ds = load_dataset("digits")
    fp32 = Predictor.open(digits_mlp).logits(ds.test_images)
    int8 = Predictor.open(digits_mlp, precision="int8").logits(ds.test_images)
    labels = ds.test_labels
    agreement = (int8.argmax(1) == fp32.argmax(1)).float().mean().item()
    change = ((int8.argmax(1) == labels).float().mean() - (fp32.argmax(1) == labels).float().mean()).item()
    # 360 test images: one image is 0.28 points; int8 may move two of them
    assert agreement >= 0.99 and abs(change) <= 2 / len(labels) + 1e-9, (agreement, change)


@pytest.mark.slow
def test_a_quantization_that_fails_its_check_writes_nothing(digits_mlp, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "MIN_AGREEMENT", 1.01)  # no model can agree on more than all of the images
    out = tmp_path / "refused.onnx"
    with pytest.raises(UserError, match="loses too much in int8.*not writing it") as e:
        quantize.quantize_run(digits_mlp, out)
    assert "\n" not in str(e.value) and not out.exists() and not list(tmp_path.iterdir())
