"""What every torch run shares around its loop, whether it trains (training.py) or pre-trains (pretrain.py).

    with process_settings():                 # threads, determinism, cuDNN, the process group: restored after
        apply_process_settings(cfg)
        device = pick_device(cfg.device)     # and pick_precision(cfg.precision, device)
        ...  an engine: make_optimizer, memory_errors_as_user_error around its step, save_run_checkpoint
        ...  resume: resume_config(run, cfg), finished_results, starting_state

A run's life: check what can be checked, load the data, create the run folder (run.py: a run that fails
before its first checkpoint leaves no folder), build the engine, loop.fit, the final evaluation. A resume
reads the configuration its checkpoint records (`resume_config`), stops at once when the run had finished,
and otherwise continues from the checkpoint's TrainState (`starting_state`), bit-identically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from mnistlab import distributed
from mnistlab.checkpoint import (
    CHECKPOINT,
    PRETRAIN_KIND,
    RUN_META,
    NonFiniteCheckpoint,
    Read,
    load_into,
    read_checkpoint,
    require_meta,
    save_checkpoint,
)
from mnistlab.config import PretrainConfig, TrainConfig, model_label
from mnistlab.errors import UserError
from mnistlab.loop import TrainingDiverged, TrainState
from mnistlab.optim import Muon, NesterovSGD, Optimizer
from mnistlab.run import CONFIG, RESULTS, RunFolder, cap_threads, cpu, note, say, tune_allocator

PRETRAIN_META = ("kind", "model", "model_kwargs", "in_chans", "method", "config", "mean", "std", "step")
RunConfig = TypeVar("RunConfig", TrainConfig, PretrainConfig)


# ---- the process: settings a run changes, and puts back ------------------------------------------------

@contextmanager
def process_settings() -> Iterator[None]:
    """The life of one run in this process: thread count, deterministic kernels and cuDNN autotuning are
    process-wide, so what the run sets (apply_process_settings) is put back when it ends; under torchrun the
    process group is left at the end (after waiting for the others when the run finished)."""
    tune_allocator()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    try:
        yield
        distributed.stop()
    except BaseException:
        distributed.stop(finished=False)
        raise
    finally:
        torch.set_num_threads(threads)
        if torch.are_deterministic_algorithms_enabled() != deterministic:  # the call imports torch._dynamo: ~2 s
            torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = benchmark


def apply_process_settings(cfg: TrainConfig | PretrainConfig) -> None:
    """Thread count (capped at the cores) and deterministic kernels, process-wide, as `cfg` asks."""
    cfg.threads = cap_threads(cfg.threads)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


# ---- device, precision, optimizer, memory ----------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (try --device auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: Apple's MPS backend is not available (try --device auto)")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    """fp32 or bf16 for --precision `name` on `device`.

    auto: bf16 autocast where the hardware computes bf16 natively and it measured faster than fp32, from what
    the hardware reports (`bf16_is_fast`); fp32 elsewhere. The default is fp32, PyTorch's, so that every
    published number reproduces bit for bit; auto is asked for."""
    if name == "fp32":
        return "fp32"
    if device.type == "mps":
        if name == "auto":
            return "fp32"
        raise UserError("--precision bf16: not on Apple's MPS backend; use --precision fp32")
    if name == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not compute bf16 natively; "
                        "use --precision fp32")
    return "bf16"


def bf16_is_fast(device: torch.device, cpuinfo: str | None = None) -> bool:
    """The rule behind --precision auto (measurements: docs/distributed.md, bench/precision.py).

    CUDA: compute capability 8.0 or newer (Ampere, Hopper and later have bf16 tensor cores).
    CPU: AMX-BF16 (Intel's matrix unit for bf16: 1.5-1.9x for the CNNs and the LSTM, 0.8-1.0x for the small
    ViT), or an AMD CPU with AVX512_BF16 (Zen 4 and later: bf16 autocast trained 1.12-1.57x faster than fp32).
    An Intel CPU with AVX512_BF16 but no AMX measured 0.70-0.80x and an AVX2 CPU 0.25x: fp32 there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    info = cpu(cpuinfo)
    return "amx_bf16" in info.flags or (info.vendor == "AuthenticAMD" and "avx512_bf16" in info.flags)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig | PretrainConfig) -> Optimizer:
    """SGD (Nesterov momentum 0.9, mnistlab/optim.py) or AdamW over the trainable parameters (a frozen encoder's
    are not the optimizer's)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    # No weight decay on biases and norm parameters: decaying them only fights BatchNorm.
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    if cfg.optimizer == "sgd":
        # written out rather than torch.optim.SGD, whose construction imports torch._dynamo (1.5-1.9 s)
        return NesterovSGD(groups, lr=cfg.lr, momentum=0.9)
    if cfg.optimizer == "muon":
        # the hidden conv filters (every conv weight but the first layer's) take orthogonalized steps at their own
        # learning rate; the rest (first conv, linear layers, biases, norms) is SGD as above
        # (the first conv found among all parameters: a fixed first layer, as whiten=true makes, is not trainable)
        first = next((p for p in model.parameters() if p.ndim == 4), None)
        convs = [p for p in decay if p.ndim == 4 and p is not first]
        if not convs:
            raise UserError(f"--optimizer muon orthogonalizes the steps of hidden conv layers, and {cfg.model} has "
                            f"none after its first; use --optimizer sgd or adamw")
        hidden = {id(p) for p in convs}
        groups = [dict(params=convs, weight_decay=0.0, orthogonalize=True, lr_ratio=cfg.muon_lr / cfg.lr),
                  dict(params=[p for p in decay if id(p) not in hidden], weight_decay=cfg.weight_decay),
                  dict(params=no_decay, weight_decay=0.0)]
        return Muon(groups, lr=cfg.lr, momentum=0.9)
    # fused: one kernel updates every parameter instead of a handful of ops per tensor (it matters for the ViT,
    # whose step is many small ops). CPU and CUDA have fused kernels. Resume keeps the optimizer state in each
    # weight's memory layout, which the fused kernels rely on (checkpoint.py).
    fused = True if all(p.device.type in ("cpu", "cuda") for p in model.parameters()) else None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=fused)


def is_out_of_memory(err: Exception) -> bool:
    """torch's OOM on CUDA, or the CPU allocator's message (a plain RuntimeError)."""
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or any(
        phrase in text for phrase in ("out of memory", "not enough memory", "can't allocate memory"))


def out_of_memory(batch: int, flag: str, device: torch.device, err: Exception) -> UserError:
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return UserError(f"a batch of {batch} images does not fit in memory on {device} ({first}); "
                     f"try a smaller {flag}")


@contextmanager
def memory_errors_as_user_error(batch: int, flag: str, device: torch.device) -> Iterator[None]:
    """Running out of memory inside the block becomes one line naming the flag to lower (other errors pass)."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise out_of_memory(batch, flag, device, e) from None


# ---- the run folder and its checkpoint -------------------------------------------------------------------

def run_folder(make: Callable[[], RunFolder]) -> RunFolder:
    """This process's view of the run folder: rank 0 makes it (creates or opens it, and holds its lock), the
    other ranks of a torchrun group follow the folder it made, without writing."""
    run = distributed.main_first(make, lambda: None)
    path = distributed.share_text(str(run.path) if run is not None else None)
    return run if run is not None else RunFolder.follow(path)


def save_run_checkpoint(run: RunFolder, model: torch.nn.Module, optimizer: Optimizer,
                        meta: dict[str, Any], state: TrainState) -> None:
    """An engine's checkpoint: weights, optimizer and TrainState; non-finite weights stop the run (exit 1)."""
    try:
        save_checkpoint(run.file(CHECKPOINT), model, dict(meta, **state.to_meta()), optimizer)
    except NonFiniteCheckpoint as e:
        raise TrainingDiverged(f"the weights became non-finite by step {state.step} ({e}); the last "
                               f"checkpoint (if any) is intact in {run.path}") from None


def restore_run_checkpoint(run: RunFolder, model: torch.nn.Module, optimizer: Optimizer,
                           read: Read) -> TrainState:
    """Weights, optimizer state and TrainState from a run's checkpoint, as read_checkpoint read it."""
    meta, _ = load_into(run.file(CHECKPOINT), model, optimizer, read=read)
    return TrainState.from_meta(meta)


# ---- resume ------------------------------------------------------------------------------------------------

def resume_config(run: RunFolder, given: RunConfig) -> tuple[RunConfig, Read | None]:
    """The run's config as its checkpoint records it, with `given`'s device and threads where set (where it
    runs, not what it computes), and the checkpoint as read; (config.json's config, None) for a run stopped
    before its first checkpoint. A config.json that disagrees with the checkpoint, or a run of another kind
    (training for pretrain, pre-training for train, a scratch-engine run), is refused in one line."""
    cls = type(given)
    ckpt = run.file(CHECKPOINT)
    if ckpt.is_file():
        read = read_checkpoint(ckpt)
        meta = read[1]
        _check_kind(run, meta, cls)
        saved = cls.from_dict(meta["config"], source=f"{ckpt} (its config)")
        if (meta["model"], meta["model_kwargs"]) != (saved.model, saved.model_kwargs):
            raise UserError(f"{ckpt}: the checkpoint names model {model_label(meta['model'], meta['model_kwargs'])} "
                            f"but its config says {model_label(saved.model, saved.model_kwargs)}; it was not written "
                            "by this run")
        if run.file(CONFIG).exists():
            _check_config_json(run, saved)
    elif run.file(CONFIG).is_file():
        read, saved = None, cls.load(run.file(CONFIG))
        if getattr(saved, "engine", "torch") == "scratch":
            raise UserError(f"--resume {run.path}: a scratch-engine run cannot be resumed (the torch engine's can)")
    else:
        raise UserError(f"--resume {run.path}: no checkpoint and no config.json there (not a run folder?)")
    # the device as named (config.json keeps "cuda", never torchrun's "cuda:<local rank>")
    saved.run_dir, saved.device = str(run.path), given.device or saved.device
    saved.threads = given.threads if given.threads is not None else saved.threads
    return saved, read


def _check_kind(run: RunFolder, meta: dict[str, Any], cls: type) -> None:
    """A pre-training checkpoint resumes with `pretrain`, a training one with `train`, a scratch one not at all."""
    pretraining = meta.get("kind") == PRETRAIN_KIND
    if cls is PretrainConfig and not pretraining:
        raise UserError(f"--resume {run.path}: a training run, not a pre-training run; continue it with "
                        f"`mnistlab train --resume {run.path}`")
    if cls is TrainConfig and pretraining:
        raise UserError(f"--resume {run.path}: a pre-training run; continue it with `mnistlab pretrain --resume "
                        f"{run.path}`")
    require_meta(meta, PRETRAIN_META if pretraining else RUN_META, run.file(CHECKPOINT))
    if meta.get("engine") == "scratch":
        raise UserError(f"--resume {run.path}: a scratch-engine run cannot be resumed (the torch engine's can)")


def _check_config_json(run: RunFolder, saved: TrainConfig | PretrainConfig) -> None:
    on_disk = type(saved).load(run.file(CONFIG)).to_dict()
    ignore = {"run_dir", "device", "threads"}  # where it runs, not what it computes
    differ = [k for k, v in saved.to_dict().items() if k not in ignore and on_disk[k] != v]
    if differ:
        k = differ[0]
        raise UserError(f"--resume {run.path}: config.json says {k}={on_disk[k]!r} but the checkpoint was "
                        f"trained with {k}={saved.to_dict()[k]!r} ({len(differ)} field(s) differ); resume "
                        f"continues the run as it was: restore config.json, or start a new run")


def finished_results(run: RunFolder, read: Read | None, total_steps: int, epochs: int) -> dict[str, Any] | None:
    """results.json's contents when the checkpoint is at the run's last step and results.json was written
    (there is nothing to resume); None otherwise."""
    if read is None or read[1]["step"] < total_steps or not run.file(RESULTS).exists():
        return None
    say(f"{run.path} finished all {epochs} epochs; nothing to resume (results in {run.file(RESULTS)})")
    try:
        return json.loads(run.file(RESULTS).read_text())
    except ValueError:
        raise UserError(f"{run.file(RESULTS)}: not valid JSON (the run had finished)") from None


def starting_state(run: RunFolder, model: torch.nn.Module, optimizer: Optimizer, read: Read | None,
                   steps_per_epoch: int, total_steps: int) -> TrainState:
    """Where a resumed run continues: its checkpoint's weights, optimizer and TrainState (metrics.jsonl cut to
    the checkpoint's epochs), or step 0 for a run killed before its first checkpoint (exact too)."""
    if read is None:
        run.start_metrics()
        note(f"{run.path} stopped before its first checkpoint; starting it again from step 0")
        return TrainState()
    state = restore_run_checkpoint(run, model, optimizer, read)
    run.keep_metrics(state.step // steps_per_epoch)
    note(f"resuming {run.path} at step {state.step}/{total_steps} (epoch {state.step // steps_per_epoch + 1})")
    return state
