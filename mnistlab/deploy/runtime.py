"""What computes a model's logits: PyTorch in fp32 or bf16, or onnxruntime in fp32 or int8.

    runtime = open_runtime(run_dir, model, meta, runtime="onnxruntime", precision="int8")
    runtime.name                       # "onnxruntime-int8": what Prediction.runtime and the served JSON report
    runtime.logits(x)                  # (N, C, 28, 28) float32, normalised -> (N, K) float32 logits
    runtime.logits_u8(images_u8)       # (N, 28, 28) uint8 -> (N, K), normalised with the run's mean and std

The four, and where each one's model comes from:
    torch-fp32         the checkpoint's module as trained (the default: it needs nothing more)
    torch-bf16         the same module under CPU autocast to bf16: matmuls and convolutions in bf16 where the
                       CPU computes bf16 natively (lifecycle.bf16_is_fast, the rule training's --precision auto
                       uses); refused elsewhere, where it is emulated and slower, unless forced
    onnxruntime-fp32   RUN_DIR/model.onnx, written by `mnistlab export RUN_DIR`; on opening, it must reproduce the
                       checkpoint's logits on a small batch (a file exported before the run changed is refused)
    onnxruntime-int8   RUN_DIR/model.int8.onnx, written by `mnistlab export RUN_DIR --quantize int8`
                       (deploy/quantize.py); it records the checksum of the checkpoint it was quantized from

Why the ONNX files are not made on opening: torch's ONNX export of even the small CNN takes seconds (tens of
seconds on a busy 2-core machine), and int8 calibration needs training images, which a Predictor never loads
(a copied run folder predicts without its dataset). So both are files that `mnistlab export` writes once.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnistlab.errors import UserError

RUNTIMES = ("torch", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "int8")
# the runtime a precision runs on when none is named: int8 is onnxruntime's, bf16 PyTorch's
# (docs/deploy.md, "Faster inference", has the measurements behind fp32's)
DEFAULT_RUNTIME = {"fp32": "torch", "bf16": "torch", "int8": "onnxruntime"}
SUPPORTED = {("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")}
INT8_FILE = "model.int8.onnx"
SOURCE_KEY = "source_sha256"  # the int8 file's metadata: sha256 of the checkpoint file it was quantized from
INSTALL_HINT = 'pip install -e ".[export]"'


class Runtime:
    """Logits of normalised image batches; `name` ("torch-fp32", "onnxruntime-int8", ...) says what computed them."""

    name: str = ""

    def __init__(self, mean: float, std: float) -> None:
        self.mean, self.std = float(mean), float(std)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, 28, 28) float32 images, already (pixel/255 - mean)/std -> (N, K) float32 logits on the CPU."""
        raise NotImplementedError

    def logits_u8(self, images_u8: torch.Tensor, batch: int = 1000) -> torch.Tensor:
        """(N, 28, 28) uint8 images -> (N, K) float32 logits, `batch` images at a time (normalised on the CPU)."""
        from mnistlab.calibration import batched_logits

        return batched_logits(self.logits, images_u8, self.mean, self.std, batch)


class TorchRuntime(Runtime):
    """The PyTorch module itself, in fp32 or under bf16 autocast (weights stay fp32; autocast casts per op)."""

    def __init__(self, model: torch.nn.Module, mean: float, std: float, precision: str = "fp32") -> None:
        super().__init__(mean, std)
        self.model, self.precision = model.eval(), precision
        self.device = next(model.parameters()).device
        self.name = f"torch-{precision}"

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                    else nullcontext())
        with autocast:
            return self.model(x.to(self.device)).float().cpu()


class OnnxRuntime(Runtime):
    """An onnxruntime InferenceSession on the CPU over an ONNX model (a file or its bytes)."""

    def __init__(self, model: Path | str | bytes, mean: float, std: float, precision: str = "fp32") -> None:
        super().__init__(mean, std)
        ort = require_onnxruntime()
        source = model if isinstance(model, bytes) else str(model)
        options = ort.SessionOptions()
        # as many threads as torch was given (one in every server process: serve/server.py, one_thread_each), and
        # no spinning: an idle onnxruntime thread that spins takes a core the server's preparing needs
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's errors share no base class: a damaged file, an op it lacks
            what = "the ONNX model" if isinstance(model, bytes) else str(model)
            raise UserError(f"{what}: onnxruntime cannot load it ({' '.join(str(e).split())[:200]})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.precision, self.name = precision, f"onnxruntime-{precision}"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)}
        return torch.from_numpy(self.session.run(None, feed)[0])

    def metadata(self) -> dict[str, str]:
        """The model file's metadata_props (deploy/export.py's keys; the int8 file adds its own)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)


def require_onnxruntime() -> Any:
    """The onnxruntime module, or a one-line UserError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"the onnxruntime runtime needs the onnxruntime package: {INSTALL_HINT}") from None
    return onnxruntime


def resolve(runtime: str | None, precision: str) -> tuple[str, str]:
    """(runtime, precision) checked against the four that exist; runtime None: the precision's default."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    runtime = runtime or DEFAULT_RUNTIME[precision]
    if runtime not in RUNTIMES:
        raise UserError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if (runtime, precision) not in SUPPORTED:
        other = DEFAULT_RUNTIME[precision]
        raise UserError(f"{runtime} does not run {precision} models here: use runtime {other} for {precision}, "
                        f"or precision fp32")
    return runtime, precision


def check_bf16(force: bool = False) -> None:
    """Refuse bf16 on a CPU that does not compute it natively (emulated bf16 is slower than fp32), unless forced."""
    from mnistlab.lifecycle import bf16_is_fast

    if not force and not bf16_is_fast(torch.device("cpu")):
        raise UserError("precision bf16: this CPU does not compute bf16 natively (no AMX, or an AMD CPU without "
                        "AVX512_BF16), so it would be slower than fp32; use precision fp32 (or force it: "
                        "--force-bf16, force_bf16=True)")


def checkpoint_sha256(path: Path) -> str:
    """sha256 of a checkpoint or weights file: what an int8 file records about the model it was quantized from."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def open_runtime(path: str | Path, model: torch.nn.Module, meta: dict[str, Any], runtime: str | None = None,
                 precision: str = "fp32", *, force_bf16: bool = False) -> Runtime:
    """The runtime that computes the logits of the model at `path` (a run folder, or an exported model folder
    whose torch module is `model`): see the module's docstring for where each one's model comes from."""
    runtime, precision = resolve(runtime, precision)
    mean, std = float(meta["mean"]), float(meta["std"])
    if runtime == "torch":
        if precision == "bf16":
            check_bf16(force_bf16)
        return TorchRuntime(model, mean, std, precision)
    from mnistlab.checkpoint import CHECKPOINT
    from mnistlab.deploy.export import ONNX_FILE

    path = Path(path)
    if not (path / CHECKPOINT).is_file():
        raise UserError(f"{path}: onnxruntime reads the ONNX files `mnistlab export` writes into a run folder; "
                        "this is not one: use runtime torch, or give the run folder")
    require_onnxruntime()
    if precision == "int8":
        file = path / INT8_FILE
        if not file.is_file():
            raise UserError(f"{path} has no {INT8_FILE}: `mnistlab export {path} --quantize int8` writes it "
                            "(calibrated on the run's training images)")
        onnx = OnnxRuntime(file, mean, std, "int8")
        if onnx.metadata().get(SOURCE_KEY) != checkpoint_sha256(path / CHECKPOINT):
            raise UserError(f"{file} was quantized from another checkpoint than {path}'s: "
                            f"`mnistlab export {path} --quantize int8` writes it again")
        return onnx
    file = path / ONNX_FILE
    if not file.is_file():
        raise UserError(f"{path} has no {ONNX_FILE}: `mnistlab export {path}` writes it")
    onnx = OnnxRuntime(file, mean, std, "fp32")
    check_same_model(onnx, TorchRuntime(model, mean, std), int(meta["in_chans"]), file, path)
    return onnx


def check_same_model(onnx: OnnxRuntime, torch_fp32: TorchRuntime, in_chans: int, file: Path, run: Path) -> None:
    """Refuse an fp32 ONNX file whose logits are not the checkpoint's (exported before the run trained on):
    the parity export itself promises, on 3 seeded random images (a few milliseconds)."""
    from mnistlab.deploy.export import ATOL, IMG_SIZE, RTOL

    x = torch.randn(3, in_chans, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(0))
    try:
        got = onnx.logits(x)
    except Exception as e:  # onnxruntime's errors share no base class: a wrong input shape, a damaged graph
        raise UserError(f"{file} does not run in onnxruntime: {' '.join(str(e).split())[:200]}") from None
    want = torch_fp32.logits(x)
    if got.shape != want.shape or not torch.allclose(got, want, atol=ATOL, rtol=RTOL):
        raise UserError(f"{file} computes other logits than {run}'s checkpoint (exported before the run changed?): "
                        f"`mnistlab export {run}` writes it again")
