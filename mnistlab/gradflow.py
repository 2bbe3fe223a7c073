"""Gradient flow: how much gradient reaches each layer, and each time step of a recurrent model.

For an RNN, dLoss/dh_t = dLoss/dh_T * prod_{s>t} dh_s/dh_{s-1}: a product of T - t Jacobians. When
their norms sit below 1 (tanh saturates, small recurrent weights) the product shrinks
geometrically with the distance to the end, which is the vanishing gradient of the notes; the
LSTM's additive cell path c_t = f * c_{t-1} + ... keeps a route whose factor is the forget gate
itself, so early steps keep far more gradient. These records let a user see it happen.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mnistlab.files import append_line, atomic_write_text, to_json

GRAD_FLOW_FILE = "grad_flow.jsonl"


def layer_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of each parameter's current .grad (call after backward, before the optimizer step)."""
    return {name: p.grad.norm().item() for name, p in model.named_parameters() if p.grad is not None}


def time_step_grad_norms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float] | None:
    """||dLoss/dh_t|| for t = 1..T (Frobenius norm over the batch), or None for non-recurrent models.

    Computed in float64 on a copy of the model: over 784 steps the early gradients reach 1e-160,
    which float32 (smallest normal 1e-38) would round to an uninformative zero.
    """
    if not hasattr(model, "unrolled") or getattr(getattr(model, "rnn", None), "bidirectional", True):
        return None
    model64 = copy.deepcopy(model).cpu().double()  # on the CPU: MPS has no float64
    logits, hs = model64.unrolled(x.cpu().double())
    grads = torch.autograd.grad(F.cross_entropy(logits, y.cpu()), hs)
    return [scaled_norm(g) for g in grads]


def scaled_norm(g: torch.Tensor) -> float:
    """||g||, computed as max|g| * ||g / max|g|||: the plain sum of squares underflows to 0 for
    entries below 1e-154 even in float64, which would cut the vanishing curve off early."""
    peak = g.abs().max()
    return 0.0 if peak == 0 else (peak * (g / peak).norm()).item()


def record(run_dir: Path, step: int, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Append one grad-flow record for `step` (the model's .grad must hold this step's gradients)."""
    entry: dict[str, Any] = dict(step=step, layer_grad_norm=layer_grad_norms(model),
                                 time_grad_norm=time_step_grad_norms(model, x, y))
    append_line(Path(run_dir) / GRAD_FLOW_FILE, to_json(_finite_or_none(entry), indent=None))


def _finite_or_none(obj: Any) -> Any:
    """An exploding gradient's inf or nan is recorded as null: strict JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def keep_before(run_dir: Path, step: int) -> None:
    """Start grad_flow.jsonl afresh, keeping only the records before `step` (those a resume won't redo)."""
    path = Path(run_dir) / GRAD_FLOW_FILE
    kept = [r for r in read(run_dir) if r["step"] < step] if step and path.exists() else []
    atomic_write_text(path, "".join(to_json(r, indent=None) + "\n" for r in kept))


def read(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / GRAD_FLOW_FILE
    if not path.is_file():
        from mnistlab.errors import UserError

        raise UserError(f"{run_dir}: no {GRAD_FLOW_FILE}; train with --grad-flow to record one")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
