"""Predict on people's pictures with a trained run: calibrated probabilities and an honest "unsure".

Two numbers are fitted on the validation split (never on test) and cached in the run folder as
calibration.json:

- a temperature T (Guo et al. 2017): softmax(logits / T) with the T that minimises the validation
  negative log-likelihood. One scalar for all classes, so the argmax never changes; it only makes
  the displayed probabilities mean what they say.
- a threshold on the calibrated maximum softmax probability (Hendrycks and Gimpel 2017), chosen so
  that 95% of the correctly classified validation images are accepted. A picture scoring below it
  is answered "unsure" (the model still says its best guess). A blank picture is answered "blank"
  before the model runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnistlab.deploy.preprocess import Prepared, prepare
from mnistlab.errors import UserError

CALIBRATION = "calibration.json"
ACCEPT_CORRECT = 0.95  # the fraction of correctly classified validation images the threshold accepts


@dataclass
class Prediction:
    path: str
    status: str  # "ok", "unsure" (below the threshold) or "blank" (nothing drawn)
    label: str | None = None
    index: int | None = None
    probability: float | None = None
    top: list[dict[str, Any]] = field(default_factory=list)
    image: np.ndarray | None = None  # the 28x28 view the model saw

    def to_dict(self) -> dict[str, Any]:
        return dict(path=self.path, status=self.status, label=self.label, index=self.index,
                    probability=self.probability, top=self.top)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising mean NLL of softmax(logits / T): a 1-D convex problem in log T (golden section)."""
    logits, labels = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return torch.nn.functional.cross_entropy(logits / math.exp(log_t), labels).item()

    lo, hi = math.log(0.05), math.log(20.0)
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


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: the confidence-weighted gap between confidence and accuracy, over equal-width bins."""
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


class Predictor:
    """A run folder's model, its preprocessing convention and its calibration, ready for pictures."""

    def __init__(self, run_dir: str | Path) -> None:
        from mnistlab.train import load_run_checkpoint

        self.run_dir = Path(run_dir)
        self.model, self.meta = load_run_checkpoint(self.run_dir)
        if self.meta.get("engine") == "scratch":
            raise UserError(f"{run_dir}: predict serves torch-engine runs (this one was trained by the scratch engine)")
        self.model.eval()
        self.classes: list[str] = list(self.meta["classes"])
        self.dataset: str = self.meta["config"]["dataset"]
        self.mean, self.std = float(self.meta["mean"]), float(self.meta["std"])
        cal = self._calibration()
        self.temperature: float = cal["temperature"]
        self.threshold: float = cal["threshold"]

    @torch.inference_mode()
    def logits(self, images_u8: torch.Tensor) -> torch.Tensor:
        """(N, K) logits of uint8 images (N, 28, 28), in batches."""
        from mnistlab.data.batches import to_input

        out = [self.model(to_input(images_u8[i : i + 1000], self.mean, self.std)).float()
               for i in range(0, len(images_u8), 1000)]
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))

    def _calibration(self) -> dict[str, float]:
        path = self.run_dir / CALIBRATION
        if path.is_file():
            try:
                cal = json.loads(path.read_text())
                if cal.get("step") == self.meta["step"]:
                    return cal
            except (OSError, ValueError):
                pass  # damaged: fit again
        cal = self.calibrate()
        try:
            from mnistlab.files import write_json

            write_json(path, cal)
        except UserError:
            pass  # a read-only run folder: calibrate again next time
        return cal

    def calibrate(self) -> dict[str, Any]:
        """Fit T and the threshold on the validation split (the run's own data and split)."""
        from mnistlab.config import TrainConfig
        from mnistlab.data.dataset import load_dataset

        cfg = TrainConfig.from_dict(self.meta["config"], source=f"{self.run_dir}: the checkpoint's config")
        ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, offline=cfg.offline, val_size=cfg.val_size)
        logits = self.logits(ds.val_images)
        labels = ds.val_labels
        t = fit_temperature(logits, labels)
        probs = (logits / t).softmax(1)
        score, pred = probs.max(1)
        correct = pred == labels
        threshold = float(torch.quantile(score[correct].double(), 1 - ACCEPT_CORRECT)) if correct.any() else 0.0
        return dict(step=self.meta["step"], temperature=t, threshold=threshold, accept_correct=ACCEPT_CORRECT,
                    val_images=len(labels),
                    ece_before=expected_calibration_error(logits.softmax(1), labels),
                    ece_after=expected_calibration_error(probs, labels))

    def predict_prepared(self, prepared: list[tuple[str, Prepared]], top_k: int = 3) -> list[Prediction]:
        """Predictions for pictures already turned into the model's 28x28 view."""
        results: list[Prediction] = [Prediction(path=p, status="blank", image=pr.image) for p, pr in prepared]
        live = [i for i, (_, pr) in enumerate(prepared) if not pr.blank]
        if live:
            batch = torch.from_numpy(np.stack([prepared[i][1].image for i in live]))
            probs = (self.logits(batch) / self.temperature).softmax(1)  # (N, K)
            k = min(top_k, len(self.classes))
            values, indices = probs.topk(k, dim=1)
            for row, i in enumerate(live):
                best = int(indices[row, 0])
                p = float(values[row, 0])
                results[i].status = "ok" if p >= self.threshold else "unsure"
                results[i].index, results[i].label, results[i].probability = best, self.classes[best], p
                results[i].top = [dict(label=self.classes[int(j)], index=int(j), probability=float(v))
                                  for v, j in zip(values[row].tolist(), indices[row].tolist(), strict=True)]
        return results

    def predict_files(self, paths: list[str], top_k: int = 3) -> tuple[list[Prediction], list[str]]:
        """(predictions for the readable pictures, one error line per unreadable one)."""
        from mnistlab.deploy.preprocess import UnreadableImage

        prepared, errors = [], []
        for p in paths:
            try:
                prepared.append((p, prepare(p, self.dataset)))
            except UnreadableImage as e:
                errors.append(str(e))
        return self.predict_prepared(prepared, top_k), errors
