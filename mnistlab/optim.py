"""SGD with Nesterov momentum, written out: what `torch.optim.SGD(params, lr, momentum=0.9, nesterov=True)`
computes, in a few lines, without torch.optim's start-up cost.

The update, for each parameter p with gradient g (weight decay wd, momentum mu, learning rate lr):

    g = g + wd * p              # L2 weight decay, taken as part of the gradient
    b = mu * b + g              # the momentum buffer: a running sum of past gradients (b starts at 0)
    p = p - lr * (g + mu * b)   # Nesterov: the step the buffer is about to take, plus this gradient

Why not torch.optim.SGD: every torch.optim optimizer imports torch._dynamo (torch.compile's machinery) when it
is built and again on its first step, to keep the compiler out of its code. That import takes 1.5-1.9 s on a
2-core CPU: a tenth of a `--recipe fast` run, for a compiler this loop does not use (docs/experiments.md).

The interface is torch.optim's where the training loop and the checkpoints use it: `param_groups` (the loop sets
each group's "lr" every step), `state` (each parameter's "momentum_buffer"), `zero_grad`, `step`, and
`state_dict`/`load_state_dict` in torch.optim.SGD's format, so a checkpoint written by either resumes with either.
AdamW stays torch.optim's (torch.optim.AdamW): its update has more to get right, and runs that use it are long.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# The group settings torch.optim.SGD keeps, with the values this class implements: a state_dict carries them, so
# either class can read the other's
FIXED = dict(dampening=0, nesterov=True, maximize=False, foreach=None, differentiable=False, fused=None)


class NesterovSGD:
    """SGD with Nesterov momentum over parameter groups: dicts with "params" and, optionally, their own "lr" and
    "weight_decay" (as torch.optim's groups)."""

    def __init__(self, params: Iterable[dict[str, Any]] | Iterable[torch.Tensor], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0) -> None:
        if not (lr >= 0 and 0 <= momentum < 1 and weight_decay >= 0):
            raise ValueError(f"lr ({lr}) and weight_decay ({weight_decay}) must be >= 0, "
                             f"momentum ({momentum}) in [0, 1)")
        items = list(params)
        groups = items if items and isinstance(items[0], dict) else [dict(params=items)]
        self.defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, **FIXED)
        self.param_groups: list[dict[str, Any]] = [{**self.defaults, **g, "params": list(g["params"])} for g in groups]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            # one call per operation over all of the group's tensors (torch._foreach_*), not one per tensor: the
            # small CNNs have a dozen tensors, and each call costs more than its arithmetic
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])  # g + wd * p (new tensors)
            # zeros in each weight's own memory layout (channels-last convs): mu * 0 + g is g exactly, as
            # torch.optim.SGD's first step, which copies g
            buffers = []
            for p in params:
                state = self.state.setdefault(p, {})
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(state["momentum_buffer"])
            momentum = group["momentum"]
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, grads)  # b = mu * b + g
            steps = torch._foreach_add(grads, buffers, alpha=momentum)  # g + mu * b
            torch._foreach_add_(params, steps, alpha=-group["lr"])  # p = p - lr * (g + mu * b)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's format: the state by parameter index (counted over the groups in order), the groups with
        their parameters as those indices."""
        index: dict[torch.Tensor, int] = {}
        groups = []
        for group in self.param_groups:
            ids = [index.setdefault(p, len(index)) for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state = {index[p]: dict(s) for p, s in self.state.items() if p in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        saved_sizes, my_sizes = [len(g["params"]) for g in groups], [len(g["params"]) for g in self.param_groups]
        if saved_sizes != my_sizes:
            raise ValueError(f"the saved optimizer state has other parameter groups than this optimizer's "
                             f"(sizes {saved_sizes} vs {my_sizes})")
        by_index: dict[int, torch.Tensor] = {}
        for saved, mine in zip(groups, self.param_groups, strict=True):
            by_index.update(zip(saved["params"], mine["params"], strict=True))
            # the saved hyperparameters (lr, momentum, weight decay), as torch.optim's load does; the fixed ones stay
            mine.update({k: v for k, v in saved.items() if k not in ("params", *FIXED)})
        self.state = {}
        for key, saved_state in state_dict["state"].items():
            p = by_index[int(key)]
            buffer = saved_state.get("momentum_buffer")
            if buffer is not None:
                if buffer.shape != p.shape:
                    raise ValueError(f"a saved momentum buffer of shape {tuple(buffer.shape)} for a parameter of "
                                     f"shape {tuple(p.shape)}")
                # in the weight's own dtype, device and memory layout
                self.state[p] = {"momentum_buffer": torch.empty_like(p).copy_(buffer)}


Optimizer = torch.optim.Optimizer | NesterovSGD  # what make_optimizer returns: the loop and checkpoints take either
