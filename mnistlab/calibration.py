"""Calibration: probabilities that mean what they say, and a threshold for "unsure". Torch only.

Two numbers are fitted on a run's validation split (never on test), when training ends, and kept in
the run folder as calibration.json, so a copied run folder predicts and serves without its dataset
(`mnistlab calibrate RUN_DIR` fits them for runs trained before this existed):

- a temperature T (Guo et al. 2017, "On Calibration of Modern Neural Networks"): softmax(logits / T)
  with the T that minimises the validation negative log-likelihood. One scalar for all classes, so
  the argmax never changes; only the displayed probabilities do.
- a threshold on the calibrated maximum softmax probability (Hendrycks and Gimpel 2017), the score
  that accepts 95% of the correctly classified validation images. A picture scoring below it is
  answered "unsure" (with its best guess).

Both are refused, in plain words in calibration.json, when the validation split cannot support them:

- T needs errors. The NLL of correct answers only falls as T shrinks, so on a split the model gets
  all right the "best" T is whatever lower bound the search has (0.05 made every answer 100%). With
  a handful of errors, T is set by those few images. We ask for MIN_ERRORS = 10 misclassified
  validation images, the events-per-variable rule of thumb for fitting one parameter (Peduzzi et al.
  1996); with fewer, T = 1 (the plain softmax). A fit that ends on a search bound is refused too.
- The threshold needs correct answers on both sides of it: at least MIN_EACH_SIDE = 5 correct
  validation answers strictly below it (so some 80 correct answers at least, as it accepts 95% of
  them) and 5 strictly above it (scores saturated at the top say nothing). Otherwise there is no
  threshold (None in Python, null in the JSON) and no answer is ever called unsure because of it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mnistlab.data.dataset import Dataset
    from mnistlab.run import RunFolder

CALIBRATION = "calibration.json"
FORMAT = 2  # 1: before the guards (no format key); read_calibration refuses it
ACCEPT_CORRECT = 0.95  # the fraction of correctly classified validation images the threshold accepts
MIN_ERRORS = 10  # misclassified validation images needed before T is fitted
MIN_EACH_SIDE = 5  # correct validation answers needed strictly below and strictly above the threshold
T_MIN, T_MAX = 0.05, 20.0  # the search interval for T
METHOD = ("temperature scaling (Guo et al. 2017) fitted on the validation split when it has at least "
          f"{MIN_ERRORS} errors, else T = 1; threshold: the calibrated top probability that accepts "
          f"{ACCEPT_CORRECT:.0%} of correctly classified validation images, kept only when at least "
          f"{MIN_EACH_SIDE} correct answers score below it and {MIN_EACH_SIDE} above")


def _nll_minimising_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in [T_MIN, T_MAX] minimising mean NLL of softmax(logits / T): convex in log T, golden section."""
    logits, labels = logits.double(), labels.long()  # (N, K), (N,)

    def nll(log_t: float) -> float:
        return torch.nn.functional.cross_entropy(logits / math.exp(log_t), labels).item()

    lo, hi = math.log(T_MIN), math.log(T_MAX)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


def fit_temperature_with_reason(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, str]:
    """(T, why): the validation-NLL temperature of logits (N, K), or 1.0 when the split cannot support a fit."""
    errors = int((logits.argmax(1) != labels).sum())
    if errors < MIN_ERRORS:
        return 1.0, (f"not fitted: {errors} of {len(labels)} validation images are misclassified, fewer than the "
                     f"{MIN_ERRORS} a fit needs; T = 1 (the plain softmax)")
    t = _nll_minimising_temperature(logits, labels)
    if not math.log(T_MIN) + 0.01 < math.log(t) < math.log(T_MAX) - 0.01:
        return 1.0, f"not fitted: the fit ran to the edge of its search interval [{T_MIN}, {T_MAX}]; T = 1"
    return t, f"fitted on {len(labels)} validation images ({errors} misclassified)"


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The validation-NLL temperature of logits (N, K) and labels (N,); 1.0 when too few errors to fit it."""
    return fit_temperature_with_reason(logits, labels)[0]


def reject_threshold(correct_scores: torch.Tensor) -> tuple[float | None, str]:
    """(threshold, why): the top probability accepting ACCEPT_CORRECT of the correct answers' scores (M,),
    or None when fewer than MIN_EACH_SIDE of them lie on either side of it."""
    scores = correct_scores.double()
    if len(scores) == 0:
        return None, "unavailable: no validation image is classified correctly"
    threshold = float(torch.quantile(scores, 1 - ACCEPT_CORRECT))
    below, above = int((scores < threshold).sum()), int((scores > threshold).sum())
    if below < MIN_EACH_SIDE or above < MIN_EACH_SIDE:
        return None, (f"unavailable: of {len(scores)} correct validation answers {below} score below the "
                      f"{1 - ACCEPT_CORRECT:.0%} quantile and {above} above it, fewer than {MIN_EACH_SIDE} on a "
                      f"side; no answer is called unsure")
    return threshold, f"accepts {ACCEPT_CORRECT:.0%} of {len(scores)} correctly classified validation images"


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE of probs (N, K): the confidence-weighted gap between confidence and accuracy, over equal-width bins."""
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    ece = 0.0
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            gap = conf[inside].double().mean().item() - correct[inside].mean().item()
            ece += inside.double().mean().item() * abs(gap)
    return ece


def fit_calibration(logits: torch.Tensor, labels: torch.Tensor, step: int) -> dict[str, Any]:
    """calibration.json's contents for a checkpoint at `step`, from its validation logits (N, K) and labels (N,)."""
    labels = labels.long()
    t, t_reason = fit_temperature_with_reason(logits, labels)
    probs = (logits.double() / t).softmax(1)  # (N, K); float64, so top scores saturate at 1 much later
    score, pred = probs.max(1)
    correct = pred == labels
    threshold, threshold_reason = reject_threshold(score[correct])
    return dict(format=FORMAT, step=step, temperature=t, threshold=threshold, method=METHOD,
                temperature_reason=t_reason, threshold_reason=threshold_reason, accept_correct=ACCEPT_CORRECT,
                val_images=len(labels), val_errors=int((~correct).sum()),
                ece_before=expected_calibration_error(logits.double().softmax(1), labels),
                ece_after=expected_calibration_error(probs, labels))


@torch.inference_mode()
def batched_logits(forward: Callable[[torch.Tensor], torch.Tensor], images_u8: torch.Tensor, mean: float,
                   std: float, batch: int = 1000, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, K) float32 logits on the CPU of uint8 images (N, H, W), `batch` images at a time: each batch moved to
    `device`, normalised there ((B, C, H, W) float32) and passed to `forward` (a module, or a deploy/runtime.py
    Runtime's logits)."""
    from mnistlab.data.batches import to_input

    out = [forward(to_input(images_u8[i : i + batch].to(device), mean, std)).float().cpu()
           for i in range(0, len(images_u8), batch)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def model_logits(model: torch.nn.Module, images_u8: torch.Tensor, mean: float, std: float,
                 batch: int = 1000) -> torch.Tensor:
    """(N, K) float32 logits on the CPU of uint8 images (N, H, W) through `model`, on the device it is on: what
    prediction computes with the default runtime (torch fp32)."""
    return batched_logits(model, images_u8, mean, std, batch, device=next(model.parameters()).device)


def calibrate_model(model: torch.nn.Module, val_images: torch.Tensor, val_labels: torch.Tensor, mean: float,
                    std: float, step: int) -> dict[str, Any]:
    """calibration.json's contents for `model` (in eval mode here, its mode restored) on uint8 images (N, H, W)."""
    was_training = model.training
    model.eval()
    try:
        logits = model_logits(model, val_images, mean, std)
    finally:
        model.train(was_training)
    return fit_calibration(logits, val_labels.cpu(), step)


def write_run_calibration(run: RunFolder, model: torch.nn.Module, ds: Dataset, step: int) -> None:
    """When training ends: fit on the run's own validation split and write calibration.json (rank 0 only)."""
    from mnistlab.run import note

    if not run.writes:
        return
    cal = calibrate_model(model, ds.val_images, ds.val_labels, ds.mean, ds.std, step)
    run.write_json(CALIBRATION, cal)
    note(f"{CALIBRATION}: {describe(cal)}")


def temperature_and_threshold(cal: dict[str, Any] | None) -> tuple[float, float | None]:
    """(T, threshold) a calibration says to apply; without one, the plain softmax (T = 1) and no threshold."""
    return (cal["temperature"], cal["threshold"]) if cal else (1.0, None)


def read_calibration(run_dir: Path, step: int) -> tuple[dict[str, Any] | None, str]:
    """(calibration.json's contents, "") when it is there, of this format and fitted for the checkpoint at
    `step`; else (None, why not)."""
    path = Path(run_dir) / CALIBRATION
    if not path.is_file():
        return None, f"no {CALIBRATION}"
    try:
        cal = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, f"{CALIBRATION} is unreadable"
    if not isinstance(cal, dict):
        return None, f"{CALIBRATION} is damaged (not a JSON object)"
    if cal.get("format") != FORMAT:
        return None, f"{CALIBRATION} was written by an older mnistlab, without its guard against too few errors"
    if cal.get("step") != step:
        return None, f"{CALIBRATION} was fitted for another checkpoint (step {cal.get('step')}, not {step})"
    t, threshold = cal.get("temperature"), cal.get("threshold")
    if not (isinstance(t, float) and 0 < t < math.inf and (threshold is None or isinstance(threshold, float))):
        return None, f"{CALIBRATION} is damaged (temperature {t!r}, threshold {threshold!r})"
    return cal, ""


def describe(cal: dict[str, Any]) -> str:
    """Three short lines (a terminal's width each): T, the threshold, the ECE before and after, and why."""
    threshold = "none" if cal["threshold"] is None else f"{cal['threshold']:.1%}"
    return (f"temperature {cal['temperature']:.3f} ({cal['temperature_reason']})\n"
            f"  threshold {threshold} ({cal['threshold_reason']})\n"
            f"  validation ECE {cal['ece_before']:.2%} before, {cal['ece_after']:.2%} after")
