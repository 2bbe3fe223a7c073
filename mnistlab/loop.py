"""The epoch loop every engine runs: batches in a seeded order, the learning-rate schedule, running
sums, progress, per-epoch validation, metrics and checkpoints. An engine supplies only its step: the
torch and numpy engines (training.py, scratch/) and masked-patch pre-training (pretrain.py), which has
no labels and so no accuracy: its step and validation return None for it, and its metrics records
carry losses only.

Exact resume: every source of randomness is a pure function of (seed, epoch) or (seed, step): the
epoch's permutation (data.batches.epoch_permutation) and the engine's RNG, reseeded from
step_seed(seed, step) before each step (dropout, augmentation). So a checkpoint needs only weights,
optimizer state, the step and this epoch's running sums: a run killed at any moment and resumed from
its last checkpoint ends bit-identical to an uninterrupted one (CPU, same thread count).

What the loop needs of an engine is the `Engine` class below: a subclass sets its device and supplies
the step, the validation and the checkpoint; the rest has one-process defaults that training.py's
TorchEngine overrides under torchrun.

Under torchrun (an engine with `distributed` set, training.py) each process returns its part of a step's
loss and count; the pending steps are summed over the processes in one collective every 10 steps and at
the epoch's end (`reduce_steps`), and a Ctrl-C is honoured at those points only, by every process at
the same step (`any_rank`), so that no process waits for a peer that has stopped.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from mnistlab.config import PretrainConfig, TrainConfig
from mnistlab.errors import UserError
from mnistlab.run import RunFolder, StopFlag, epoch_summary, kill_point_for_tests, note, say

if TYPE_CHECKING:
    from mnistlab.tensorboard import TensorBoardLog

LoopConfig = TrainConfig | PretrainConfig  # the loop reads epochs, batch_size, lr, schedule, warmup, seed


class TrainingDiverged(UserError):
    """The loss or the weights became NaN or infinite."""

    exit_code = 1


def get_lr(step: int, total_steps: int, cfg: LoopConfig) -> float:
    """Learning rate at `step`: linear warm-up, then the schedule's decay. A pure function."""
    warmup = max(1, round(cfg.warmup * total_steps))
    if step < warmup:
        start = cfg.lr / 25 if cfg.schedule == "onecycle" else 0.0
        return start + (cfg.lr - start) * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1, total_steps - warmup)  # 0 -> 1
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (1 - progress) + (cfg.lr / 1e4) * progress  # onecycle: linear anneal to ~0


def step_seed(seed: int, step: int) -> int:
    """The RNG seed of one step: dropout masks and augmentation are a function of (seed, step)."""
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**63 - 1)


@dataclass
class TrainState:
    """Where a run stands: all a checkpoint must carry besides weights and optimizer state."""

    step: int = 0
    best_val_accuracy: float = 0.0
    train_seconds: float = 0.0
    # running sums of the current epoch, so that a mid-epoch resume reports the epoch whole
    epoch_loss_sum: float = 0.0
    epoch_correct: int = 0
    epoch_seen: int = 0
    epoch_seconds: float = 0.0

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TrainState:
        missing = [k for k in cls.__dataclass_fields__ if k not in meta]
        if missing:
            raise UserError(f"the checkpoint lacks {', '.join(missing)} (written by an older mnistlab, format "
                            f"{meta.get('format_version', 1)}); resume it with that version, or start a new run")
        return cls(**{k: meta[k] for k in cls.__dataclass_fields__})


class Engine:
    """Everything the loop reads of an engine. A subclass supplies `train_step`, `validate` and `save`; the
    class attributes and the two collectives are the one-process defaults (TorchEngine sets its own)."""

    device: Any = "cpu"  # where the epoch permutation lives (a torch.device or its name)
    command: str = "train"  # the subcommand that continues an interrupted run: `mnistlab <command> --resume`
    resumable: bool = True  # False: its checkpoint holds weights only (the numpy engine)
    distributed: bool = False  # True: several processes share each step (reduce_steps, any_rank)

    def train_step(self, idx: Any, step: int, lr: float) -> tuple[Any, Any]:
        """Apply one step on the training images `idx`; return (mean loss, number correct or None),
        unsynchronised."""
        raise NotImplementedError

    def validate(self) -> tuple[float, float | None]:
        """(loss, accuracy or None) on the validation split."""
        raise NotImplementedError

    def save(self, state: TrainState) -> None:
        """Write the checkpoint for `state` (atomically)."""
        raise NotImplementedError

    def reduce_steps(self, values: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        """Pending steps' (loss, correct) summed over the processes (distributed engines only)."""
        return values

    def any_rank(self, flag: bool) -> bool:
        """`flag` as every process sees it: under torchrun, true on all when true on any."""
        return flag


def train_one_epoch(cfg: LoopConfig, engine: Engine, state: TrainState, n_train: int, total_steps: int,
                    stop: StopFlag, progress: bool, run_path: Any) -> bool:
    """Run the steps left in the current epoch (all of them, or from a mid-epoch checkpoint); True when it
    stopped early for a Ctrl-C."""
    from mnistlab.data.batches import epoch_permutation  # torch: here, so that the numpy engine imports this freely

    together = engine.distributed  # torchrun: sums and stops agreed between processes
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    epoch = state.step // steps_per_epoch
    perm = epoch_permutation(n_train, cfg.seed, epoch, engine.device)
    # (step, lr, loss, correct, n) per step, read back in bulk: no device sync per step
    pending: list[tuple[int, float, Any, Any, int]] = []

    def flush() -> None:
        if together and pending:
            sums = engine.reduce_steps([(loss, correct) for _, _, loss, correct, _ in pending])
            pending[:] = [(p[0], p[1], loss, correct, p[4]) for p, (loss, correct) in zip(pending, sums, strict=True)]
        for step, lr, loss, correct, n in pending:  # one addition at a time: the same sums whenever we flush
            if not math.isfinite(float(loss)):
                raise TrainingDiverged(
                    f"the loss became {float(loss)} at step {step} (lr {lr:.3g}); nothing was saved from this "
                    f"epoch. Try a lower --lr or --grad-clip. The last checkpoint (if any) is intact in {run_path}")
            state.epoch_loss_sum += float(loss) * n
            state.epoch_correct += int(correct) if correct is not None else 0
            state.epoch_seen += n
        pending.clear()

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps_per_epoch, initial=state.step % steps_per_epoch, leave=False, unit="step",
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr)
    t0, seconds_before = time.perf_counter(), state.epoch_seconds
    stopped = False
    for i in range(state.step % steps_per_epoch, steps_per_epoch):
        idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        lr = get_lr(state.step, total_steps, cfg)
        loss, correct = engine.train_step(idx, state.step, lr)
        pending.append((state.step, lr, loss, correct, len(idx)))
        state.step += 1
        kill_point_for_tests("step", state.step)
        sync_point = i % 10 == 0  # under torchrun every process flushes here, bar or not (only rank 0 has one)
        if sync_point and (together or bar is not None):
            flush()
        if bar is not None:
            bar.update(1)
            if sync_point:
                rate = state.epoch_seen / max(seconds_before + time.perf_counter() - t0, 1e-9)
                shown = dict(loss=f"{state.epoch_loss_sum / state.epoch_seen:.4f}")
                if correct is not None:
                    shown["acc"] = f"{state.epoch_correct / state.epoch_seen:.2%}"
                bar.set_postfix(**shown, img_s=f"{rate:,.0f}")
        if (sync_point or not together) and engine.any_rank(stop.requested):
            stopped = True
            break
    if bar is not None:
        bar.close()
    flush()
    elapsed = time.perf_counter() - t0
    state.epoch_seconds += elapsed
    state.train_seconds += elapsed
    return stopped


def end_of_epoch(cfg: LoopConfig, engine: Engine, state: TrainState, run: RunFolder, epoch: int, lr: float,
                 tensorboard: TensorBoardLog | None = None) -> None:
    """Validate, append the epoch's metrics record (and its TensorBoard events), checkpoint, report; start the
    next epoch's sums."""
    val_loss, val_accuracy = engine.validate()
    if not math.isfinite(val_loss):
        raise TrainingDiverged(f"the weights became non-finite in epoch {epoch} (validation loss {val_loss}); "
                               "nothing was saved from this epoch. Try a lower --lr or --grad-clip. "
                               f"The last checkpoint (if any) is intact in {run.path}")
    seen = max(state.epoch_seen, 1)
    record = dict(epoch=epoch, step=state.step, train_loss=state.epoch_loss_sum / seen,
                  train_accuracy=state.epoch_correct / seen, val_loss=val_loss, val_accuracy=val_accuracy, lr=lr,
                  seconds=state.epoch_seconds, images_per_second=state.epoch_seen / max(state.epoch_seconds, 1e-9))
    if val_accuracy is None:  # an engine without labels (pre-training): losses only
        del record["train_accuracy"], record["val_accuracy"]
    else:
        state.best_val_accuracy = max(state.best_val_accuracy, val_accuracy)
    run.append_metrics(record)
    if tensorboard is not None:  # before the checkpoint, as the metrics: a resume redoes (and purges) this epoch
        tensorboard.log_epoch(record)
    kill_point_for_tests("metrics", epoch)
    state.epoch_loss_sum, state.epoch_correct, state.epoch_seen, state.epoch_seconds = 0.0, 0, 0, 0.0
    engine.save(state)
    say(epoch_summary(record, cfg.epochs))


def fit(cfg: LoopConfig, engine: Engine, state: TrainState, run: RunFolder, n_train: int,
        progress: bool, tensorboard: TensorBoardLog | None = None) -> None:
    """Train from `state` to the last step: epochs of steps, each ended by validation and a checkpoint.

    With `tensorboard` (--tensorboard), each epoch's end is recorded there too. Ctrl-C finishes the current
    step, checkpoints (mid-epoch too) and raises KeyboardInterrupt.
    """
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    with StopFlag() as stop:
        while state.step < total_steps:
            stopped = train_one_epoch(cfg, engine, state, n_train, total_steps, stop, progress, run.path)
            if stopped and state.step % steps_per_epoch:
                engine.save(state)
                note(f"interrupted at step {state.step}/{total_steps}; checkpoint saved. "
                     f"{_how_to_continue(engine, run)}")
                raise KeyboardInterrupt
            epoch = state.step // steps_per_epoch
            end_of_epoch(cfg, engine, state, run, epoch, get_lr(state.step - 1, total_steps, cfg), tensorboard)
            if engine.any_rank(stop.requested):
                note(f"interrupted at the end of epoch {epoch}; checkpoint saved. {_how_to_continue(engine, run)}")
                raise KeyboardInterrupt


def _how_to_continue(engine: Engine, run: RunFolder) -> str:
    if engine.resumable:
        return f"Continue with: mnistlab {engine.command} --resume {run.path}"
    return f"This engine does not resume; `mnistlab eval {run.path}` evaluates the saved weights."
