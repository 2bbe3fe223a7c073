"""The Python API behind `mnistlab.load` and `mnistlab.train` (mnistlab/__init__.py documents it).

Nothing here is a second implementation: a Classifier is the Predictor that `mnistlab predict` and
`mnistlab serve` use (deploy/predict.py: the model, the dataset's preprocessing convention, the calibration),
pictures in memory go through the same preprocessing as files (deploy/preprocess.prepare_picture), and
`train(**flags)` parses its flags with the `mnistlab train` parser and trains through the CLI's own
`start_training`, so a flag is checked, resolved and recorded the same way from either side.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, overload

from mnistlab.errors import UserError
from mnistlab.record import RunRecord

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from mnistlab.deploy.predict import Prediction, Predictor
    from mnistlab.deploy.preprocess import Prepared

Picture = Union[str, Path, "Image.Image", "np.ndarray"]  # a file path, a PIL image, or an (H, W) numpy array


class Classifier:
    """A trained model ready for pictures: `mnistlab.load(path)` makes one.

        clf = mnistlab.load("runs/20260101-120000-digits-cnn")
        clf.predict("seven.png").label          # '7'
        clf.predict([pil_image, array], top=3)  # a list in, a list out
        clf.logits(images_u8)                   # (N, K) for prepared (N, 28, 28) uint8 images
        with clf.batched() as b:                # many threads or asyncio tasks at once: one model call per batch
            b.predict("seven.png")              # (await b.apredict(...) from asyncio)

    classes: the class names; model: the torch module (eval mode); config: the training configuration (dict);
    temperature and threshold: the calibration (threshold None: no answer is called unsure); runtime: what computes
    the logits ("torch-fp32" unless load() was told otherwise)."""

    def __init__(self, predictor: Predictor, path: Path) -> None:
        self._predictor = predictor
        self.path = path
        self.classes: list[str] = predictor.classes
        self.model: torch.nn.Module = predictor.model
        self.meta: dict[str, Any] = predictor.meta
        self.config: dict[str, Any] = predictor.meta["config"]
        self.dataset: str = predictor.dataset
        self.temperature: float = predictor.temperature
        self.threshold: float | None = predictor.threshold
        self.runtime: str = predictor.runtime  # what computes the logits: "torch-fp32", "onnxruntime-int8", ...

    def __repr__(self) -> str:
        return (f"Classifier({str(self.path)!r}: {self.meta['model']} on {self.dataset}, {len(self.classes)} classes, "
                f"step {self.meta.get('step')})")

    @overload
    def predict(self, pictures: Picture, top: int = 1) -> Prediction: ...

    @overload
    def predict(self, pictures: list[Picture] | tuple[Picture, ...], top: int = 1) -> list[Prediction]: ...

    def predict(self, pictures: Picture | Sequence[Picture], top: int = 1) -> Prediction | list[Prediction]:
        """The answer for one picture (a Prediction), or a list of answers for a list of pictures: label, index,
        probability (calibrated), status ("ok", "unsure" below the threshold, "blank" when nothing is drawn), the
        `top` best classes, and the 28x28 view the model saw (`.image`). The same as `mnistlab predict`.

            clf.predict("shoe.jpg")                   # Prediction(status='ok', label='Sneaker', ...)
            [p.label for p in clf.predict(["a.png", "b.png"], top=3)]
        """
        _check_top(top)
        one = not isinstance(pictures, list | tuple)
        items = [pictures] if one else list(pictures)
        prepared = [self._prepared(picture, i) for i, picture in enumerate(items)]
        answers = self._predictor.predict_prepared(prepared, top_k=top)
        return answers[0] if one else answers

    def _prepared(self, picture: Picture, i: int = 0) -> tuple[str, Prepared]:
        """(name, the 28x28 view the model sees) of one picture; an unreadable one is a UserError."""
        from mnistlab.deploy.preprocess import UnreadableImage, prepare_picture

        name = str(picture) if isinstance(picture, str | Path) else f"picture {i}"
        try:
            return name, prepare_picture(picture, self.dataset)
        except UnreadableImage as e:
            raise UserError(str(e) if isinstance(picture, str | Path) else f"{name}: {e}") from None

    def batched(self, *, max_batch: int = 32, max_wait_ms: float = 2.0, workers: int = 1) -> BatchedClassifier:
        """This classifier for many callers at once (threads or asyncio tasks): each prepares its own picture,
        and the model calls of pictures that arrive while the model is busy are made as one batch
        (deploy/batcher.py, the server's batcher). A lone picture is answered at once.

            with clf.batched(max_batch=32, max_wait_ms=2) as b:
                answers = list(ThreadPoolExecutor(8).map(b.predict, paths))   # or: await b.apredict(path)
        """
        return BatchedClassifier(self, max_batch=max_batch, max_wait_ms=max_wait_ms, workers=workers)

    def logits(self, images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, K) float32 logits of prepared images: uint8 (N, 28, 28) (or one (28, 28)), light ink on black as the
        dataset's own images are; normalised with the run's mean and std, in batches, under inference mode.

            clf.logits(dataset_images[:8]).argmax(1)
        """
        import numpy as np
        import torch

        batch = torch.from_numpy(np.ascontiguousarray(images_u8)) if isinstance(images_u8, np.ndarray) else images_u8
        if not isinstance(batch, torch.Tensor) or batch.dtype != torch.uint8 or tuple(batch.shape[-2:]) != (28, 28) \
                or batch.dim() not in (2, 3):
            what = (f"{tuple(batch.shape)} {batch.dtype}" if isinstance(batch, torch.Tensor)
                    else type(images_u8).__name__)
            raise UserError(f"logits: expected uint8 images (N, 28, 28), got {what}; "
                            "for pictures of any size use predict()")
        return self._predictor.logits(batch.reshape(-1, 28, 28).cpu())


def _check_top(top: int) -> None:
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise UserError(f"top={top!r}: give a positive whole number of classes to list")


class BatchedClassifier:
    """A Classifier shared by many callers: `clf.batched(...)` makes one. Each call prepares its picture in the
    caller's thread (apredict: in a worker thread), and the model calls go through one Batcher. Close it (or use
    `with`) when done: its model thread stops once the queued pictures are answered."""

    def __init__(self, classifier: Classifier, *, max_batch: int, max_wait_ms: float, workers: int) -> None:
        from mnistlab.deploy.batcher import prediction_batcher

        self.classifier = classifier
        try:
            self._batcher = prediction_batcher(classifier._predictor, max_batch=max_batch, max_wait_ms=max_wait_ms,
                                               workers=workers)
        except ValueError as e:
            raise UserError(f"batched: {e}") from None

    def submit(self, picture: Picture, top: int = 1) -> Future[Prediction]:
        """The picture's answer as a concurrent.futures.Future (the picture is prepared here, before it returns)."""
        from mnistlab.deploy.batcher import Ask

        _check_top(top)
        return self._batcher.submit(Ask(*self.classifier._prepared(picture), top))

    def predict(self, picture: Picture, top: int = 1) -> Prediction:
        """One picture's answer, as Classifier.predict gives it; safe to call from many threads at once."""
        return self.submit(picture, top).result()

    async def apredict(self, picture: Picture, top: int = 1) -> Prediction:
        """predict() for asyncio: the picture is prepared in a worker thread and the answer awaited."""
        import asyncio

        from mnistlab.deploy.batcher import Ask

        _check_top(top)
        name, prepared = await asyncio.to_thread(self.classifier._prepared, picture)
        return await self._batcher.run(Ask(name, prepared, top))

    @property
    def batch_sizes(self) -> list[int]:
        """The size of every model call made so far."""
        return self._batcher.sizes

    def close(self) -> None:
        self._batcher.close()

    def __enter__(self) -> BatchedClassifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(path: str | Path, *, runtime: str | None = None, precision: str = "fp32", warn_uncalibrated: bool = True,
         force_bf16: bool = False) -> Classifier:
    """A Classifier from a training run's folder or an exported model folder (`mnistlab export --format hf`).
    Reads only; anything wrong (no such path, an empty folder, a damaged checkpoint, a pre-training run, ...)
    is one MnistlabError line. runtime ("torch", "onnxruntime") and precision ("fp32", "bf16", "int8") choose what
    computes the logits, as `mnistlab predict --runtime --precision` do (docs/deploy.md); force_bf16: bf16 on a CPU
    without native bf16.

        clf = mnistlab.load("runs/20260101-120000-digits-cnn")
        clf = mnistlab.load("runs/20260101-120000-digits-cnn", precision="int8")  # after export --quantize int8
    """
    from mnistlab.deploy.predict import Predictor

    predictor = Predictor.open(path, runtime=runtime, precision=precision, warn_uncalibrated=warn_uncalibrated,
                               force_bf16=force_bf16)
    return Classifier(predictor, Path(path))


@dataclass(frozen=True)
class Run:
    """A finished training run, as `mnistlab.train` returns it: the folder, results.json, and the model.

        run = mnistlab.train(dataset="digits", model="cnn", epochs=3)
        run.results["test_accuracy"], run.path
        clf = run.load()
    """

    path: Path
    results: dict[str, Any]

    @property
    def record(self) -> RunRecord:
        """The run folder's reader: config(), env(), metrics(), results(), load_model()."""
        return RunRecord(self.path)

    def load(self) -> Classifier:
        return load(self.path)


class _RaisingParser(argparse.ArgumentParser):
    """The `mnistlab train` parser, with its complaints raised as the one exception type instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)


def _train_parser() -> argparse.ArgumentParser:
    from mnistlab.cli import _add_train_parser

    root = _RaisingParser(prog="mnistlab")
    sub = root.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    return root


def _flag_words(flag: str, value: Any, action: argparse.Action) -> list[str]:
    """The command-line words of one Python keyword: `epochs=3` -> ['--epochs', '3']."""
    if value is None or (value is False and action.nargs == 0):
        return []
    if action.nargs == 0:
        if value is not True:
            raise UserError(f"{flag} is a switch: give True or False, not {value!r}")
        return [flag]
    if flag == "--model-arg":
        pairs = value.items() if isinstance(value, dict) else [v if isinstance(v, tuple) else
                                                                 tuple(str(v).split("=", 1)) for v in value]
        return [w for k, v in pairs for w in (flag, f"{k}={v if isinstance(v, str) else json.dumps(v)}")]
    if isinstance(value, list | tuple):
        return [flag, ",".join(map(str, value))]
    return [flag, str(value)]


def train_args(flags: dict[str, Any]) -> argparse.Namespace:
    """The namespace `mnistlab train` would parse from the same flags, given as Python keywords (dashes as
    underscores: model_arg={"widths": [16, 32]}, run_dir="runs/a"). An unknown or bad flag is a UserError."""
    root = _train_parser()
    parser = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    words = ["train"]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if name not in actions:
            near = difflib.get_close_matches(flag, ["--" + n.replace("_", "-") for n in actions], n=1)
            raise UserError(f"unknown flag {flag}" + (f"; did you mean {near[0]}?" if near else
                                                      "; `mnistlab train --help` lists the flags"))
        words += _flag_words(flag, value, actions[name])
    return root.parse_args(words)


def train(*, quiet: bool = False, **flags: Any) -> Run:
    """Train as `mnistlab train` does with the same flags (dashes as underscores); return the finished Run.
    Progress bars and notes go to stderr and the epoch lines to stdout, as the CLI's do; quiet=True silences them.

        run = mnistlab.train(dataset="digits", model="cnn", epochs=3, quiet=True)
        run.results["test_accuracy"]
    """
    from mnistlab.cli import start_training

    args = train_args(flags)
    with contextlib.ExitStack() as stack:
        if quiet:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        run_dir = start_training(args, progress=not quiet)
    return Run(Path(run_dir), RunRecord(run_dir).results())
