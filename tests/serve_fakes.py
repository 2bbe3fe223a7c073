"""A stand-in for mnistlab.deploy.predict.Predictor in the server's tests: the attributes and the
predict_prepared the server uses (inference.ServedModel), no checkpoint, an instant fixed answer,
and a record of every call (what it saw, whether under torch.inference_mode, how many ran at once)."""

from __future__ import annotations

import threading

import numpy as np

from mnistlab.deploy.predict import Prediction
from mnistlab.deploy.preprocess import Prepared

DIGITS = [str(i) for i in range(10)]
CLOTHES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class FakeModel:
    """Answers class `answer` with probability 0.5 (the rest shared equally); `gate`, when given, holds
    every call until it is set."""

    def __init__(self, classes: list[str] = DIGITS, dataset: str = "digits", threshold: float | None = None,
                 answer: int = 3, gate: threading.Event | None = None) -> None:
        self.classes, self.dataset, self.temperature, self.threshold = list(classes), dataset, 1.0, threshold
        self.answer, self.gate = answer, gate
        self.meta = {"config": {"model": "fake"}}
        self.seen: list[tuple[str, Prepared, bool]] = []  # (name, the view, under inference_mode)
        self.running = self.most_running = 0
        self._lock = threading.Lock()

    def predict_prepared(self, prepared: list[tuple[str, Prepared]], top_k: int = 3) -> list[Prediction]:
        import torch

        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            if self.gate is not None:
                self.gate.wait(timeout=10)
            return [self._one(name, view, top_k) for name, view in prepared]
        finally:
            with self._lock:
                self.running -= 1
                self.seen.extend((name, view, torch.is_inference_mode_enabled()) for name, view in prepared)

    def _one(self, name: str, view: Prepared, top_k: int) -> Prediction:
        if view.blank:
            return Prediction(path=name, status="blank", image=view.image)
        probs = np.full(len(self.classes), 0.5 / (len(self.classes) - 1))
        probs[self.answer] = 0.5
        order = np.argsort(-probs, kind="stable")[:top_k]
        status = "unsure" if self.threshold is not None and 0.5 < self.threshold else "ok"
        return Prediction(path=name, status=status, label=self.classes[self.answer], index=self.answer,
                          probability=0.5, image=view.image,
                          top=[dict(label=self.classes[i], index=int(i), probability=float(probs[i])) for i in order])
