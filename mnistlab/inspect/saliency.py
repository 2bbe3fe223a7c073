"""Which pixels a prediction rests on: gradient, integrated gradients and SmoothGrad maps, and the
sanity check that tells a saliency method from an edge detector.

- gradient: |d logit_c / d x| (Simonyan, Vedaldi & Zisserman 2014, "Deep Inside Convolutional Networks").
- integrated gradients (Sundararajan, Taly & Yan 2017, "Axiomatic Attribution for Deep Networks"):
  (x - x') * mean of the gradient along the straight path from a baseline x' to x. Completeness says
  the attributions sum to f(x) - f(x'); how far the quadrature misses that is the gap, which also
  decides, per image, how many interpolation steps are taken.
- SmoothGrad (Smilkov et al. 2017): the gradient averaged over noisy copies of the input.
- the model randomisation test (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"): a map that
  barely changes when every weight is re-initialised explains the input, not the model.

Every map is taken of the pre-softmax logit of the target class, not its probability: the softmax's
gradient dp_c/dx = p_c (dz_c/dx - sum_k p_k dz_k/dx) vanishes as p_c -> 1 (a confident prediction
would look like it depends on nothing) and mixes in the evidence for every other class.

All functions take the model's normalised input x (B, C, H, W), as `mnistlab.data.batches.to_input`
makes it, and targets (B,) class indices. They need gradients with respect to x only, so they use
`torch.autograd.grad`: the parameters' .grad stay as they were and no weight gradient is computed.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from mnistlab.data.batches import to_input
from mnistlab.plots import pyplot

SaliencyMethod = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x, target) -> (B, H, W)

IG_STEPS = 32  # trapezoid intervals to start with; usually enough for the smooth models (ViT, GRU, LSTM)
IG_TOL = 0.01  # completeness gap to reach; the paper's check is 5 %
IG_MAX_STEPS = 1024  # the most intervals an image is refined to (a ReLU CNN's worst image needed 512)
SMOOTHGRAD_SAMPLES = 32
SMOOTHGRAD_NOISE = 0.15  # sigma as a fraction of the image's value range: Smilkov et al.'s 10-20 %
MAX_ROWS = 256  # images per forward/backward pass when many interpolation or noise steps are batched


@contextmanager
def _input_gradients(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off, BatchNorm on its running statistics) and autograd on, even under
    no_grad or inference_mode; every module's training flag is put back as it was afterwards."""
    modes = [(m, m.training) for m in model.modules()]  # per module: a caller may have mixed modes
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def _logit_grad(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d logit_target / d x for a batch x (N, C, H, W) and targets (N,): (N, C, H, W)."""
    x = x.detach().clone().requires_grad_(True)  # a copy: x may be an inference tensor, which cannot require grad
    logits = model(x)  # (N, classes)
    # The rows are independent (eval mode), so the gradient of the sum is each row's own gradient.
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
    return grad


def _channel_max(attr: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W): the largest magnitude over channels (Simonyan et al. 2014, section 3.1)."""
    return attr.abs().amax(dim=1)


def gradient_saliency(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|d logit_target / d x|, the plain gradient map: (B, C, H, W) -> (B, H, W)."""
    with _input_gradients(model):
        return _channel_max(_logit_grad(model, x, target))


def black_baseline(mean: float, std: float, shape: Sequence[int] = (1, 1, 28, 28)) -> torch.Tensor:
    """An all-black image in the model's normalised input space: every value (0 - mean) / std.

    Not zero: zero in normalised space is a grey image at the data set's mean brightness, which is
    itself evidence for some classes. Black is what an MNIST image has where there is no ink."""
    b, _, h, w = shape
    return to_input(torch.zeros(b, h, w, dtype=torch.uint8), mean, std).expand(*shape).contiguous()


class IGResult(NamedTuple):
    attributions: torch.Tensor  # (B, C, H, W)
    gap: torch.Tensor  # (B,) completeness gap, float64
    steps: torch.Tensor  # (B,) trapezoid intervals each image ended with
    path_gradient: torch.Tensor  # (B, C, H, W) float64: the gradient averaged along the path


def _grad_sum(model: nn.Module, x: torch.Tensor, target: torch.Tensor, baseline: torch.Tensor,
              alphas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k d f(x' + a_k (x - x')) / dx over nodes alphas (K,): (B, C, H, W) float64.

    Every node of every image goes through the model in one batch, MAX_ROWS images per pass."""
    b = x.shape[0]
    total = torch.zeros_like(x, dtype=torch.float64)
    per_pass = max(1, MAX_ROWS // b)  # nodes per pass
    for i in range(0, len(alphas), per_pass):
        a, w = alphas[i : i + per_pass].to(x), weights[i : i + per_pass].to(x.device)
        path = baseline + a[:, None, None, None, None] * (x - baseline)  # (K, B, C, H, W)
        grad = _logit_grad(model, path.flatten(0, 1), target.repeat(len(a))).unflatten(0, (len(a), b))
        total += (w[:, None, None, None, None] * grad).sum(0)
    return total


def _target_logit(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).gather(1, target[:, None])[:, 0].double()  # (B,)


def ig_result(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, baseline: torch.Tensor,
    steps: int = IG_STEPS, tol: float = IG_TOL, max_steps: int = IG_MAX_STEPS,
) -> IGResult:
    """Integrated gradients in full: attributions, completeness gap, steps used and path gradient.

    The path integral is the trapezoid rule over `steps` intervals; the images whose gap is still
    above `tol` get their intervals halved (the old nodes reused, only the midpoints computed) until
    it is below, or until `max_steps`. Why this rule: on a ReLU network f is piecewise linear along
    the path, so the integrand is piecewise constant, with jumps where units switch, and no rule
    converges fast. Gauss-Legendre, at float32 precision with 32 nodes on the smooth paths of ViT, GRU
    and LSTM (where the trapezoid's 32 intervals leave < 0.1 %), did no better there (digits CNN, 32
    test images, 128 steps: mean / max gap 0.86 % / 17 % against the trapezoid's 0.55 % / 6.4 %), and
    its nodes do not nest. How many steps is model- and image-dependent (two CNNs
    trained alike with seeds 0 and 1: max gap 0.4 % and 17 % at 128 Gauss-Legendre steps), hence the
    gap, which is free, decides."""
    x = x.detach()
    baseline = baseline.to(x).expand_as(x)
    b = x.shape[0]
    with _input_gradients(model):
        delta = _target_logit(model, x, target) - _target_logit(model, baseline, target)  # f(x) - f(x'), (B,)
        alphas = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        weights = torch.full((steps + 1,), 1.0 / steps, dtype=torch.float64)
        weights[[0, -1]] /= 2
        path_grad = _grad_sum(model, x, target, baseline, alphas, weights)  # (B, C, H, W)
        used = torch.full((b,), steps)
        todo = torch.arange(b)
        while True:
            attr = (x - baseline).double() * path_grad
            gap = (attr.sum(dim=(1, 2, 3)) - delta).abs() / delta.abs()
            todo = todo[gap[todo] > tol]
            m = int(used[todo].max()) if len(todo) else 0  # the images left all have the same intervals
            if not len(todo) or 2 * m > max_steps:
                break
            mids = (torch.arange(m, dtype=torch.float64) + 0.5) / m  # halfway between the old nodes
            new = _grad_sum(model, x[todo], target[todo], baseline[todo], mids, torch.full((m,), 0.5 / m))
            path_grad[todo] = path_grad[todo] / 2 + new  # T_2m = T_m / 2 + (1 / 2m) sum of f' at the midpoints
            used[todo] = 2 * m
    return IGResult(attr.to(x.dtype), gap, used, path_grad)


def integrated_gradients(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, baseline: torch.Tensor,
    steps: int = IG_STEPS, tol: float = IG_TOL, max_steps: int = IG_MAX_STEPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated gradients (Sundararajan et al. 2017): (attributions (B, C, H, W), completeness gap (B,)).

    attr = (x - x') * integral_0^1 d f(x' + a (x - x')) / dx da, with f the target logit and x' the
    baseline (broadcast to x). Completeness says sum(attr) = f(x) - f(x') exactly; what the quadrature
    misses is reported as gap = |sum(attr) - (f(x) - f(x'))| / |f(x) - f(x')|, the relative error of
    the attributions' total (the paper asks for 5 %). Relative: where f(x) is close to f(x') a tiny
    absolute miss is a large gap. `steps`, `tol`, `max_steps`: see ig_result."""
    r = ig_result(model, x, target, baseline, steps, tol, max_steps)
    return r.attributions, r.gap


def smoothgrad(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, n: int = SMOOTHGRAD_SAMPLES,
    sigma: float = SMOOTHGRAD_NOISE, seed: int = 0,
) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017): |mean over n noisy copies of d logit_target / dx|, (B, H, W).

    The noise is N(0, s^2) with s = sigma * (max - min) of each image, drawn from its own seeded
    generator: the same seed gives the same map, and torch's global RNG is never touched. The signed
    gradients are averaged before the magnitude is taken, so that noise in their sign cancels."""
    b = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    per_pass = max(1, MAX_ROWS // b)
    with _input_gradients(model):
        x = x.detach()
        span = (x.flatten(1).amax(1) - x.flatten(1).amin(1))[:, None, None, None]  # (B, 1, 1, 1)
        noise = torch.randn((n, *x.shape), generator=gen, dtype=x.dtype).to(x.device)  # (n, B, C, H, W)
        total = torch.zeros_like(x)
        for i in range(0, n, per_pass):
            noisy = x + sigma * span * noise[i : i + per_pass]  # (K, B, C, H, W)
            k = noisy.shape[0]
            total += _logit_grad(model, noisy.flatten(0, 1), target.repeat(k)).unflatten(0, (k, b)).sum(0)
    return _channel_max(total / n)


def randomized_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same architecture with every parameter re-initialised (Adebayo et al. 2018's full model
    randomisation); `model` is untouched and torch's global RNG is left as it was.

    Each module with a reset_parameters re-draws its own parameters with its default initialisation
    (BatchNorm also forgets its running statistics); a parameter no such module owns (a ViT's position
    embedding or class token) is re-drawn from N(0, 0.02^2), truncated at 2 std, the usual ViT init."""
    with torch.inference_mode(False):  # tensors copied under a caller's inference_mode could not be differentiated
        rand = copy.deepcopy(model)
    cuda = sorted({p.device.index or 0 for p in rand.parameters() if p.device.type == "cuda"})
    reset: set[int] = set()
    with torch.random.fork_rng(devices=cuda), torch.inference_mode(False), torch.no_grad():
        torch.manual_seed(seed)
        for m in rand.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
                reset.update(id(p) for p in m.parameters(recurse=False))
        for p in rand.parameters():
            if id(p) not in reset:
                nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)
    return rand


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N of v (N,), tied values sharing the mean of the ranks they span."""
    sorted_v, order = v.sort()
    first = torch.ones_like(sorted_v, dtype=torch.bool)
    first[1:] = sorted_v[1:] != sorted_v[:-1]
    group = first.cumsum(0) - 1  # (N,) tie group of each sorted position
    end = torch.bincount(group).cumsum(0).double()  # one past each group's last position
    start = end - torch.bincount(group).double()
    ranks = torch.empty_like(v, dtype=torch.float64)
    ranks[order] = ((start + end + 1) / 2)[group]  # mean of the 1-based ranks start+1 .. end
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of the magnitudes |a| and |b| of two maps of the same size (ties get
    average ranks); NaN where either map is constant. Magnitudes, as Adebayo et al. compare them."""
    ra, rb = _average_ranks(a.detach().abs().flatten().cpu()), _average_ranks(b.detach().abs().flatten().cpu())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum()) / denom if denom > 0 else math.nan


def rank_correlations(maps_a: dict[str, torch.Tensor], maps_b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per method: the mean over images of the rank correlation between the (B, H, W) maps in a and b."""
    return {name: float(np.mean([spearman(p, q) for p, q in zip(maps_a[name], maps_b[name], strict=True)]))
            for name in maps_a}


def randomization_check(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, methods: dict[str, SaliencyMethod], seed: int = 0,
) -> dict[str, float]:
    """Per method: mean rank correlation between its maps of `model` and of `randomized_copy(model, seed)`.

    High (near 1) means the map hardly depends on what the model learned (Adebayo et al. 2018)."""
    rand = randomized_copy(model, seed)
    return rank_correlations({k: m(model, x, target) for k, m in methods.items()},
                             {k: m(rand, x, target) for k, m in methods.items()})


def saliency_methods(mean: float, std: float, n: int = SMOOTHGRAD_SAMPLES, seed: int = 0,
                     tol: float = IG_TOL) -> dict[str, SaliencyMethod]:
    """The report's methods as (model, x, target) -> (B, H, W) maps, IG against the black baseline
    (`tol`: IG's completeness gap to refine to; math.inf keeps IG_STEPS steps).

    "IG path gradient" is IG's model-dependent factor alone, IG / (x - x'): the IG map is that times
    |x - x'|, the input's own brightness, so it keeps the input's shape whatever the model."""

    def ig(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> IGResult:
        return ig_result(model, x, target, black_baseline(mean, std, x.shape).to(x.device), tol=tol)

    return {
        "gradient": gradient_saliency,
        "integrated gradients": lambda model, x, target: _channel_max(ig(model, x, target).attributions),
        "IG path gradient": lambda model, x, target: _channel_max(ig(model, x, target).path_gradient),
        "SmoothGrad": lambda model, x, target: smoothgrad(model, x, target, n=n, seed=seed),
    }


def _maps(model: nn.Module, x: torch.Tensor, target: torch.Tensor, mean: float, std: float, seed: int,
          tol: float = IG_TOL) -> tuple[dict[str, torch.Tensor], IGResult]:
    """saliency_methods' maps (B, H, W) for one model, with IG computed once, and IG's result."""
    ig = ig_result(model, x, target, black_baseline(mean, std, x.shape).to(x.device), tol=tol)
    maps = {"gradient": gradient_saliency(model, x, target), "integrated gradients": _channel_max(ig.attributions),
            "IG path gradient": _channel_max(ig.path_gradient), "SmoothGrad": smoothgrad(model, x, target, seed=seed)}
    return maps, ig


def _show_map(ax, m: torch.Tensor) -> None:
    """One map, scaled to its own 99th percentile (the few largest values would wash out the rest)."""
    m = m.detach().cpu().float()
    top = float(torch.quantile(m.flatten(), 0.99)) or float(m.max()) or 1.0
    ax.imshow((m / top).clamp(0, 1).numpy(), cmap="inferno", vmin=0, vmax=1)


FIGURE_COLUMNS = ("gradient", "integrated gradients", "SmoothGrad")


def saliency_figure(
    model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, mean: float, std: float,
    classes: Sequence[str], seed: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """One row per image: the input (true and predicted class), then gradient, integrated gradients and
    SmoothGrad maps for the predicted class; and the numbers the report prints (completeness gap,
    IG steps, rank correlation of each method's maps with those of a randomised copy of the model)."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    x = to_input(images_u8, mean, std).to(device)  # (B, 1, H, W)
    with _input_gradients(model), torch.no_grad():
        pred = model(x).argmax(1)  # (B,): explain what the model decided, right or wrong
    maps, ig = _maps(model, x, pred, mean, std, seed)
    gaps = ig.gap
    # The randomised model explains the trained model's class: the same question, asked of noise. Its
    # IG is not refined (tol=inf): its maps only enter a rank correlation, which IG_STEPS fixed steps
    # leave where refinement would (0.9710 vs 0.9711 on a digits CNN), and a random model's logit often
    # barely moves from black to the image, so its relative gap would ask for max_steps (4x the time).
    random_maps = _maps(randomized_copy(model, seed), x, pred, mean, std, seed, tol=math.inf)[0]
    correlations = rank_correlations(maps, random_maps)
    stats = {
        "ig_baseline": "black", "ig_rule": "trapezoid", "ig_tol": IG_TOL, "ig_steps": [int(n) for n in ig.steps],
        "completeness_gap": [float(g) for g in gaps],
        "completeness_gap_mean": float(gaps.mean()), "completeness_gap_max": float(gaps.max()),
        "smoothgrad_samples": SMOOTHGRAD_SAMPLES, "smoothgrad_noise": SMOOTHGRAD_NOISE,
        "rank_correlation_vs_random": correlations, "seconds": time.perf_counter() - started,
    }

    plt = pyplot()
    b = len(images_u8)
    fig, axes = plt.subplots(b, 1 + len(FIGURE_COLUMNS), figsize=(6.4, 1.5 * b + 1.0), squeeze=False)
    axes[0, 0].set_title("input\ntrue -> predicted", fontsize=8)
    for j, name in enumerate(FIGURE_COLUMNS, start=1):
        axes[0, j].set_title(f"{name}\nvs random model: {correlations[name]:.2f}", fontsize=8)
    for i in range(b):
        true, guess = classes[int(labels[i])], classes[int(pred[i])]
        axes[i, 0].imshow(images_u8[i].cpu().numpy(), cmap="gray", vmin=0, vmax=255)
        axes[i, 0].set_xlabel(f"{true} -> {guess}", fontsize=8, color="black" if true == guess else "red")
        for j, name in enumerate(FIGURE_COLUMNS, start=1):
            _show_map(axes[i, j], maps[name][i])
        axes[i, 2].set_xlabel(f"gap {100 * float(gaps[i]):.2f}%, {int(ig.steps[i])} steps", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.suptitle(
        f"Saliency of the predicted class, each map scaled to its 99th percentile. IG from a black image, "
        f"completeness gap mean {100 * stats['completeness_gap_mean']:.2f}%, max "
        f"{100 * stats['completeness_gap_max']:.2f}%. Rank correlation with a randomised model's maps: low means "
        f"the map shows what was learned. IG's is high because its map is the path gradient times the input's "
        f"brightness; the path gradient's: {correlations['IG path gradient']:.2f}.", fontsize=7, wrap=True)
    return fig, stats
