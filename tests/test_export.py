"""ONNX export: every registered model's onnxruntime logits match PyTorch's; the file describes itself;
a failed export writes nothing."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quick_few

from mnistlab import __version__
from mnistlab.config import resolve_config
from mnistlab.data.batches import to_input
from mnistlab.deploy.export import ATOL, METADATA_KEYS, RTOL, export_onnx, onnx_logits, onnx_session
from mnistlab.errors import UserError
from mnistlab.models import list_models
from mnistlab.record import load_run_checkpoint

N_IMAGES = 1000


@pytest.fixture
def onnx():
    """The onnx module, or a skip without the export extra. A fixture, not a module import: importing onnxscript
    costs two seconds, and the quick loop collects this module for its tests that need no extra."""
    pytest.importorskip("onnxruntime", reason='needs the export extra: pip install "mnistlab[export]"')
    pytest.importorskip("onnxscript", reason='needs the export extra: pip install "mnistlab[export]"')
    return pytest.importorskip("onnx", reason='needs the export extra: pip install "mnistlab[export]"')


def train_run(folder: Path, data_dir: Path, model: str, **model_kwargs) -> Path:
    """A real run folder: `model` (seed 0) trained for one epoch on the 180 images of the tiny IDX set."""
    from mnistlab.training import train

    cfg = resolve_config(dict(model=model, model_kwargs=model_kwargs, data_dir=str(data_dir), dataset=None,
                              epochs=1, batch_size=50, val_size=20, threads=1, run_dir=str(folder / "run")))
    cfg.dataset = None
    train(cfg, progress=False)
    return folder / "run"


def parity_images(mean: float, std: float) -> torch.Tensor:
    """1,000 real handwritten digits as the run's model sees them, (N, 1, 28, 28) float32.

    scikit-learn's bundled digits upsampled to 28x28: its 360 test images and the first 640 of its train
    split (the tiny training set is random noise, and real digits exercise the models more than noise).
    """
    from mnistlab.data.digits import load_digits_28

    x_train, _, x_test, _ = load_digits_28()
    images = np.concatenate([x_test, x_train])[:N_IMAGES]
    return to_input(torch.from_numpy(images), mean, std)


def assert_parity(run: Path, onnx_path: Path) -> dict[int, float]:
    """ORT logits at batch sizes 1 and 7 against PyTorch's, on 1,000 images; the max |diff| per batch size."""
    model, meta = load_run_checkpoint(run)  # as `mnistlab eval` runs it (channels-last)
    x = parity_images(meta["mean"], meta["std"])
    with torch.no_grad():
        want = model(x).numpy()  # (N, K)
    session = onnx_session(onnx_path)
    diffs = {}
    for batch in (1, 7):  # 1000 = 142 * 7 + 6: the last batch is another size again
        got = np.concatenate([onnx_logits(session, x[i : i + batch].numpy()) for i in range(0, N_IMAGES, batch)])
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=f"batch size {batch}")
        assert np.array_equal(got.argmax(1), want.argmax(1)), f"batch size {batch}: predictions differ"
        diffs[batch] = float(np.abs(got - want).max())
    print(f"{meta['model']} {meta['model_kwargs']}: max |onnx - torch| batch 1 {diffs[1]:.2e}, batch 7 {diffs[7]:.2e}")
    return diffs


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_exports_with_logits_matching_pytorch(onnx, tmp_path, idx_dir, name):
    run = train_run(tmp_path, idx_dir, name)
    path = export_onnx(run)
    assert path == run / "model.onnx"
    onnx.checker.check_model(str(path))
    assert_parity(run, path)


@pytest.mark.slow
@pytest.mark.parametrize("name, options", [
    ("gru", {"seq": "permuted"}),  # 784 steps in the order of the run's permutation buffer
    ("lstm", {"layers": 2, "bidirectional": True}),
    ("vit", {"pool": "cls"}),  # the class token expanded to t.shape[0], which torch.export keeps symbolic
])
def test_options_that_change_the_graph_export_with_matching_logits(onnx, tmp_path, idx_dir, name, options):
    run = train_run(tmp_path, idx_dir, name, **options)
    assert_parity(run, export_onnx(run, tmp_path / "out" / "m.onnx"))


@pytest.mark.slow  # exports ONNX
def test_the_file_carries_what_a_consumer_needs_in_its_metadata(onnx, tmp_path, idx_dir):
    run = train_run(tmp_path, idx_dir, "mlp", hidden=[32])
    _, meta = load_run_checkpoint(run)
    path = export_onnx(run, tmp_path / "mlp.onnx")
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == meta["classes"] == [str(i) for i in range(10)]
    assert float(props["mean"]) == meta["mean"] and float(props["std"]) == meta["std"]
    assert props["input_layout"] == "N,1,28,28 float32, (pixel/255 - mean)/std"
    assert props["dataset"] == "custom" and props["preprocessing"] == "mnist"  # a --data-dir run: MNIST's recipe
    assert props["test_time_augmentation"] == "none"
    assert props["model"] == "mlp" and json.loads(props["model_kwargs"]) == {"hidden": [32]}
    assert props["mnistlab_version"] == __version__
    assert props["input_size"] == "28,28" and props["ink"] == "light on black"
    calibration = json.loads((run / "calibration.json").read_text())  # written when training ended
    assert json.loads(props["temperature"]) == calibration["temperature"]
    assert json.loads(props["threshold"]) == calibration["threshold"]
    assert json.loads(props["calibration"]) == calibration
    assert set(props) == set(METADATA_KEYS)
    (image,), (logits,) = proto.graph.input, proto.graph.output
    assert (image.name, logits.name) == ("image", "logits")
    assert image.type.tensor_type.shape.dim[0].dim_param == "batch"  # any batch size
    assert [d.dim_value for d in image.type.tensor_type.shape.dim[1:]] == [1, 28, 28]


@pytest.mark.slow  # exports ONNX
def test_an_uncalibrated_run_exports_temperature_one_and_no_threshold(onnx, tmp_path, idx_dir):
    run = train_run(tmp_path, idx_dir, "linear")
    (run / "calibration.json").unlink()
    props = {p.key: p.value for p in onnx.load(export_onnx(run)).metadata_props}
    assert (props["temperature"], props["threshold"]) == ("1.0", "null")
    assert json.loads(props["calibration"]) == {"note": "no calibration.json"}


def docs_recipe() -> str:
    """The onnxruntime recipe of docs/deploy.md: its python block that opens an InferenceSession."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "ort.InferenceSession" in b]
    return block


@pytest.mark.slow
@pytest.mark.parametrize("dark_on_light", [True, False])
def test_the_docs_onnxruntime_recipe_gives_mnistlab_predicts_probabilities(onnx, tmp_path, idx_dir, monkeypatch, capsys,
                                                                            dark_on_light):
    from PIL import Image

    from mnistlab.cli import main
    from mnistlab.data.digits import load_digits_28

    run = train_run(tmp_path, idx_dir, "cnn")
    calibration = json.loads((run / "calibration.json").read_text())
    calibration.update(temperature=0.7, threshold=0.5)  # a temperature the recipe must divide by
    (run / "calibration.json").write_text(json.dumps(calibration))
    export_onnx(run, tmp_path / "model.onnx")
    digit = load_digits_28()[2][7]  # (28, 28) uint8, a real test digit
    big = np.kron(digit, np.ones((10, 10), np.uint8))  # 280x280, as a person's picture
    Image.fromarray(255 - big if dark_on_light else big).save(tmp_path / "picture.png")

    capsys.readouterr()  # training's and export's lines
    assert main(["predict", str(run), str(tmp_path / "picture.png"), "--json", "--top", "10"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    want = np.zeros(10)
    for t in predicted["top"]:
        want[t["index"]] = t["probability"]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(docs_recipe(), "docs/deploy.md", "exec"), namespace)
    printed = capsys.readouterr().out.split()
    np.testing.assert_allclose(namespace["p"], want, rtol=0, atol=1e-5)
    assert printed[0] == predicted["label"] and printed[2] == predicted["status"]


@pytest.mark.slow  # trains a model
def test_a_failing_export_is_a_user_error_and_leaves_no_file(onnx, tmp_path, idx_dir, monkeypatch):
    run = train_run(tmp_path, idx_dir, "linear")

    def broken_export(*args, **kwargs):
        raise RuntimeError("Unsupported: data-dependent control flow")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(UserError, match="cannot export model linear .* data-dependent control flow"):
        export_onnx(run)
    assert not (run / "model.onnx").exists()
    out = tmp_path / "old.onnx"
    out.write_bytes(b"the previous export")
    with pytest.raises(UserError):
        export_onnx(run, out)
    assert out.read_bytes() == b"the previous export"  # untouched, and no temporary file left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.onnx", "run", "tiny"]


@pytest.mark.slow  # trains a model
def test_a_graph_with_a_fixed_batch_size_is_refused_before_writing(onnx, tmp_path, idx_dir, monkeypatch):
    import mnistlab.record

    class FixedBatch(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x).reshape(len(x), -1)  # len(): a Python int, the batch size fixed under torch.export

    run = train_run(tmp_path, idx_dir, "linear")
    real = mnistlab.record.load_run_checkpoint
    monkeypatch.setattr(mnistlab.record, "load_run_checkpoint", lambda d: (FixedBatch(real(d)[0]), real(d)[1]))
    with pytest.raises(UserError, match="dynamic batch size: torch.export fixed the batch size"):
        export_onnx(run)
    assert not (run / "model.onnx").exists()


@pytest.mark.slow  # exports ONNX
def test_a_graph_that_computes_other_logits_is_refused_before_writing(onnx, tmp_path, idx_dir, monkeypatch):
    import mnistlab.deploy.export as export_module

    run = train_run(tmp_path, idx_dir, "linear")
    real = export_module.onnx_logits
    monkeypatch.setattr(export_module, "onnx_logits", lambda session, x: real(session, x) + 1e-2)
    with pytest.raises(UserError, match="different logits from PyTorch"):
        export_onnx(run)
    assert not (run / "model.onnx").exists()


@pytest.mark.slow  # trains a model
def test_a_scratch_engine_run_is_refused(onnx, tmp_path, idx_dir, capsys):
    from mnistlab.scratch import train as scratch_train

    cfg = resolve_config(dict(engine="scratch", model="mlp", data_dir=str(idx_dir), dataset=None, epochs=1,
                              batch_size=50, val_size=20, run_dir=str(tmp_path / "run")))
    cfg.dataset = None
    scratch_train.train(cfg)
    with pytest.raises(UserError, match="scratch-engine"):
        export_onnx(tmp_path / "run")
    assert not (tmp_path / "run" / "model.onnx").exists()


@pytest.mark.slow  # export_onnx imports onnx and onnxruntime before it looks at the folder: two seconds
def test_a_folder_without_a_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint.safetensors"):
        export_onnx(tmp_path)


# the other two import onnx first (two seconds): the quick loop takes the case that imports nothing
@pytest.mark.parametrize("missing", quick_few(["onnx", "onnxruntime", "onnxscript"], {"onnx"}))
def test_without_the_extra_the_error_says_what_to_install(tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` raise ImportError
    with pytest.raises(UserError, match=r'pip install "mnistlab\[export\]"'):
        export_onnx(tmp_path)
    with pytest.raises(UserError, match=missing):
        onnx_logits(tmp_path / "model.onnx", np.zeros((1, 1, 28, 28), np.float32))
