"""Predict on people's pictures with a trained run: calibrated probabilities and an honest "unsure".

The calibration (a temperature T and a threshold on the top probability, mnistlab/calibration.py) is
fitted on the validation split when training ends and read from the run folder's calibration.json:
a Predictor never loads the dataset, so a copied run folder predicts and serves without it. A run
without a calibration for its checkpoint predicts uncalibrated (T = 1, no threshold) and says once
that `mnistlab calibrate RUN_DIR` (calibrate_run here, which does load the data) fits it. A picture
scoring below the threshold is answered "unsure" (with its best guess); with no threshold (None)
nothing is. A blank picture is answered "blank" before the model runs.

`Predictor.open(path)` takes a run folder (read through record.RunRecord) or an exported model folder
(deploy/model_folder.py, whose config.json carries the calibration): `mnistlab predict`, `mnistlab serve`
and `mnistlab.load` (api.Classifier, which wraps a Predictor) all open models this one way. Its `runtime`
and `precision` choose what computes the logits (deploy/runtime.py: torch fp32, the default, or bf16;
onnxruntime fp32 or int8 from the files `mnistlab export` writes); every Prediction names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnistlab.calibration import CALIBRATION, fit_calibration, temperature_and_threshold
from mnistlab.deploy.preprocess import Prepared, prepare
from mnistlab.deploy.runtime import Runtime, TorchRuntime, open_runtime, resolve
from mnistlab.errors import UserError


@dataclass
class Prediction:
    path: str
    status: str  # "ok", "unsure" (below the threshold) or "blank" (nothing drawn)
    label: str | None = None
    index: int | None = None
    probability: float | None = None
    top: list[dict[str, Any]] = field(default_factory=list)
    image: np.ndarray | None = field(default=None, repr=False)  # the 28x28 view the model saw
    runtime: str | None = None  # what computed the logits ("torch-fp32", "onnxruntime-int8"); None when blank

    def to_dict(self) -> dict[str, Any]:
        return dict(path=self.path, status=self.status, label=self.label, index=self.index,
                    probability=self.probability, top=self.top, runtime=self.runtime)


def is_model_folder(path: Path) -> bool:
    """An exported model folder (deploy/model_folder.py), not a run: no checkpoint, and its weights file or its
    config.json's marker (a run's config.json has no library_name)."""
    from mnistlab.deploy.model_folder import WEIGHTS, has_folder_marker
    from mnistlab.run import CHECKPOINT

    if not path.is_dir() or (path / CHECKPOINT).is_file():
        return False
    return (path / WEIGHTS).is_file() or has_folder_marker(path)


class Predictor:
    """A run folder's model, its preprocessing convention and its calibration, ready for pictures.

    temperature: T, 1.0 when uncalibrated; threshold: the top probability below which an answer is
    "unsure", or None when there is none (no calibration, or too little validation evidence for one);
    calibration: calibration.json's contents, or None; calibration_note: why it is missing, or "";
    backend: the Runtime that computes the logits (torch fp32 unless `open` was told otherwise), runtime: its name."""

    def __init__(self, run_dir: str | Path, *, warn_uncalibrated: bool = True) -> None:
        from mnistlab.record import RunRecord

        record = RunRecord(run_dir)
        model, meta = record.load_model()
        calibration, why_not = record.calibration(meta["step"])
        self._take(Path(run_dir), model, meta, calibration, why_not, warn_uncalibrated,
                   remedy=f"`mnistlab calibrate {run_dir}` fits the calibration")

    @classmethod
    def open(cls, path: str | Path, *, runtime: str | None = None, precision: str = "fp32",
             warn_uncalibrated: bool = True, force_bf16: bool = False) -> Predictor:
        """The Predictor of a run folder, or of an exported model folder (`mnistlab export --format hf`), computing
        with `runtime` ("torch" or "onnxruntime"; None: the precision's usual one) in `precision` ("fp32", "bf16",
        "int8"); force_bf16: bf16 even on a CPU that only emulates it (deploy/runtime.py)."""
        path = Path(path)
        if not is_model_folder(path):
            predictor = cls(path, warn_uncalibrated=warn_uncalibrated)
        else:
            from mnistlab.deploy.model_folder import read_model_folder

            model, meta = read_model_folder(path)
            calibration = meta.pop("calibration", None)
            predictor = cls.from_parts(path, model, meta, calibration, "the model folder carries no calibration",
                                       warn_uncalibrated=warn_uncalibrated)
        if resolve(runtime, precision) != ("torch", "fp32"):
            predictor.backend = open_runtime(path, predictor.model, predictor.meta, runtime, precision,
                                             force_bf16=force_bf16)
        return predictor

    @classmethod
    def from_parts(cls, source: str | Path, model: torch.nn.Module, meta: dict[str, Any],
                   calibration: dict[str, Any] | None, why_not: str = "no calibration",
                   warn_uncalibrated: bool = True) -> Predictor:
        """A Predictor of a model read elsewhere (an exported model folder): `meta` as a run checkpoint's."""
        predictor = cls.__new__(cls)
        predictor._take(Path(source), model, meta, calibration, why_not, warn_uncalibrated,
                        remedy="`mnistlab calibrate RUN_DIR` on the run it came from, then export it again, fits it")
        return predictor

    def _take(self, run_dir: Path, model: torch.nn.Module, meta: dict[str, Any], calibration: dict[str, Any] | None,
              why_not: str, warn_uncalibrated: bool, remedy: str) -> None:
        from mnistlab.run import note

        self.run_dir, self.model, self.meta = run_dir, model, meta
        if self.meta.get("engine") == "scratch":
            raise UserError(f"{run_dir}: predict serves torch-engine runs (this one was trained by the scratch engine)")
        self.model.eval()
        self.classes: list[str] = list(self.meta["classes"])
        self.dataset: str = self.meta["config"]["dataset"]
        self.mean, self.std = float(self.meta["mean"]), float(self.meta["std"])
        self.backend: Runtime = TorchRuntime(self.model, self.mean, self.std)
        self.calibration = calibration
        self.temperature, self.threshold = temperature_and_threshold(self.calibration)
        self.calibration_note = "" if self.calibration else (
            f"{run_dir}: {why_not}, so probabilities are the plain softmax and no answer is called unsure; {remedy}")
        if self.calibration_note and warn_uncalibrated:
            note(self.calibration_note)

    @property
    def runtime(self) -> str:
        """What computes the logits: "torch-fp32", "torch-bf16", "onnxruntime-fp32" or "onnxruntime-int8"."""
        return self.backend.name

    def logits(self, images_u8: torch.Tensor) -> torch.Tensor:
        """(N, K) logits of uint8 images (N, 28, 28), in batches, computed by the runtime."""
        return self.backend.logits_u8(images_u8)

    def predict_prepared(self, prepared: list[tuple[str, Prepared]], top_k: int = 3) -> list[Prediction]:
        """Predictions for pictures already turned into the model's 28x28 view."""
        results: list[Prediction] = [Prediction(path=p, status="blank", image=pr.image) for p, pr in prepared]
        live = [i for i, (_, pr) in enumerate(prepared) if not pr.blank]
        if live:
            batch = torch.from_numpy(np.stack([prepared[i][1].image for i in live]))
            probs = (self.logits(batch) / self.temperature).softmax(1)  # (N, K)
            k = min(top_k, len(self.classes))
            values, indices = probs.topk(k, dim=1)  # (N, k) each
            # as Python lists once for the batch: indexing a tensor element by element costs a few microseconds
            # a time
            for i, row_values, row_indices in zip(live, values.tolist(), indices.tolist(), strict=True):
                best, p = row_indices[0], row_values[0]
                results[i].status = "unsure" if self.threshold is not None and p < self.threshold else "ok"
                results[i].index, results[i].label, results[i].probability = best, self.classes[best], p
                results[i].runtime = self.runtime
                results[i].top = [dict(label=self.classes[j], index=j, probability=v)
                                  for v, j in zip(row_values, row_indices, strict=True)]
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


def calibrate_run(run_dir: str | Path, data_dir: str | None = None, offline: bool = False) -> dict[str, Any]:
    """Fit RUN_DIR's calibration on its validation split (this loads the run's dataset) and write
    calibration.json; its contents."""
    from mnistlab.config import TrainConfig
    from mnistlab.data.dataset import load_dataset
    from mnistlab.files import write_json

    predictor = Predictor(run_dir, warn_uncalibrated=False)
    cfg = TrainConfig.from_dict(predictor.meta["config"], source=f"{run_dir}: the checkpoint's config")
    ds = load_dataset(cfg.dataset, data_dir=data_dir or cfg.data_dir, offline=offline or cfg.offline,
                      val_size=cfg.val_size)
    cal = fit_calibration(predictor.logits(ds.val_images), ds.val_labels, predictor.meta["step"])
    write_json(predictor.run_dir / CALIBRATION, cal)
    return cal
