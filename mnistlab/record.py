"""One reader of a run folder: what `mnistlab train` (either engine) or `mnistlab pretrain` left on disk.

    from mnistlab.record import RunRecord
    record = RunRecord("runs/20260101-120000-digits-cnn")
    record.config()["model"], record.results()["test_accuracy"], len(record.metrics())
    model, meta = record.load_model()          # rebuilt from the checkpoint alone (no data, no training code)

The file names are run.py's (written there), the checkpoint format is checkpoint.py's and calibration.json is
calibration.py's; everything else that reads a finished run (predict, serve, export, report, the leaderboard,
`mnistlab eval`, `mnistlab.load`) reads it here, never through the training module. Every failure is one
`UserError` line naming the file and what is wrong with it (a RunFolderError, or checkpoint.py's own for a
damaged checkpoint): never a KeyError or a traceback from inside. Reading never writes to the folder.

Importing this module is cheap (no torch): the leaderboard and the numpy engine read run folders without it;
`load_model` and `read_checkpoint` import torch when called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnistlab.errors import UserError
from mnistlab.run import CHECKPOINT, CONFIG, ENV, LOCK, METRICS, RESULTS, read_metrics

if TYPE_CHECKING:
    import torch

    from mnistlab.checkpoint import Read


# deploy/model_folder.py's WEIGHTS (this module sits below deploy/; tests/test_record.py keeps the two equal)
MODEL_FOLDER_WEIGHTS = "model.safetensors"


class RunFolderError(UserError):
    """A run folder, or one of its files, that cannot be read as asked."""


class NotARunFolder(RunFolderError):
    """The path is missing, not a folder, empty, or holds no run."""


class MissingRunFile(RunFolderError):
    """A run folder without a file the reader needs (results.json of an unfinished run, a removed checkpoint)."""


class DamagedRunFile(RunFolderError):
    """A run file that is there but is not what mnistlab wrote (not JSON, not a JSON object)."""


class RunRecord:
    """A run folder, read-only. Nothing is read until asked; each reader reads its file afresh."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunRecord({str(self.path)!r})"

    def file(self, name: str) -> Path:
        """The path of one of the run's files (run.py's names: CONFIG, RESULTS, ...)."""
        return self.path / name

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def require_folder(self) -> None:
        """Refuse, in one line, a path that is missing, not a folder, empty, or holds no run."""
        if not self.path.exists():
            raise NotARunFolder(f"{self.path}: no such run folder")
        if not self.path.is_dir():
            raise NotARunFolder(f"{self.path}: not a folder (a run folder is what `mnistlab train` writes)")
        names = {p.name for p in self.path.iterdir()}
        if not names:
            raise NotARunFolder(f"{self.path}: an empty folder, not a run folder (no {CONFIG}, no {CHECKPOINT})")
        if names == {LOCK}:
            raise NotARunFolder(f"{self.path}: holds only {LOCK} (a run that stopped before its first checkpoint)")
        if CONFIG not in names and not any(n.startswith("checkpoint") and n.endswith(".safetensors") for n in names):
            raise NotARunFolder(f"{self.path}: not a run folder (no {CONFIG}, no {CHECKPOINT})")

    # the JSON files
    def read_json(self, name: str) -> Any:
        """A run file's JSON value; a missing file is MissingRunFile, unreadable JSON DamagedRunFile."""
        path = self.path / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise MissingRunFile(f"{path}: no such file") from None
        except (OSError, ValueError) as e:
            raise DamagedRunFile(f"{path}: not readable JSON ({e})") from None

    def _object(self, name: str) -> dict[str, Any]:
        value = self.read_json(name)
        if not isinstance(value, dict):
            raise DamagedRunFile(f"{self.path / name}: not a JSON object (a {type(value).__name__})")
        return value

    def config(self) -> dict[str, Any]:
        """config.json: the TrainConfig (or PretrainConfig) as it was saved when the run began."""
        return self._object(CONFIG)

    def env(self) -> dict[str, Any]:
        """env.json: the run's provenance (versions, device, commit, data hashes)."""
        return self._object(ENV)

    def results(self) -> dict[str, Any]:
        """results.json: the final evaluation (test accuracy, seconds, parameters); only a finished run has it."""
        if not self.has(RESULTS) and self.path.is_dir():
            hint = f"; `mnistlab train --resume {self.path}` finishes it" if self.has(CONFIG) else ""
            raise MissingRunFile(f"{self.path}: no {RESULTS} (not a finished run){hint}")
        return self._object(RESULTS)

    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl: one record per finished epoch ([] when there is none; a torn last line is dropped)."""
        return read_metrics(self.path / METRICS)

    def calibration(self, step: int) -> tuple[dict[str, Any] | None, str]:
        """(calibration.json's contents, "") when it was fitted for the checkpoint at `step`, else (None, why not)."""
        from mnistlab.calibration import read_calibration

        return read_calibration(self.path, step)

    def is_pretraining(self) -> bool:
        """Whether this is a `mnistlab pretrain` run: its results say so, or its config has pre-training fields
        (an unfinished one has no results yet)."""
        from mnistlab.checkpoint import PRETRAIN_KIND
        from mnistlab.config import PretrainConfig, TrainConfig

        if self.has(RESULTS):
            results = self.read_json(RESULTS)
            if isinstance(results, dict) and results.get("kind") == PRETRAIN_KIND:
                return True
        if not self.has(CONFIG):
            return False
        config = self.read_json(CONFIG)
        only_pretrain = set(PretrainConfig.__dataclass_fields__) - set(TrainConfig.__dataclass_fields__)
        return isinstance(config, dict) and bool(only_pretrain & set(config))

    # the checkpoint
    def read_checkpoint(self) -> Read:
        """(tensors, meta) of the run's checkpoint, its hash checked (checkpoint.read_checkpoint)."""
        from mnistlab.checkpoint import read_checkpoint

        self.require_folder()
        if not self.has(CHECKPOINT):
            if self.has(MODEL_FOLDER_WEIGHTS):
                why = ("an exported model folder, not a run folder: `mnistlab predict`, `mnistlab serve` and "
                       "`mnistlab.load` take it; this needs the run it was exported from")
            elif self.has(RESULTS):
                why = "its checkpoint is missing (the run finished, so the file was moved or deleted)"
            elif self.has(CONFIG):
                why = f"no {CHECKPOINT} yet (the run never finished an epoch; `mnistlab train --resume` continues it)"
            else:
                why = f"no {CHECKPOINT}"
            raise MissingRunFile(f"{self.path}: {why}")
        return read_checkpoint(self.file(CHECKPOINT))

    def load_model(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The trained classifier (either engine; in eval mode) and its checkpoint metadata (checkpoint.RUN_META:
        model, model_kwargs, classes, mean, std, config, step, ...). A pre-training run is refused: it holds an
        encoder, no classifier."""
        from mnistlab.checkpoint import PRETRAIN_KIND, RUN_META, require_meta

        read = self.read_checkpoint()
        meta = read[1]
        if meta.get("kind") == PRETRAIN_KIND:
            raise RunFolderError(f"{self.path}: a pre-training run (an encoder, no classifier); fine-tune it with "
                                 f"`mnistlab train --model {meta.get('model')} --init {self.path}`")
        require_meta(meta, RUN_META, self.file(CHECKPOINT))
        if meta.get("engine") == "scratch":
            from mnistlab.scratch.train import load_model as load_scratch

            return load_scratch(self.file(CHECKPOINT), read)
        from mnistlab.checkpoint import load_model

        return load_model(self.file(CHECKPOINT), read=read)


def load_run_checkpoint(run_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model of a run folder (either engine) and its checkpoint metadata (RunRecord.load_model)."""
    return RunRecord(run_dir).load_model()
