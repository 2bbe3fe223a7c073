"""Self-describing checkpoints: one safetensors file holding the weights, the optimizer state and,
in its JSON metadata header, everything else (model name and kwargs, step, epoch, config).

No pickle anywhere: safetensors stores raw tensors and a JSON header, so loading a file from a
stranger cannot run code. Writes are atomic (files.py): a kill at any moment leaves the previous
complete checkpoint readable. The header records a sha256 of the tensor data (`payload_sha256`),
checked on every load: safetensors itself checks only the layout, so flipped bytes inside a tensor
would otherwise load as silently wrong weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mnistlab.errors import UserError
from mnistlab.files import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported for callers)
from mnistlab.optim import Optimizer

CHECKPOINT = "checkpoint.safetensors"
FORMAT_VERSION = 2  # 2: payload_sha256 in the header
MODEL_META = ("model", "model_kwargs", "in_chans", "num_classes")  # what rebuilding the model needs
Read = tuple[dict[str, torch.Tensor], dict[str, Any]]  # what read_checkpoint returns: (tensors, meta)
RUN_META = (*MODEL_META, "classes", "mean", "std", "config", "step")  # what evaluating or resuming a run needs
PRETRAIN_KIND = "pretrain"  # meta["kind"] of a `mnistlab pretrain` checkpoint: an encoder, no classifier


class NonFiniteCheckpoint(UserError):
    """Refusal to write a checkpoint holding NaN or Inf: the run diverged (exit status 1)."""

    exit_code = 1


def payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _optimizer_tensors(optimizer: Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (by 'optim/<param>/<key>') and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{pid}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}/{key}"] = value
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _restore_optimizer(optimizer: Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, pid, key = name.split("/", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split("/", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    # Safetensors stores tensors contiguous, but a channels-last conv weight's momentum or Adam moments
    # must share its memory layout: the fused optimizers walk param, grad and state as flat memory, so a
    # layout mismatch pairs the wrong elements and a resumed run drifts from the uninterrupted one.
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    meta: dict[str, Any],
    optimizer: Optimizer | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Atomically write model (+ optimizer, + extra tensors) and `meta` to one safetensors file."""
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = dict(meta)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
    for k, v in (extra or {}).items():
        tensors[f"extra/{k}"] = v.detach().cpu().contiguous()
    write_tensors(path, tensors, meta)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """The checkpoint file itself: refuses non-finite values, writes atomically."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteCheckpoint(f"refusing to write a checkpoint with non-finite values in {', '.join(bad[:5])}")
    meta = dict(meta, format_version=FORMAT_VERSION, payload_sha256=payload_sha256(tensors))
    atomic_write_bytes(path, st_save(tensors, metadata={"mnistlab": json.dumps(meta, allow_nan=False)}))


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read (tensors, meta) from a checkpoint file; a damaged file is a UserError."""
    try:
        data = Path(path).read_bytes()
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["mnistlab"])
    except FileNotFoundError:
        raise UserError(f"{path}: no checkpoint there") from None
    except (SafetensorError, KeyError, ValueError, OSError, TypeError) as e:
        raise UserError(f"{path}: not a readable mnistlab checkpoint ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: not a readable mnistlab checkpoint (its metadata is not an object)")
    recorded = meta.get("payload_sha256")
    if recorded is None and meta.get("format_version", 1) >= 2:
        raise UserError(f"{path}: the checkpoint's metadata lacks payload_sha256")
    if recorded is not None and recorded != payload_sha256(tensors):
        raise UserError(f"{path}: the tensor data does not match the checksum recorded when it was saved "
                        "(the file is damaged); refusing to load it")
    return tensors, meta


def require_meta(meta: dict[str, Any], keys: tuple[str, ...], path: Path) -> None:
    missing = [k for k in keys if k not in meta]
    if missing:
        raise UserError(f"{path}: the checkpoint's metadata lacks {', '.join(missing)}")


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """model.load_state_dict, with a checkpoint that does not fit the model as one clear line."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise UserError(f"{path}: the checkpoint does not fit the model it names ({detail[:300]})") from None


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix/`, with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}


def load_into(
    path: Path, model: torch.nn.Module, optimizer: Optimizer | None = None,
    read: Read | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load weights (and optimizer state) from `path` into existing objects; return (meta, extra).
    `read`: what read_checkpoint(path) returned already, so the file is not read and hashed twice."""
    tensors, meta = read if read is not None else read_checkpoint(path)
    load_state(model, prefixed(tensors, "model"), path)
    if optimizer is not None:
        try:
            _restore_optimizer(optimizer, tensors, meta["optimizer"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise UserError(f"{path}: its optimizer state does not fit this run ({e})") from None
    return meta, prefixed(tensors, "extra")


def load_model(path: Path, device: torch.device | str = "cpu",
               read: Read | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint file alone: its name and kwargs are in the metadata.
    `read`: what read_checkpoint(path) returned already, so the file is not read and hashed twice."""
    from mnistlab.models import create_model

    tensors, meta = read if read is not None else read_checkpoint(path)
    require_meta(meta, MODEL_META, path)
    try:
        model = create_model(meta["model"], in_chans=meta["in_chans"], num_classes=meta["num_classes"],
                             **meta["model_kwargs"])
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{path}: cannot rebuild the model it names ({e})") from None
    load_state(model, prefixed(tensors, "model"), path)
    # channels-last as in training (training.py): the same conv kernels, so eval repeats results.json's numbers
    return model.to(device).to(memory_format=torch.channels_last).eval(), meta
