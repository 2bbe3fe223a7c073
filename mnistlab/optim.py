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

`Muon` (below) is the same SGD with one change for the hidden conv filters: their step is orthogonalized first.
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
            self._step_group(group)

    def _step_group(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        # one call per operation over all of the group's tensors (torch._foreach_*), not one per tensor: the
        # small CNNs have a dozen tensors, and each call costs more than its arithmetic
        grads = [p.grad for p in params]
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])  # g + wd * p (new tensors)
        buffers = [self._momentum_buffer(p) for p in params]
        momentum = group["momentum"]
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)  # b = mu * b + g
        steps = torch._foreach_add(grads, buffers, alpha=momentum)  # g + mu * b
        torch._foreach_add_(params, steps, alpha=-group["lr"])  # p = p - lr * (g + mu * b)

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        """p's momentum buffer, made at its first step as zeros in the weight's own memory layout (channels-last
        convs): mu * 0 + g is g exactly, as torch.optim.SGD's first step, which copies g."""
        state = self.state.setdefault(p, {})
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]

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


# Newton-Schulz coefficients that push every singular value of a matrix scaled to norm <= 1 towards 1 in five
# iterations (Keller Jordan's Muon; they trade exactness, singular values end in about [0.7, 1.2], for speed)
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest (semi-)orthogonal matrix to g (rows, cols), approximately: U V^T of g's SVD U S V^T, by an odd
    polynomial iteration that needs only matrix products (an SVD per step would cost more than the step)."""
    a, b, c = NEWTON_SCHULZ
    x = g / (g.norm() + 1e-7)  # all singular values <= 1, where the polynomial converges
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T  # work on the smaller Gram matrix x @ x.T
    for _ in range(steps):
        gram = x @ x.T  # (r, r), r = min(rows, cols)
        # x -> a x + b (x x^T) x + c (x x^T)^2 x: each singular value s -> a s + b s^3 + c s^5
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Muon(NesterovSGD):
    """Nesterov SGD, except for groups marked `orthogonalize=True` (the hidden conv filters): there the momentum
    step of each weight, seen as a matrix (out channels, in channels x kernel height x kernel width), is replaced
    by its nearest orthogonal matrix before it is taken (Muon: "MomentUm Orthogonalized by Newton-Schulz").

    Why: a plain gradient step is dominated by a few directions (its largest singular values), so the filters
    learn along those and barely along the rest. The orthogonalized step has every singular value near 1: the
    same step along each direction the gradient has found, which trains a network in fewer steps (airbench, on
    CIFAR-10). Its size no longer follows the gradient's: those groups take their own learning rate, `lr` times
    the group's `lr_ratio`, scaled by sqrt(rows / cols) for tall matrices as Muon does, and no weight decay
    (a BatchNorm follows each of these convs, so their scale does not matter to the network).
    The first conv (one input channel: a 9-column matrix) and the linear layers stay with SGD: the first has
    too few columns to orthogonalize, and the hidden linear layer's matrix is large enough that the iteration
    would cost a sizeable part of a step on a CPU."""

    def _step_group(self, group: dict[str, Any]) -> None:
        if not group.get("orthogonalize"):
            super()._step_group(group)
            return
        momentum, lr = group["momentum"], group["lr"] * group.get("lr_ratio", 1.0)
        for p in group["params"]:
            if p.grad is None:
                continue
            buffer = self._momentum_buffer(p)
            buffer.mul_(momentum).add_(p.grad)  # b = mu * b + g
            step = p.grad.add(buffer, alpha=momentum)  # Nesterov: g + mu * b
            matrix = step.reshape(p.shape[0], -1).float()  # (out, in * kh * kw), in logical order
            rows, cols = matrix.shape
            update = orthogonalize(matrix) * max(1.0, rows / cols) ** 0.5
            p.add_(update.reshape(p.shape).to(p.dtype), alpha=-lr)


Optimizer = torch.optim.Optimizer | NesterovSGD  # what make_optimizer returns: the loop and checkpoints take either
