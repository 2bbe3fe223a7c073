"""Gradient descent: find the lowest point of the loss landscape; the learning rate is the key setting.

On a quadratic bowl f(x) = 1/2 x^T H x everything about gradient descent can be computed exactly.
Write x in the eigenvectors of H (curvatures lambda_min .. L): the gradient is H x, so one step
x <- x - eta H x multiplies the part of x along eigenvector i by (1 - eta lambda_i). Each part
shrinks on its own, as (1 - eta lambda_i)^t. From that one line:

- eta > 2/L makes |1 - eta L| > 1: the steepest direction grows every step and the run diverges;
  just below 2/L it converges (zigzagging across the valley, since the factor is negative);
- the best single eta, 2/(L + lambda_min), leaves the slowest part shrinking by (kappa - 1)/(kappa + 1)
  per step, kappa = L/lambda_min the condition number: a long thin valley (kappa 100) takes hundreds
  of steps;
- momentum (the heavy ball, Polyak 1964) remembers the last step and brings that rate down to
  (sqrt(kappa) - 1)/(sqrt(kappa) + 1): about sqrt(kappa) times fewer steps;
- Adam (Kingma & Ba 2015) scales each coordinate by its own running gradient size. It needs no
  eigenvalues; on this bowl it sits between the two. Its scaling is per coordinate, so it can help
  more when the valley's axes are the coordinate axes (here: much at a small lr, hardly at its best
  one). At a fixed lr it does not settle: once the gradients are tiny its step grows back.

Then the same ideas on a real network, the zoo's MLP on `digits`: a learning-rate range test
(Smith 2017) finds the learning rate from a single short run, compared with the one the project
trains the MLP with; and a 1-D slice of the loss landscape along the line from the initial to the
trained weights (Goodfellow et al. 2015) shows the start high and the end at the bottom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mnistlab.labs import Check

if TYPE_CHECKING:
    import torch

Vector = np.ndarray | Sequence[float]  # a point x, or a list of curvatures

TITLE = "gradient descent on a quadratic: diverges above eta = 2/L; rates; momentum and Adam; an LR range test"

# the 2-D bowl of the figure: curvatures 1 and 10, its valley turned by 30 degrees
BOWL_EIGENVALUES, BOWL_ANGLE, BOWL_START = (1.0, 10.0), 30.0, (-4.0, 2.5)
# the ill-conditioned problem: 20 dimensions, curvatures spread evenly (in log) from 1 to 100, kappa = 100
VALLEY_EIGENVALUES = tuple(np.geomspace(1.0, 100.0, 20))
TOL = 1e-6  # "converged": the distance to the minimum has shrunk to a millionth of where it started
ADAM_LRS = tuple(np.geomspace(1e-3, 1.0, 7))


# ---- a quadratic bowl ---------------------------------------------------------------------------------


def quadratic(eigenvalues: Vector, seed: int | None = 0, angle: float | None = None) -> np.ndarray:
    """H = Q diag(eigenvalues) Q^T: a bowl with these curvatures, its axes turned by a random rotation Q.

    seed None keeps the axes on the coordinate axes (H diagonal); `angle` (degrees, 2-D only) turns
    them by that angle instead of at random.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    d = len(lam)
    if angle is not None:
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        q = np.array([[c, -s], [s, c]])
    elif seed is None:
        q = np.eye(d)
    else:
        q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
        q = q * np.sign(np.diag(r))  # the sign convention that makes Q a uniformly random rotation
    return (q * lam) @ q.T  # (d, d), symmetric


def quadratic_loss(H: np.ndarray, x: np.ndarray) -> np.ndarray:
    """f(x) = 1/2 x^T H x for each point x of (..., d): the height of the bowl; its minimum is 0 at x = 0."""
    return 0.5 * np.einsum("...i,ij,...j->...", x, H, x)


def gd_path(H: np.ndarray, x0: Vector, eta: float, steps: int) -> np.ndarray:
    """Plain gradient descent x <- x - eta * grad f(x), grad f(x) = H x: every point, (steps + 1, d)."""
    xs = [np.asarray(x0, dtype=np.float64)]
    for _ in range(steps):
        xs.append(xs[-1] - eta * (H @ xs[-1]))
    return np.stack(xs)


def momentum_path(H: np.ndarray, x0: Vector, eta: float, beta: float, steps: int) -> np.ndarray:
    """Heavy-ball momentum: x <- x - eta grad f(x) + beta (x - x_previous); every point, (steps + 1, d).

    The last step, carried on with weight beta, builds up speed along the valley floor, where the
    gradient is small but keeps its direction, and cancels out across it, where it flips every step.
    """
    xs = [np.asarray(x0, dtype=np.float64)]
    prev = xs[0]
    for _ in range(steps):
        x = xs[-1]
        xs.append(x - eta * (H @ x) + beta * (x - prev))
        prev = x
    return np.stack(xs)


def adam_path(H: np.ndarray, x0: Vector, lr: float, steps: int, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8) -> np.ndarray:
    """Adam, as torch.optim.Adam computes it; every point, (steps + 1, d).

    m is a running mean of the gradient, v of its square, coordinate by coordinate; the step is
    lr * m / sqrt(v): about lr in every coordinate, whatever the curvature there. That is the
    per-coordinate scaling: it evens out a valley that lies along the coordinate axes.
    """
    b1, b2 = betas
    x = np.asarray(x0, dtype=np.float64)
    m, v, xs = np.zeros_like(x), np.zeros_like(x), [x]
    for t in range(1, steps + 1):
        g = H @ x
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x = x - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)  # bias-corrected: m, v start at 0
        xs.append(x)
    return np.stack(xs)


def gd_best(H: np.ndarray) -> tuple[float, float]:
    """The single step size that converges fastest, 2/(L + lambda_min), and its rate (kappa-1)/(kappa+1)."""
    lam = np.linalg.eigvalsh(H)
    mu, big = lam[0], lam[-1]
    kappa = big / mu
    return 2 / (big + mu), (kappa - 1) / (kappa + 1)


def momentum_best(H: np.ndarray) -> tuple[float, float, float]:
    """Heavy ball's best eta = 4/(sqrt L + sqrt mu)^2, beta = r^2, and its rate r = (sqrt k - 1)/(sqrt k + 1)."""
    lam = np.linalg.eigvalsh(H)
    mu, big = lam[0], lam[-1]
    r = (math.sqrt(big / mu) - 1) / (math.sqrt(big / mu) + 1)
    return 4 / (math.sqrt(big) + math.sqrt(mu)) ** 2, r * r, r


def distances(path: np.ndarray) -> np.ndarray:
    """||x_t|| / ||x_0||: how far from the minimum (x = 0) each point is, relative to the start."""
    n = np.linalg.norm(path, axis=-1)
    return n / n[0]


def steps_to(path: np.ndarray, tol: float = TOL) -> int | None:
    """The first step at which ||x_t|| <= tol ||x_0||, or None if the path never gets there."""
    hit = np.flatnonzero(distances(path) <= tol)
    return int(hit[0]) if len(hit) else None


def measured_rate(path: np.ndarray) -> float:
    """The per-step contraction over the second half of a path: (||x_T|| / ||x_T/2||)^(1 / (T/2))."""
    n, half = distances(path), (len(path) - 1) // 2
    return float((n[-1] / n[half]) ** (1 / (len(path) - 1 - half)))


def eigen_contractions(H: np.ndarray, path: np.ndarray, floor: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Each eigenvalue of H and the factor by which a path's part along its eigenvector shrank per step.

    The part along eigenvector i is z_i(t); the factor is (|z_i(t)| / |z_i(0)|)^(1/t), signed like
    z_i(1)/z_i(0), taken at the last step before it falls below floor * ||x_0|| (below that,
    rounding errors of the other parts are as large as it is).
    """
    lam, vecs = np.linalg.eigh(H)
    z = np.abs(path @ vecs)  # (T + 1, d): the size of each part at each step
    above = z > floor * np.linalg.norm(path[0])
    last = np.where(above.all(0), len(path) - 1, above.argmin(0) - 1)  # the last step of the leading run above
    t = np.maximum(last, 1)
    factor = (z[t, np.arange(len(lam))] / z[0]) ** (1 / t)
    sign = np.sign((path[1] @ vecs) / (path[0] @ vecs))
    return lam, sign * factor


def stability_check(H: np.ndarray, x0: Vector, steps: int = 300) -> Check:
    """Run gradient descent at 0.95 * 2/L and at 1.05 * 2/L: the first must converge, the second diverge."""
    big = np.linalg.eigvalsh(H)[-1]
    below, above = gd_path(H, x0, 0.95 * 2 / big, steps), gd_path(H, x0, 1.05 * 2 / big, steps)
    d_below, d_above = distances(below)[-1], distances(above)[-1]
    return Check("gradient descent converges just below eta = 2/L and diverges just above it",
                 bool(d_below < TOL and d_above > 1 / TOL),
                 f"L = {big:g}, 2/L = {2 / big:.4f}; after {steps} steps ||x||/||x0|| = {d_below:.1e} at "
                 f"eta = 0.95 * 2/L (factor 1 - eta L = {1 - 1.9:+.2f}), {d_above:.1e} at 1.05 * 2/L "
                 f"(factor {1 - 2.1:+.2f})")


# ---- a real network -------------------------------------------------------------------------------------


@dataclass
class RangeTest:
    """A learning-rate range test: the rate of each step, the batch loss, and that loss smoothed."""

    lrs: np.ndarray  # (steps,) growing by the same factor every step
    losses: np.ndarray  # (steps,) the loss of each step's batch, before the step
    smooth: np.ndarray  # (steps,) centred moving average of losses: no lag behind the rate it is drawn at

    @property
    def lowest(self) -> float:
        """The rate at which the smoothed loss is lowest."""
        return float(self.lrs[int(np.argmin(self.smooth))])

    @property
    def steepest(self) -> float:
        """The rate at which the smoothed loss falls fastest per factor of learning rate (before its lowest)."""
        low = int(np.argmin(self.smooth))
        slope = np.gradient(self.smooth, np.log(self.lrs))
        return float(self.lrs[int(np.argmin(slope[: low + 1]))])

    @property
    def divergence(self) -> float | None:
        """The first rate past the lowest loss at which the smoothed loss is back above its start: the
        steps now undo more than they learn. None if the test stopped before."""
        low = int(np.argmin(self.smooth))
        above = np.flatnonzero(self.smooth[low:] > self.smooth[0])
        return float(self.lrs[low + above[0]]) if len(above) else None

    @property
    def suggestion(self) -> float | None:
        """A tenth of the divergence point: the rule this lab follows.

        Why this rule: it is tied to the edge of stability, what the quadratic shows decides everything
        (converge below 2/L, blow up above), with an explicit margin: a rate just under the edge zigzags,
        and a network's curvature changes as it trains. The project's rates are the peak of a one-cycle
        schedule, and a peak is what this rule estimates (Smith's advice: the largest rate at which the
        loss still falls, lowered). The steepest fall is where the sweep made the fastest progress, a
        rate that trains well held constant but not a peak. Over seeds 0-4 the steepest point was the
        steadier of the two (6.0e-4 to 8.2e-4, against 1.9e-2 to 3.9e-2 for the blow-up point).
        """
        return None if self.divergence is None else self.divergence / 10


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                lrs: Sequence[float], batch_size: int, seed: int = 0, stop_factor: float = math.inf) -> np.ndarray:
    """One optimizer step per entry of `lrs`, at that learning rate, on shuffled batches; the batch losses.

    The batches follow the training loop's order (data.batches.epoch_permutation: an epoch's order is
    a function of seed and epoch). Stops early when a loss is above stop_factor times the first one,
    or not finite: the run has blown up.
    """
    import torch.nn.functional as F

    from mnistlab.data.batches import epoch_permutation

    per_epoch = math.ceil(len(y) / batch_size)
    losses: list[float] = []
    model.train()
    for step, lr in enumerate(lrs):
        epoch, i = divmod(step, per_epoch)
        if i == 0:
            order = epoch_permutation(len(y), seed, epoch)
        idx = order[i * batch_size : (i + 1) * batch_size]
        for group in optimizer.param_groups:
            group["lr"] = float(lr)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if not losses[-1] <= stop_factor * losses[0]:  # also true for NaN
            break
    return np.array(losses)


def centred_mean(values: np.ndarray, half: int = 4) -> np.ndarray:
    """The mean of each value and its `half` neighbours either side (fewer at the ends)."""
    c = np.concatenate([[0.0], np.cumsum(values)])
    lo = np.clip(np.arange(len(values)) - half, 0, None)
    hi = np.clip(np.arange(len(values)) + half + 1, None, len(values))
    return (c[hi] - c[lo]) / (hi - lo)


def lr_range_test(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  lr_min: float = 1e-5, lr_max: float = 1.0, steps: int = 150,
                  batch_size: int = 64, seed: int = 0) -> RangeTest:
    """Train once while the learning rate grows exponentially from lr_min to lr_max; the loss at each rate.

    While the rate is too small the loss hardly moves; then it falls, fastest somewhere in the
    middle; past some rate the steps overshoot (the quadratic's eta > 2/L) and the loss climbs back
    and explodes. The test stops there: a batch loss 4 times the first one. One short run replaces a
    grid of trainings. The model and optimizer are changed: start each test from fresh ones.
    """
    lrs = lr_min * (lr_max / lr_min) ** (np.arange(steps) / (steps - 1))
    losses = train_steps(model, optimizer, x, y, lrs, batch_size, seed, stop_factor=4.0)
    losses = np.where(np.isfinite(losses), losses, 4 * losses[0])  # an overflow counts as blown up
    return RangeTest(lrs[: len(losses)], losses, centred_mean(losses))


def landscape_slice(model: torch.nn.Module, start: torch.Tensor, end: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    alphas: Sequence[float]) -> np.ndarray:
    """The loss at weights start + a (end - start) for each a of `alphas` (start, end: flat weight vectors).

    a = 0 is the start, a = 1 the end; a < 0 and a > 1 look behind the start and beyond the end along the
    same line. The model's weights are put back to `end` afterwards.
    """
    import torch
    import torch.nn.functional as F
    from torch.nn.utils import vector_to_parameters

    out = []
    model.eval()
    with torch.no_grad():
        for a in alphas:
            vector_to_parameters(start + float(a) * (end - start), model.parameters())
            out.append(F.cross_entropy(model(x), y).item())
        vector_to_parameters(end, model.parameters())
    return np.array(out)


def digits_tensors() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The digits set as the training loop sees it: normalised (N, 1, 28, 28) images and labels, train and test."""
    from mnistlab.data.batches import to_input
    from mnistlab.data.dataset import load_dataset

    ds = load_dataset("digits")
    return ((to_input(ds.train_images, ds.mean, ds.std), ds.train_labels),
            (to_input(ds.test_images, ds.mean, ds.std), ds.test_labels))


# ---- the lab ------------------------------------------------------------------------------------------


def mlp_on_digits(seed: int = 0) -> dict[str, Any]:
    """The real-network half of the lab: a range test, then a run with the project's settings and its slice.

    The settings are those `mnistlab train --dataset digits --model mlp` resolves to (config.py:
    MODEL_DEFAULTS["mlp"] and DATASET_DEFAULTS["digits"]: AdamW, peak lr 2e-3 on a one-cycle
    schedule, batch 64, 15 epochs), the optimizer built by the same function (lifecycle.make_optimizer).
    """
    import torch
    from torch.nn.utils import parameters_to_vector

    from mnistlab.config import resolve_config
    from mnistlab.lifecycle import make_optimizer
    from mnistlab.loop import get_lr
    from mnistlab.models import create_model

    cfg = resolve_config({"model": "mlp", "dataset": "digits", "seed": seed})
    rng_state, threads = torch.get_rng_state(), torch.get_num_threads()
    # a batch of 64 through this MLP is too small a job to split between threads: one is faster, and steady
    torch.set_num_threads(1)
    try:
        (x, y), (x_test, y_test) = digits_tensors()
        torch.manual_seed(seed)
        model = create_model("mlp")
        test = lr_range_test(model, make_optimizer(model, cfg), x, y, batch_size=cfg.batch_size, seed=seed)
        torch.manual_seed(seed)
        model = create_model("mlp")
        start = parameters_to_vector(model.parameters()).detach().clone()
        total = math.ceil(len(y) / cfg.batch_size) * cfg.epochs
        losses = train_steps(model, make_optimizer(model, cfg), x, y, [get_lr(s, total, cfg) for s in range(total)],
                             cfg.batch_size, seed)
        end = parameters_to_vector(model.parameters()).detach().clone()
        alphas = np.linspace(-0.5, 1.5, 41)
        slice_train = landscape_slice(model, start, end, x, y, alphas)
        slice_test = landscape_slice(model, start, end, x_test, y_test, alphas)
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng_state)
    return dict(cfg=cfg, test=test, losses=losses, alphas=alphas, slice_train=slice_train, slice_test=slice_test,
                accuracy=accuracy)


def run(out: Path | None = None) -> list[Check]:
    bowl = quadratic(BOWL_EIGENVALUES, angle=BOWL_ANGLE)
    checks = [stability_check(bowl, BOWL_START)]

    # the kappa = 100 valley, and the same valley turned onto the coordinate axes (for Adam)
    valley = quadratic(VALLEY_EIGENVALUES, seed=0)
    lam, vecs = np.linalg.eigh(valley)
    mu, big = lam[0], lam[-1]
    kappa = big / mu
    x0 = np.random.default_rng(1).standard_normal(len(lam))

    eta_gd, r_gd = gd_best(valley)
    factors = {}
    for name, eta in (("0.5/L", 0.5 / big), ("1/L", 1 / big), ("2/(L+mu)", eta_gd), ("1.9/L", 1.9 / big)):
        lam_i, measured = eigen_contractions(valley, gd_path(valley, x0, eta, 400))
        factors[name] = (eta * lam_i, measured)
    err = max(float(np.abs(m - (1 - el)).max()) for el, m in factors.values())
    flips = sum(int((m < 0).sum()) for _, m in factors.values())
    checks.append(Check("along each eigenvector the error shrinks by (1 - eta lambda) per step", err < 1e-7,
                        f"{len(lam)} directions x {len(factors)} step sizes, eta lambda from "
                        f"{min(el.min() for el, _ in factors.values()):.3f} to "
                        f"{max(el.max() for el, _ in factors.values()):.2f}: max |measured - theory| {err:.1e}; "
                        f"{flips} of the factors negative (eta lambda > 1: each step overshoots to the other side)"))

    eta_hb, beta, r_hb = momentum_best(valley)
    paths = {"gradient descent": gd_path(valley, x0, eta_gd, 1000),
             "heavy ball": momentum_path(valley, x0, eta_hb, beta, 300)}
    n_gd, n_hb = steps_to(paths["gradient descent"]), steps_to(paths["heavy ball"])
    m_gd, m_hb = measured_rate(paths["gradient descent"]), measured_rate(paths["heavy ball"])
    p_gd, p_hb = math.log(TOL) / math.log(r_gd), math.log(TOL) / math.log(r_hb)
    ok = (n_gd is not None and n_hb is not None and abs(m_gd / r_gd - 1) < 0.01 and abs(m_hb / r_hb - 1) < 0.01
          and n_gd / n_hb > (p_gd / p_hb) / 2)
    checks.append(Check(f"momentum shrinks the error by (sqrt k - 1)/(sqrt k + 1) per step, GD by (k - 1)/(k + 1) "
                        f"(k = {kappa:g})", ok,
                        f"per step: heavy ball (eta {eta_hb:.4f}, beta {beta:.3f}) {m_hb:.4f} measured vs "
                        f"{r_hb:.4f}, GD (eta {eta_gd:.4f}) {m_gd:.4f} vs {r_gd:.4f}; steps to {TOL:.0e}: heavy "
                        f"ball {n_hb} (rate says {p_hb:.0f}), GD {n_gd} (rate says at most {p_gd:.0f}): "
                        f"{n_gd / n_hb:.1f}x fewer (rates say {p_gd / p_hb:.1f}x, about sqrt k)"))

    aligned, x0_aligned = np.diag(lam), vecs.T @ x0  # the same valley and start, its axes on the coordinate axes
    adam = {lr: (adam_path(valley, x0, lr, 1000), adam_path(aligned, x0_aligned, lr, 1000)) for lr in ADAM_LRS}
    adam_steps = {lr: (steps_to(a), steps_to(b)) for lr, (a, b) in adam.items()}
    best = min(ADAM_LRS, key=lambda lr: adam_steps[lr][0] or math.inf)
    best_aligned = min(ADAM_LRS, key=lambda lr: adam_steps[lr][1] or math.inf)
    paths[f"Adam, lr {best:.2g}"] = adam[best][0]
    paths[f"Adam, lr {best_aligned:.2g}, valley on the axes"] = adam[best_aligned][1]
    small = min(lr for lr in ADAM_LRS if None not in adam_steps[lr])
    n_adam = adam_steps[best][0] or 0
    after = distances(adam[best][0])[n_adam:]
    bounce = int(np.argmax(after)) + n_adam
    checks.append(Check("Adam converges on the same valley without being told its curvatures",
                        adam_steps[best][0] is not None,
                        f"best lr of {len(ADAM_LRS)} from {ADAM_LRS[0]:g} to {ADAM_LRS[-1]:g}: {best:.2g}, "
                        f"{adam_steps[best][0]} steps to {TOL:.0e} (GD {n_gd}, heavy ball {n_hb}); with the valley "
                        f"on the coordinate axes {adam_steps[best_aligned][1]} (lr {best_aligned:.2g}); at lr "
                        f"{small:.2g}: {adam_steps[small][0]} turned, {adam_steps[small][1]} on the axes; after "
                        f"reaching {TOL:.0e} at lr {best:.2g} it bounces back up to {after.max():.0e} (step {bounce}): "
                        f"a fixed lr does not settle"))

    mlp = mlp_on_digits()
    test, cfg = mlp["test"], mlp["cfg"]
    found = test.divergence is not None and test.smooth.min() < 0.5 * test.smooth[0]
    checks.append(Check("the range test finds where the loss falls fastest, is lowest, and blows up", found,
                        f"MLP on digits, AdamW, lr from {test.lrs[0]:.0e} x{test.lrs[1] / test.lrs[0]:.3f} per step, "
                        f"{len(test.lrs)} steps: loss {test.smooth[0]:.2f} -> {test.smooth.min():.2f} (smoothed); "
                        f"falls fastest at {test.steepest:.1e}, lowest at {test.lowest:.1e}, back above its start "
                        f"at {test.divergence or math.nan:.1e}"))
    ratio = (test.suggestion or math.nan) / cfg.lr
    checks.append(Check("the range test's learning rate agrees with the project's for this model (within 3x)",
                        1 / 3 < ratio < 3,
                        f"suggestion = a tenth of where the loss blows up: {test.suggestion or math.nan:.1e}; "
                        f"the MLP's default (config.MODEL_DEFAULTS, {cfg.optimizer}, the peak of a {cfg.schedule} "
                        f"schedule): {cfg.lr:g}; ratio {ratio:.2f}; the steepest-descent rule would say "
                        f"{test.steepest:.1e}"))

    a, s_train, s_test = mlp["alphas"], mlp["slice_train"], mlp["slice_test"]
    i0, i1 = int(np.argmin(np.abs(a))), int(np.argmin(np.abs(a - 1)))
    low = int(np.argmin(s_train))
    depth = (s_train[i1] - s_train[low]) / (s_train[i0] - s_train[low])
    falls = bool(np.all(np.diff(s_train[i0 : i1 + 1]) < 0))
    checks.append(Check("along the line from start to end of training the start is high and the end at the bottom",
                        s_train[i0] > 10 * s_train[i1] and depth < 0.02,
                        f"train loss {s_train[i0]:.3f} at the start (a = 0), {s_train[i1]:.4f} at the end (a = 1), "
                        f"lowest {s_train[low]:.4f} at a = {a[low]:.2f}: the end is {depth:.1%} of the descent "
                        f"above the lowest; falls all the way from a = 0 to 1: {'yes' if falls else 'no'}; test "
                        f"loss lowest at a = {a[int(np.argmin(s_test))]:.2f}; test accuracy {mlp['accuracy']:.1%}"))
    if out is not None:
        draw(out, bowl, lam, factors, paths, (r_gd, r_hb), mlp)
    return checks


def draw(out: Path, bowl: np.ndarray, lam: np.ndarray, factors: dict[str, tuple[np.ndarray, np.ndarray]],
         paths: dict[str, np.ndarray], rates: tuple[float, float], mlp: dict[str, Any]) -> None:
    from mnistlab.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(18, 10.5))
    big = np.linalg.eigvalsh(bowl)[-1]
    mu = np.linalg.eigvalsh(bowl)[0]
    etas = {f"eta {0.3 / big:.2f} = 0.3/L": 0.3 / big, f"eta {1 / big:.2f} = 1/L": 1 / big,
            f"eta {2 / (big + mu):.2f} = 2/(L+mu)": 2 / (big + mu),
            f"eta {1.9 / big:.2f} = 0.95 x 2/L": 1.9 / big, f"eta {2.1 / big:.2f} = 1.05 x 2/L": 2.1 / big}
    colors = dict(zip(etas, ["tab:green", "tab:blue", "tab:purple", "tab:orange", "tab:red"], strict=True))

    ax = axes[0, 0]
    g = np.linspace(-6, 6, 241)
    gx, gy = np.meshgrid(g, g)
    ax.contour(gx, gy, quadratic_loss(bowl, np.stack([gx, gy], -1)), levels=np.geomspace(0.05, 150, 14), colors="0.75",
               linewidths=0.8)
    for name, eta in etas.items():
        if "2/(L+mu)" in name:
            continue  # on this bowl it looks like 1/L's; the loss panel tells them apart
        p = gd_path(bowl, BOWL_START, eta, 25)
        outside = np.flatnonzero(np.abs(p).max(1) > 6)
        p = p[: outside[0] + 1] if len(outside) else p  # a diverging run: up to the step that leaves the view
        ax.plot(p[:, 0], p[:, 1], "o-", ms=3, lw=1, color=colors[name], label=name, alpha=0.6 if eta > 2 / big else 1)
    ax.plot(0, 0, "k*", ms=12)
    ax.set_xlim(-6, 6)
    ax.set_ylim(-6, 6)
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"gradient descent on a 2-D bowl, curvatures {mu:g} and {big:g} (25 steps)\n"
                 "above 2/L = 0.2 each step overshoots further: it leaves the picture", fontsize=10)

    ax = axes[0, 1]
    for name, eta in etas.items():
        ax.semilogy(quadratic_loss(bowl, gd_path(bowl, BOWL_START, eta, 80)), color=colors[name], label=name)
    ax.set_ylim(1e-12, 1e4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss f(x) = 1/2 x^T H x")
    ax.set_title("the same bowl: loss per step for each step size (log scale)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[0, 2]
    line = np.linspace(0, 2.2, 100)
    ax.axhspan(-1, 1, color="tab:green", alpha=0.08)
    ax.plot(line, 1 - line, color="0.3", lw=1, label="theory: 1 - eta lambda")
    for (name, (el, m)), marker in zip(factors.items(), "os^D", strict=True):
        ax.plot(el, m, marker, ms=5, mfc="none", label=f"measured, eta = {name}")
    ax.axvline(2, color="tab:red", lw=0.8, ls="--")
    ax.text(2.02, 0.6, "eta lambda = 2:\nbeyond, |factor| > 1", fontsize=8, color="tab:red")
    ax.set_xlim(0, 2.4)
    ax.set_ylim(-1.3, 1.1)
    ax.set_xlabel("eta x lambda (step size x curvature of the direction)")
    ax.set_ylabel("factor per step along the eigenvector")
    ax.set_title(f"kappa = {lam[-1] / lam[0]:g} valley, {len(lam)} directions: each part shrinks by its own factor\n"
                 "green band: |factor| < 1 (converges); below 0: it flips sides every step", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)

    ax = axes[1, 0]
    for name, p in paths.items():
        ax.semilogy(distances(p), label=name, ls=":" if "axes" in name else "-")
    for (name, r), c in zip((("GD", rates[0]), ("heavy ball", rates[1])), ("tab:blue", "tab:orange"), strict=True):
        t = np.arange(1001)
        ax.semilogy(t, r**t, color=c, lw=0.8, ls="--", label=f"{name} theory rate^t, rate {r:.4f}")
    ax.axhline(TOL, color="0.4", lw=0.8)
    ax.set_ylim(1e-9, 1e2)
    ax.set_xlim(0, 800)
    ax.set_xlabel("step")
    ax.set_ylabel("||x_t|| / ||x_0|| (distance to the minimum)")
    ax.set_title(f"kappa = {lam[-1] / lam[0]:g} valley: gradient descent, momentum, Adam (grey line: {TOL:.0e})\n"
                 "Adam at a fixed lr bounces back: v forgets the early large gradients, the step grows", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1, 1]
    test, cfg = mlp["test"], mlp["cfg"]
    ax.semilogx(test.lrs, test.losses, color="0.7", lw=0.8, label="batch loss")
    ax.semilogx(test.lrs, test.smooth, color="tab:blue", label="smoothed (centred mean of 9)")
    marks = [("steepest fall", test.steepest, "tab:green", ":"), ("blows up", test.divergence, "tab:red", "--"),
             ("suggestion: a tenth of that", test.suggestion, "tab:red", "-"),
             (f"project's lr ({cfg.optimizer}, peak)", cfg.lr, "k", "-.")]
    for name, lr, c, ls in marks:
        if lr is not None:
            ax.axvline(lr, color=c, ls=ls, lw=1.2, label=f"{name}: {lr:.1e}")
    ax.set_ylim(0, max(test.smooth[0] * 1.8, 3))
    ax.set_xlabel("learning rate (grows x%.3f per step)" % (test.lrs[1] / test.lrs[0]))
    ax.set_ylabel("cross-entropy")
    ax.set_title(f"learning-rate range test: the zoo's MLP on digits, {cfg.optimizer}, batch {cfg.batch_size}, "
                 f"{len(test.lrs)} steps", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)

    ax = axes[1, 2]
    a = mlp["alphas"]
    ax.semilogy(a, mlp["slice_train"], "o-", ms=3, label="train loss")
    ax.semilogy(a, mlp["slice_test"], "s-", ms=3, label="test loss")
    for x, name in ((0, "start"), (1, "end")):
        ax.axvline(x, color="0.4", lw=0.8, ls="--")
        ax.text(x + 0.02, 2.5, name, fontsize=9)
    ax.set_xlabel("a: weights = start + a (end - start)")
    ax.set_ylabel("cross-entropy (log scale)")
    ax.set_title(f"the loss landscape on the line through the start and end of training\n"
                 f"({len(mlp['losses'])} steps, {cfg.optimizer} peak lr {cfg.lr:g}, {cfg.schedule}; "
                 f"test accuracy {mlp['accuracy']:.1%})", fontsize=10)
    ax.set_ylim(4e-3, 5)
    ax.text(-0.45, 5e-3, "past the end the train loss still falls (larger weights, surer logits)\n"
            "while the test loss rises: further along this line is overfitting", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    save_figure(fig, out)
