"""A run's model as one self-describing ONNX file, for onnxruntime and any other ONNX consumer.

    mnistlab export runs/RUN                  runs/RUN/model.onnx
    mnistlab export runs/RUN -o digits.onnx

The graph comes from torch.onnx.export(dynamo=True) (torch.export underneath; TorchScript export is
deprecated upstream and not offered), with a dynamic batch dimension: input "image" (N, C, 28, 28)
float32, output "logits" (N, K), no softmax. Everything a consumer needs to feed it is in the
file's metadata_props (METADATA_KEYS): the classes, the normalisation, the input layout and size, the
dataset whose conventions a picture must follow, the calibration (temperature and reject threshold, from
the run's calibration.json), the model and its options, the mnistlab version. docs/deploy.md shows
onnxruntime predicting from the file and a prepared picture alone (tests/test_export.py runs it).

Before anything is written, onnxruntime runs the exported graph against PyTorch on a batch of a size
the trace never saw: a model that cannot be exported, or exports wrongly, is one UserError and no file.
onnx, onnxruntime and onnxscript are the optional extra: pip install "mnistlab[export]".
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnistlab.deploy.preprocess import convention_for
from mnistlab.errors import UserError
from mnistlab.files import atomic_write_bytes

ONNX_FILE = "model.onnx"
IMG_SIZE = 28  # every dataset of the family is 28x28; the models' img_size is the dataset's, not an option
INPUT_NAME, OUTPUT_NAME = "image", "logits"
METADATA_KEYS = ("classes", "mean", "std", "input_layout", "input_size", "ink", "preprocessing", "dataset",
                 "temperature", "threshold", "calibration", "test_time_augmentation", "model", "model_kwargs",
                 "mnistlab_version")
ATOL, RTOL = 1e-4, 1e-3  # the parity the file promises (tests/test_export.py measures it on 1,000 images)
INSTALL_HINT = 'pip install "mnistlab[export]"'


def _require_onnx() -> tuple[Any, Any]:
    """(onnx, onnxruntime), or a UserError saying how to install them; onnxscript is torch's exporter."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) imports it)
    except ImportError as e:
        raise UserError(f"ONNX export needs onnx, onnxruntime and onnxscript ({e.name} is missing): "
                        f"{INSTALL_HINT}") from None
    return onnx, onnxruntime


def onnx_metadata(meta: dict[str, Any], calibration: dict[str, Any] | None = None,
                  calibration_note: str = "") -> dict[str, str]:
    """The metadata_props of a run's ONNX file, from its checkpoint metadata and calibration.json's contents
    (None: uncalibrated, so temperature 1 and no threshold); all values strings, numbers as JSON."""
    from mnistlab import __version__
    from mnistlab.calibration import temperature_and_threshold

    dataset = meta["config"].get("dataset") or "custom"
    tta = [name for name, on in (("hflip", meta.get("hflip_tta")), ("shifts", meta.get("shift_tta"))) if on]
    temperature, threshold = temperature_and_threshold(calibration)
    return {
        "classes": json.dumps(list(meta["classes"])),
        "mean": repr(float(meta["mean"])),
        "std": repr(float(meta["std"])),
        "input_layout": f"N,{meta['in_chans']},{IMG_SIZE},{IMG_SIZE} float32, (pixel/255 - mean)/std",
        "input_size": f"{IMG_SIZE},{IMG_SIZE}",
        "ink": "light on black",
        # the recipe that makes a picture look like this dataset's images (mnistlab/deploy/preprocess.py)
        "preprocessing": convention_for(dataset),
        "dataset": dataset,
        # probabilities are softmax(logits / temperature); a top probability below threshold is "unsure"
        # (null: no threshold, nothing is unsure); calibration: how they were fitted, or why there are none
        "temperature": json.dumps(temperature),
        "threshold": json.dumps(threshold),
        "calibration": json.dumps(calibration if calibration else {"note": calibration_note}),
        # the run's reported accuracy averaged these views; the graph computes the single plain view
        "test_time_augmentation": "+".join(tta) or "none",
        "model": meta["model"],
        "model_kwargs": json.dumps(meta["model_kwargs"], sort_keys=True),
        "mnistlab_version": __version__,
    }


def export_onnx(run_dir: Path, out: Path | None = None) -> Path:
    """Export the model of `run_dir` to ONNX at `out` (default RUN_DIR/model.onnx); return the path."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / ONNX_FILE
    atomic_write_bytes(out, onnx_model_bytes(run_dir))
    return out


def onnx_model_bytes(run_dir: Path) -> bytes:
    """The ONNX file of `run_dir`'s model, in memory, after its parity check (export_onnx writes it;
    deploy/quantize.py quantizes it)."""
    from mnistlab import record

    onnx, _ = _require_onnx()
    run_dir = Path(run_dir)
    model, meta = record.load_run_checkpoint(run_dir)
    if meta.get("engine") == "scratch":
        raise UserError(f"{run_dir}: a scratch-engine (numpy) run has no PyTorch graph to export; "
                        "train it with the default engine to export it")
    calibration, why_not = record.RunRecord(run_dir).calibration(meta["step"])
    # the trace runs on the CPU in float32; channels-last (how runs train) is a layout, not part of the graph
    model = model.to("cpu", torch.float32).to(memory_format=torch.contiguous_format).eval()
    # batch 2: a batch of 1 would be specialised; its own generator leaves the global RNG alone
    example = torch.randn(2, meta["in_chans"], IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(0))
    name = meta["model"]
    try:
        with warnings.catch_warnings(), _quiet("torch.onnx"), _rnn_loops():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter is about torch, not the user
            program = torch.onnx.export(
                model, (example,), dynamo=True, external_data=False, verbose=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            )
        proto = program.model_proto
        if not proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param:
            # torch.onnx falls back to a fixed-shape capture when torch.export cannot keep the batch symbolic
            raise _FixedBatch("torch.export fixed the batch size (the model's code turns it into a Python "
                              "int somewhere, e.g. len(x) instead of x.shape[0])")
        onnx.helper.set_model_props(proto, onnx_metadata(meta, calibration, why_not))
        proto.doc_string = f"mnistlab {name} from {run_dir.name}: logits of (pixel/255 - mean)/std images"
        data = proto.SerializeToString()
        onnx.checker.check_model(proto)
    except _FixedBatch as e:
        raise UserError(f"cannot export model {name} of {run_dir} to ONNX with a dynamic batch size: {e}") from None
    except Exception as e:  # the exporter raises many types (torch.export, onnxscript, onnx): all mean "cannot"
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise UserError(f"cannot export model {name} of {run_dir} to ONNX: {detail}") from None
    _check_parity(model, data, meta["in_chans"], name)
    return data


class _FixedBatch(Exception):
    """The exported graph takes one batch size only."""


def _check_parity(model: torch.nn.Module, data: bytes, in_chans: int, name: str) -> None:
    """Refuse a graph whose logits differ from PyTorch's, on a batch size the trace never saw."""
    x = torch.randn(3, in_chans, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x).numpy()
    try:
        got = onnx_logits(onnx_session(data), x.numpy())
    except Exception as e:  # onnxruntime's own errors (an op it lacks, a shape it refuses) have no common base
        raise UserError(f"model {name} exported to ONNX does not run in onnxruntime: {' '.join(str(e).split())[:300]}"
                        ) from None
    if got.shape != want.shape or not np.allclose(got, want, atol=ATOL, rtol=RTOL):
        diff = np.abs(got - want).max() if got.shape == want.shape else f"shape {got.shape} vs {want.shape}"
        raise UserError(f"model {name} exported to ONNX computes different logits from PyTorch "
                        f"(max difference {diff}); not writing it")


def onnx_session(model: Path | str | bytes) -> Any:
    """An onnxruntime InferenceSession on the CPU for an ONNX file (or its bytes)."""
    _, ort = _require_onnx()
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def onnx_logits(model: Path | str | Any, x: np.ndarray) -> np.ndarray:
    """Logits (N, K) of normalised images x (N, C, 28, 28) through an ONNX file or an onnx_session."""
    session = onnx_session(model) if isinstance(model, (Path, str, bytes)) else model
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)}
    return session.run(None, feed)[0]


@contextmanager
def _rnn_loops() -> Iterator[None]:
    """GRU and LSTM as one while_loop each for the whole export, not just its capture step.

    torch.onnx.export turns these on while it captures a graph with dynamic shapes, but not while it
    runs the decompositions that follow, which then trace the cell once per time step: a GRU reading
    784 pixels took 79 s to export, 4.6 s with the loops left on (torch 2.13; the same ONNX GRU node).
    torch.export._patches is private: without it, export is only slower.
    """
    try:
        from torch.export._patches import (
            register_gru_while_loop_decomposition,
            register_lstm_while_loop_decomposition,
        )
    except ImportError:
        yield
        return
    with register_gru_while_loop_decomposition(), register_lstm_while_loop_decomposition():
        yield


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Logger `name` at ERROR for a while (the exporter warns once per torchvision op it cannot find)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
