"""A run's model in int8: onnxruntime static quantization, checked against fp32 before it is written.

    mnistlab export runs/RUN --quantize int8          runs/RUN/model.int8.onnx
    quantize_run(Path("runs/RUN"))                    the same from Python: (path, the check's figures)

What it does. The fp32 ONNX graph (RUN_DIR/model.onnx when it still matches the checkpoint, else exported in
memory as `mnistlab export` would) goes through onnxruntime's quantize_static in QDQ format: each convolution's
and matrix multiply's weights become int8 with one scale per output channel (per-channel: a filter with small
weights keeps its precision instead of sharing the largest filter's scale), and the activations feeding them
become uint8 with one scale and zero point per tensor, chosen from the range (min to max) those activations
take on calibration images. On a CPU with VNNI or AMX-INT8 these int8 products are what the hardware speeds up.

The calibration images are TRAINING images (CALIBRATION_IMAGES of them, a seeded sample), never validation
or test images: the validation split chose the calibration temperature and threshold, and the test split is
what the accuracy is reported on; fitting the activation ranges on either would leak it into the number
docs/deploy.md reports. This is the one place in deploy/ that loads the dataset.

The check (nothing is written when it fails): on CHECK_IMAGES other training images, the int8 model must
give the same top class as the fp32 graph on at least MIN_AGREEMENT of them, and the logits must stay close:
the 99th percentile over images of the largest |int8 - fp32| logit difference at most MAX_LOGIT_ERROR times
the spread (standard deviation) of the fp32 logits. See the constants for why these values.

Which models it suits (bench/quantize.py measures all of the zoo; docs/deploy.md has the table): the
convolutional and fully connected ones (cnn, lenet5, mlp, linear). onnxruntime's static quantization has no
int8 kernels for the recurrent nodes (RNN, GRU, LSTM), so rnn, gru and lstm keep them in fp32 and only
their small input and output layers become int8. The vit's attention softmax and layer norms stay fp32, and
its matrix products are quantized.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnistlab.deploy.runtime import INT8_FILE, SOURCE_KEY, OnnxRuntime, checkpoint_sha256, require_onnxruntime
from mnistlab.errors import UserError

CALIBRATION_IMAGES = 512  # min-max ranges settle within a few hundred images; more only costs time
CHECK_IMAGES = 1000  # held-out training images the int8 model is checked on
# 98% agreement: at most 20 of the 1,000 images change class. The Fashion-MNIST models of bench/quantize.py
# measured 98.8-100% (1-epoch models, with many images near a tie) while their test accuracy moved by 0.14
# points or less; a model whose true rate of changed classes is 1% fails this on 0.3% of samples
# (binomial, 1,000 images), one at 3% almost always, and a broken quantization (a saturated activation range)
# changes far more. 0.25 of the logits' spread: the same models measured 0.01-0.13; wrong scales are off by
# whole spreads. The accuracy change itself is measured on the test split by bench/quantize.py, not here.
MIN_AGREEMENT = 0.98
MAX_LOGIT_ERROR = 0.25
SEED = 0


def training_sample(train_images: torch.Tensor, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration images, check images): two disjoint seeded samples of the training images (N, 28, 28) uint8."""
    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))
    cal = order[:CALIBRATION_IMAGES]
    check = order[CALIBRATION_IMAGES : CALIBRATION_IMAGES + CHECK_IMAGES]
    return train_images[cal], train_images[check]


def compare(fp32: np.ndarray, int8: np.ndarray) -> dict[str, float]:
    """How close int8 logits (N, K) are to fp32's: top-class agreement and the logit error (see the module)."""
    worst = np.abs(int8 - fp32).max(axis=1)  # (N,) each image's largest logit difference
    spread = float(fp32.std()) or 1.0
    return dict(agreement=float((int8.argmax(1) == fp32.argmax(1)).mean()),
                logit_error=float(np.quantile(worst, 0.99)) / spread, max_abs_error=float(worst.max()))


def passes(check: dict[str, float]) -> bool:
    return check["agreement"] >= MIN_AGREEMENT and check["logit_error"] <= MAX_LOGIT_ERROR


def quantize_bytes(fp32: bytes, calibration: np.ndarray, batch: int = 64) -> bytes:
    """quantize_static of an fp32 ONNX model (bytes) calibrated on normalised images (N, C, 28, 28): QDQ
    format, per-channel int8 weights, uint8 activations, min-max ranges; the int8 model's bytes."""
    require_onnxruntime()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from mnistlab.deploy.export import _quiet

    class Images(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self.batches = iter([{name: calibration[i : i + batch]} for i in range(0, len(calibration), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        source, ready, out = Path(tmp, "fp32.onnx"), Path(tmp, "ready.onnx"), Path(tmp, "int8.onnx")
        source.write_bytes(fp32)
        # shape inference and graph clean-up first, as onnxruntime recommends: quantize_static needs each
        # tensor's shape, and a folded graph has fewer tensors to calibrate
        quant_pre_process(str(source), str(ready))
        name = OnnxRuntime(ready, 0.0, 1.0).input_name
        with _quiet(""):  # the root logger: quantize_static warns there about each layer norm it leaves in fp32
            quantize_static(str(ready), str(out), Images(name), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        return out.read_bytes()


def quantize_run(run_dir: str | Path, out: str | Path | None = None, *, data_dir: str | None = None,
                 offline: bool = False) -> tuple[Path, dict[str, Any]]:
    """Quantize `run_dir`'s model to int8 and write it to `out` (default RUN_DIR/model.int8.onnx) once it passes
    its check; (the path, the check's figures). Loads the run's dataset for its training images."""
    from mnistlab.checkpoint import CHECKPOINT
    from mnistlab.config import TrainConfig
    from mnistlab.data.batches import to_input
    from mnistlab.data.dataset import load_dataset
    from mnistlab.deploy.export import ONNX_FILE, onnx_model_bytes
    from mnistlab.files import atomic_write_bytes
    from mnistlab.record import RunRecord

    require_onnxruntime()
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / INT8_FILE
    model, meta = RunRecord(run_dir).load_model()
    fp32 = _current_onnx(run_dir / ONNX_FILE, model, meta) or onnx_model_bytes(run_dir)
    cfg = TrainConfig.from_dict(meta["config"], source=f"{run_dir}: the checkpoint's config")
    ds = load_dataset(cfg.dataset, data_dir=data_dir or cfg.data_dir, offline=offline or cfg.offline,
                      val_size=cfg.val_size)
    cal_u8, check_u8 = training_sample(ds.train_images)
    mean, std = float(meta["mean"]), float(meta["std"])
    try:
        int8 = quantize_bytes(fp32, to_input(cal_u8, mean, std).numpy())
    except Exception as e:  # onnxruntime.quantization raises many types (an op it cannot handle, shape inference)
        raise UserError(f"cannot quantize model {meta['model']} of {run_dir} to int8: "
                        f"{' '.join(str(e).split())[:300] or type(e).__name__}") from None
    check = compare(OnnxRuntime(fp32, mean, std).logits_u8(check_u8).numpy(),
                    OnnxRuntime(int8, mean, std).logits_u8(check_u8).numpy())
    if not passes(check):
        raise UserError(f"model {meta['model']} of {run_dir} loses too much in int8 (on {len(check_u8)} held-out "
                        f"training images: same class for {check['agreement']:.1%}, needs {MIN_AGREEMENT:.0%}; "
                        f"logit error {check['logit_error']:.3f} of the spread, at most {MAX_LOGIT_ERROR}); "
                        "not writing it: serve it in fp32 or bf16")
    import onnx

    proto = onnx.load_from_string(int8)
    props = {p.key: p.value for p in proto.metadata_props}  # the fp32 file's metadata (classes, mean, ...)
    props[SOURCE_KEY] = checkpoint_sha256(run_dir / CHECKPOINT)
    props["quantization"] = json.dumps(dict(format="QDQ", weights="int8 per channel", activations="uint8 per tensor",
                                            calibration=f"min-max on {len(cal_u8)} training images", **check))
    onnx.helper.set_model_props(proto, props)
    atomic_write_bytes(out, proto.SerializeToString())
    return out, check


def _current_onnx(file: Path, model: torch.nn.Module, meta: dict[str, Any]) -> bytes | None:
    """The bytes of an fp32 ONNX file that still computes the checkpoint's logits, else None (export again)."""
    from mnistlab.deploy.runtime import TorchRuntime, check_same_model

    if not file.is_file() or meta.get("engine") == "scratch":
        return None
    try:
        check_same_model(OnnxRuntime(file, meta["mean"], meta["std"]), TorchRuntime(model, meta["mean"], meta["std"]),
                          int(meta["in_chans"]), file, file.parent)
    except Exception:  # a stale, damaged or foreign file: export afresh
        return None
    return file.read_bytes()
