"""deploy/runtime.py: what computes the logits (torch fp32 or bf16, onnxruntime fp32 or int8), chosen by
Predictor.open / mnistlab.load / `mnistlab predict --runtime --precision`, and named in every answer."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import make_arrays, train_digits
from PIL import Image

import mnistlab
from mnistlab.checkpoint import CHECKPOINT, save_checkpoint
from mnistlab.cli import main
from mnistlab.data.dataset import load_dataset
from mnistlab.deploy import runtime
from mnistlab.deploy.predict import Predictor
from mnistlab.errors import UserError
from mnistlab.record import load_run_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: a second thread only waits


@pytest.fixture
def picture(tmp_path):
    ink = np.zeros((56, 56), dtype=np.uint8)
    ink[10:46, 24:32] = 255
    Image.fromarray(ink).save(tmp_path / "one.png")
    return tmp_path / "one.png"


@pytest.fixture
def no_onnxruntime(monkeypatch):
    """`import onnxruntime` fails, as where the export extra is not installed."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)


@pytest.mark.parametrize("rt, precision, want", [(None, "fp32", ("torch", "fp32")), (None, "bf16", ("torch", "bf16")),
                                                 (None, "int8", ("onnxruntime", "int8")),
                                                 ("onnxruntime", "fp32", ("onnxruntime", "fp32"))])
def test_resolve_fills_in_the_precisions_runtime(rt, precision, want):
    assert runtime.resolve(rt, precision) == want


@pytest.mark.parametrize("rt, precision, words", [("torch", "int8", "use runtime onnxruntime for int8"),
                                                  ("onnxruntime", "bf16", "use runtime torch for bf16"),
                                                  ("tensorrt", "fp32", "choose one of torch, onnxruntime"),
                                                  (None, "fp16", "choose one of fp32, bf16, int8")])
def test_resolve_refuses_what_does_not_exist_in_one_line(rt, precision, words):
    with pytest.raises(UserError, match=words) as e:
        runtime.resolve(rt, precision)
    assert "\n" not in str(e.value)


def test_bf16_is_refused_where_the_cpu_only_emulates_it_unless_forced(untrained_run, monkeypatch):
    import mnistlab.lifecycle

    monkeypatch.setattr(mnistlab.lifecycle, "bf16_is_fast", lambda device, cpuinfo=None: False)
    with pytest.raises(UserError, match="does not compute bf16 natively") as e:
        Predictor.open(untrained_run, precision="bf16", warn_uncalibrated=False)
    assert "\n" not in str(e.value)
    assert Predictor.open(untrained_run, precision="bf16", force_bf16=True, warn_uncalibrated=False).runtime == \
        "torch-bf16"


def test_bf16_gives_fp32s_classes_and_close_logits(untrained_run, monkeypatch):
    import mnistlab.lifecycle

    monkeypatch.setattr(mnistlab.lifecycle, "bf16_is_fast", lambda device, cpuinfo=None: True)
    fp32 = Predictor.open(untrained_run, warn_uncalibrated=False)
    bf16 = Predictor.open(untrained_run, precision="bf16", warn_uncalibrated=False)
    images = torch.from_numpy(make_arrays()["t10k-images-idx3-ubyte"])
    a, b = fp32.logits(images), bf16.logits(images)
    assert fp32.runtime == "torch-fp32" and bf16.runtime == "torch-bf16"
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # autocast did run in bf16
    # bf16 keeps 8 significant bits: about 0.4% of each product, far below the gaps between classes
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.95


def test_missing_onnxruntime_is_one_line_naming_the_extra(untrained_run, no_onnxruntime):
    from mnistlab.deploy.quantize import quantize_run

    for open_it in (lambda: Predictor.open(untrained_run, runtime="onnxruntime"),
                    lambda: mnistlab.load(untrained_run, precision="int8"),
                    lambda: quantize_run(untrained_run)):
        with pytest.raises(UserError, match=r'pip install -e "\.\[export\]"') as e:
            open_it()
        assert "\n" not in str(e.value)


def test_onnxruntime_without_its_files_says_which_export_writes_them(untrained_run):
    with pytest.raises(UserError, match=f"no model.onnx: `mnistlab export {untrained_run}` writes it"):
        Predictor.open(untrained_run, runtime="onnxruntime", warn_uncalibrated=False)
    with pytest.raises(UserError, match=r"no model.int8.onnx: `mnistlab export .* --quantize int8` writes it"):
        Predictor.open(untrained_run, precision="int8", warn_uncalibrated=False)


@pytest.mark.slow
def test_onnxruntime_refuses_a_model_folder(untrained_run, tmp_path):
    from mnistlab.deploy.model_folder import export_model_folder

    folder, _ = export_model_folder(untrained_run, tmp_path / "hf")
    with pytest.raises(UserError, match="not one: use runtime torch"):
        Predictor.open(folder, runtime="onnxruntime", warn_uncalibrated=False)
    assert Predictor.open(folder, warn_uncalibrated=False).runtime == "torch-fp32"


def test_every_answer_names_its_runtime(untrained_run, picture, tmp_path, capsys):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(blank)
    assert main(["predict", str(untrained_run), str(picture), str(blank), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["runtime"] for line in lines] == ["torch-fp32", None]  # a blank picture is answered before the model
    clf = mnistlab.load(untrained_run, warn_uncalibrated=False)
    assert clf.runtime == "torch-fp32" and clf.predict(picture).runtime == "torch-fp32"
    assert clf.predict(picture).to_dict()["runtime"] == "torch-fp32"


@pytest.mark.slow
def test_served_answers_carry_the_runtime_field():
    from mnistlab.deploy.serve.app import PredictionOut

    assert "runtime" in PredictionOut.model_fields


# ---- on a trained digits run: the four runtimes against each other (slow: trains and exports) ----


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    """A digits CNN with its model.onnx and model.int8.onnx, written by `mnistlab export`."""
    run = train_digits(tmp_path_factory.mktemp("runtime"), "--model", "cnn", "--epochs", "6")
    assert main(["export", str(run)]) == 0
    assert main(["export", str(run), "--quantize", "int8"]) == 0
    return run


@pytest.mark.slow
def test_each_runtime_gives_torch_fp32s_answers_on_digits(exported_run):
    ds = load_dataset("digits")
    want = Predictor.open(exported_run).logits(ds.test_images)
    for rt, precision in [("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]:
        p = Predictor.open(exported_run, runtime=rt, precision=precision, force_bf16=True)
        got = p.logits(ds.test_images)
        assert p.runtime == f"{rt}-{precision}" and got.shape == want.shape
        agreement = (got.argmax(1) == want.argmax(1)).float().mean().item()
        # the fp32 graph is the same arithmetic; bf16 and int8 round, and may flip an image that sits on a boundary
        assert agreement == 1.0 if precision == "fp32" else agreement >= 0.99, (p.runtime, agreement)
    onnx32 = Predictor.open(exported_run, runtime="onnxruntime").logits(ds.test_images)
    assert torch.allclose(onnx32, want, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_predict_json_and_the_python_api_name_the_int8_runtime(exported_run, picture, capsys):
    assert main(["predict", str(exported_run), str(picture), "--json", "--precision", "int8"]) == 0
    assert json.loads(capsys.readouterr().out)["runtime"] == "onnxruntime-int8"
    clf = mnistlab.load(exported_run, runtime="onnxruntime", precision="int8")
    assert clf.runtime == "onnxruntime-int8" and clf.predict(picture).runtime == "onnxruntime-int8"
    assert clf.predict(picture).label == mnistlab.load(exported_run).predict(picture).label


@pytest.mark.slow
def test_onnx_files_of_an_older_checkpoint_are_refused(exported_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    model, meta = load_run_checkpoint(run)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # as if the run had trained on after its export
    save_checkpoint(run / CHECKPOINT, model, meta)
    with pytest.raises(UserError, match="computes other logits than .* `mnistlab export .*` writes it again"):
        Predictor.open(run, runtime="onnxruntime")
    with pytest.raises(UserError, match="quantized from another checkpoint"):
        Predictor.open(run, precision="int8")
