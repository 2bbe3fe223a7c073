"""SGD with momentum and Adam/AdamW for the scratch engine, step for step as torch.optim computes them.

Parameters come as a list of Tensors or, as in torch, a list of groups
`{"params": [...], "weight_decay": ...}`; a group's `lr` can be changed between steps (schedules).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mnistlab.scratch.engine import Tensor


class Optimizer:
    def __init__(self, params: list[Tensor] | list[dict[str, Any]], defaults: dict[str, Any]):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.state: dict[int, dict[str, Any]] = {}  # id(param) -> its buffers

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, group, self.state.setdefault(id(p), {}))

    def _update(self, p: Tensor, g: np.ndarray, group: dict[str, Any], state: dict[str, Any]) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """v <- mu v + (g + wd p); p <- p - lr (g + mu v) with Nesterov, p - lr v without (torch's form)."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    def _update(self, p, g, group, state):
        if group["weight_decay"]:
            g = g + group["weight_decay"] * p.data  # L2 penalty's gradient
        mu = group["momentum"]
        if mu:
            buf = state.get("momentum")
            buf = g.copy() if buf is None else mu * buf + g  # the first step starts the buffer at g
            state["momentum"] = buf
            g = g + mu * buf if group["nesterov"] else buf
        p.data -= group["lr"] * g


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015); decoupled=True is AdamW (Loshchilov & Hutter 2019): decay weights, not gradients."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=decoupled))

    def _update(self, p, g, group, state):
        b1, b2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        if wd and group["decoupled"]:
            p.data *= 1 - lr * wd
        elif wd:
            g = g + wd * p.data
        t = state["t"] = state.get("t", 0) + 1
        m = state["m"] = b1 * state.get("m", 0.0) + (1 - b1) * g  # first moment: a running mean of g
        v = state["v"] = b2 * state.get("v", 0.0) + (1 - b2) * g * g  # second moment: of g^2
        # bias correction undoes the zero start of m and v
        denom = np.sqrt(v) / np.sqrt(1 - b2**t) + group["eps"]
        p.data -= (lr / (1 - b1**t)) * m / denom


class AdamW(Adam):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled=True)
