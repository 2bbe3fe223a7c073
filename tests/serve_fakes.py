"""For the server's tests: FakeModel, a stand-in for mnistlab.deploy.predict.Predictor (the attributes
and the predict_prepared the server uses, inference.ServedModel; no checkpoint, an instant fixed answer,
and a record of every call: what it saw, whether under torch.inference_mode, how many ran at once), and
serving(app), an app under uvicorn on a free loopback port in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def serving(app) -> Iterator[str]:
    """The app under uvicorn on a free 127.0.0.1 port (bound as `mnistlab serve` binds it), in a thread; its URL."""
    import uvicorn

    from mnistlab.deploy.serve.server import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
