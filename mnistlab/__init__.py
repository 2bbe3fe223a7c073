"""mnistlab: a deep-learning lab around MNIST and its family, with no black boxes.

From Python, the same runs, pictures and answers as the command line:

    import mnistlab
    run = mnistlab.train(dataset="digits", model="cnn", epochs=3)  # `mnistlab train --dataset digits ...`
    clf = mnistlab.load(run.path)         # a run folder, or a model folder from `mnistlab export --format hf`
    clf.predict("seven.png")              # Prediction(status='ok', label='7', probability=0.97, ...)
    clf.predict([path, pil_image, array], top=3)   # same answers and preprocessing as `mnistlab predict`
    clf.logits(images_u8)                 # (N, K) for prepared (N, 28, 28) uint8 images
    clf.classes, clf.model, clf.config    # the torch module is right there

What it offers:
    load(path) -> Classifier      a trained model with its preprocessing and calibration (mnistlab/api.py)
    train(**flags) -> Run         `mnistlab train`'s flags as keywords, checked the same way; quiet=True
    Prediction                    one answer: label, index, probability, status, top, image
    RunRecord                     one reader of a run folder: config, env, metrics, results, the model
    MnistlabError                 the one exception type (the CLI prints it as one line, exit status 2)

Importing the package stays cheap: torch, numpy and matplotlib are imported by the submodules
that need them, never here (`load` and `train` import them when called).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mnistlab.errors import UserError

if TYPE_CHECKING:
    from pathlib import Path

    from mnistlab.api import Classifier, Run
    from mnistlab.deploy.predict import Prediction
    from mnistlab.record import RunRecord

__version__ = "0.1.0"
__all__ = ["Classifier", "MnistlabError", "Prediction", "Run", "RunRecord", "UserError", "load", "train"]

MnistlabError = UserError  # the one exception type, under the name a user of the package looks for

_LAZY = {"Classifier": "mnistlab.api", "Run": "mnistlab.api", "Prediction": "mnistlab.deploy.predict",
         "RunRecord": "mnistlab.record"}


def load(path: str | Path, *, runtime: str | None = None, precision: str = "fp32", warn_uncalibrated: bool = True,
         force_bf16: bool = False) -> Classifier:
    """A trained model from a run folder or an exported model folder: `clf = mnistlab.load("runs/RUN")`;
    runtime ("torch", "onnxruntime") and precision ("fp32", "bf16", "int8") choose what computes its logits."""
    from mnistlab.api import load as load_classifier

    return load_classifier(path, runtime=runtime, precision=precision, warn_uncalibrated=warn_uncalibrated,
                           force_bf16=force_bf16)


def train(*, quiet: bool = False, **flags: Any) -> Run:
    """Train as `mnistlab train` does, with its flags as keywords: `mnistlab.train(dataset="digits", epochs=3)`.

    The loop itself is mnistlab/training.py (a module named apart from this function, so importing it never
    hides this name)."""
    from mnistlab.api import train as train_run

    return train_run(quiet=quiet, **flags)


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mnistlab' has no attribute {name!r}")
