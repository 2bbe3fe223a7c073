"""Training with torch: set up a run, then the loop, then the final evaluation. After nanoGPT's train.py.

    mnistlab train                                   # default CNN on MNIST (downloads it once)
    mnistlab train --dataset digits                  # offline, seconds
    mnistlab train --recipe fast --dataset fashion-mnist
    mnistlab train --resume runs/<run>               # continue exactly where it stopped
    mnistlab train --model vit --init runs/<pretrain run> --labels-per-class 100   # fine-tune on 1,000 labels

Read top to bottom: `TorchEngine` builds data, model and optimizer and does one step (`get_batch`, forward,
loss, backward, clip, step), `validate` and `save`; `train` refuses what it can before any data or folder,
loads the data, opens the run folder (run.py) and hands the engine to `fit` (loop.py, shared with the numpy
engine and pre-training), which runs the epochs (with --tensorboard, tensorboard.py's writer records each
epoch's end); `final_eval` writes results.json. What a run shares with pre-training (device, precision,
optimizer, the out-of-memory guard, process settings, checkpoint save and restore, resume) is lifecycle.py.
Under torchrun the same code runs in every process (distributed.py): each trains on its share of the global
batch through DDP, metrics and evaluations are summed over the processes, and rank 0 writes the folder. The
training state is one object (loop.TrainState) that a checkpoint carries. --init starts the encoder from a
pre-training run (`load_pretrained_encoder`), --freeze-encoder leaves only the head trainable,
--labels-per-class trains on a seeded stratified subset (data/subset.py, which also says what an epoch is then).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mnistlab import distributed, gradflow
from mnistlab.checkpoint import CHECKPOINT, PRETRAIN_KIND, Read, prefixed, read_checkpoint
from mnistlab.config import TrainConfig, model_label
from mnistlab.data.batches import augment_batch, random_erase, shifted_crops, to_input
from mnistlab.data.dataset import Dataset, load_dataset
from mnistlab.data.subset import SUBSET_FILE, with_labelled_subset
from mnistlab.errors import UserError
from mnistlab.evaluate import EvalResult, evaluate
from mnistlab.lifecycle import (
    apply_process_settings,
    finished_results,
    make_optimizer,
    memory_errors_as_user_error,
    pick_device,
    pick_precision,
    process_settings,
    resume_config,
    run_folder,
    save_run_checkpoint,
    starting_state,
)
from mnistlab.loop import Engine, TrainingDiverged, TrainState, fit, step_seed
from mnistlab.models import create_model
from mnistlab.models.flops import count_params
from mnistlab.run import CONFIG, ENV, RESULTS, RunFolder, environment, note, plural
from mnistlab.tensorboard import TB_DIR, TensorBoardLog, require_tensorboard

MAX_SHIFT = 2  # --augment shift moves images by up to this many pixels
DATA_INIT_IMAGES = 5_000  # a model's data-dependent layers are set from this many training images


def data_init_sample(n_train: int) -> torch.Tensor:
    """Which training images set a model's data-dependent layers (DATA_INIT_IMAGES of them, or all): a sample fixed
    by seed 0, not the first ones (a dataset stored by class, or a --labels-per-class subset's repeats, would skew
    those), the same for every run of a dataset whatever its --seed."""
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(0))[:DATA_INIT_IMAGES]


class TorchEngine(Engine):
    """One training run's torch objects and its step; the loop (loop.fit) drives it. A context manager: leaving
    it closes the TensorBoard writer and drops the DDP wrapper (before the process group goes)."""

    def __init__(self, cfg: TrainConfig, ds: Dataset, device: torch.device, run: RunFolder,
                 first_step: int = 0) -> None:
        self.cfg, self.ds, self.device, self.run = cfg, ds, device, run
        self.world = distributed.world()
        self.distributed = self.world.distributed  # the loop sums running metrics over ranks (reduce_steps)
        self.precision = pick_precision(cfg.precision, device)
        self.train_x, self.train_y = ds.train_images.to(device), ds.train_labels.to(device)
        self.val_x, self.val_y = ds.val_images.to(device), ds.val_labels.to(device)
        self.model = self._build_model()
        self.optimizer = make_optimizer(self.model, cfg)
        # what the training step calls: DDP under torchrun, compiled with --compile; self.model stays the bare
        # module that checkpoints, evaluation and the figures use
        self.net = distributed.wrap(self.model, device)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.hflip = cfg.hflip == "on" or (cfg.hflip == "auto" and ds.mirror_symmetric)
        self.tta = cfg.tta == "on" or (cfg.tta == "auto" and self.hflip)
        self.shift_tta = cfg.tta_shifts == "on" or (cfg.tta_shifts == "auto" and cfg.augment == "shift")
        self.background = (0.0 - ds.mean) / ds.std  # normalised value of a black pixel
        # shifts: every image with MAX_SHIFT black pixels around it, once, so a shifted image is a window of it
        self.padded_x = F.pad(self.train_x, (MAX_SHIFT,) * 4) if cfg.augment == "shift" else None  # (N, H+4, W+4)
        self.steps_per_epoch = math.ceil(len(ds.train_labels) / cfg.batch_size)
        self.flow_steps, self.tensorboard, self.tensorboard_grad_steps = self._diagnostics(first_step)
        self.model.train()

    def _build_model(self) -> torch.nn.Module:
        """The seeded initial weights, in channels-last (faster convs on CPU and GPU; a no-op for 2-D tensors)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, in_chans=1, num_classes=self.ds.num_classes, **cfg.model_kwargs)
        model = model.to(self.device).to(memory_format=torch.channels_last)
        init_from_data = getattr(model, "init_from_data", None)
        if init_from_data is not None:  # a layer set from the data (the CNN's whiten=true), from a fixed sample
            init_from_data(lambda: to_input(self.train_x[data_init_sample(len(self.train_x))], self.ds.mean,
                                            self.ds.std))
        if cfg.freeze_encoder:  # a linear probe: only the head learns (before the optimizer, which takes the rest)
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("head."))
        if cfg.sync_bn and self.distributed:  # same parameter names: checkpoints load into plain BatchNorm
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def _diagnostics(self, first_step: int) -> tuple[set[int], TensorBoardLog | None, set[int]]:
        """--grad-flow's steps; --tensorboard's writer and the steps whose gradients it keeps (the last of each
        epoch). Rank 0 only. A run resumed at `first_step` drops the records, and hides the events, it redoes."""
        cfg, ds = self.cfg, self.ds
        epoch_ends = {e * self.steps_per_epoch - 1 for e in range(1, cfg.epochs + 1)}
        flow_steps: set[int] = set()
        if cfg.grad_flow and self.run.writes:
            flow_steps = set(cfg.grad_flow_steps) if cfg.grad_flow_steps is not None else {0, *epoch_ends}
            gradflow.keep_before(self.run.path, first_step)
        if not (cfg.tensorboard and self.run.writes):
            return flow_steps, None, set()
        log = TensorBoardLog(self.run.path, self.model, ds.val_images, ds.val_labels, ds.classes, ds.mean, ds.std,
                             purge_step=first_step + 1)
        return flow_steps, log, epoch_ends

    def __enter__(self) -> TorchEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.net = None  # the DDP wrapper holds the process group, which distributed.stop tears down

    def meta(self) -> dict[str, Any]:
        """What the checkpoint's header carries besides the training state: enough to rebuild the model alone."""
        cfg, ds = self.cfg, self.ds
        return dict(model=cfg.model, model_kwargs=cfg.model_kwargs, in_chans=1, num_classes=ds.num_classes,
                    classes=list(ds.classes), mean=ds.mean, std=ds.std, config=cfg.to_dict(),
                    hflip_tta=self.tta, shift_tta=self.shift_tta, total_steps=self.steps_per_epoch * cfg.epochs)

    def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised, augmented images (B, 1, H, W) and labels (B,) of training indices `idx`."""
        if self.padded_x is not None:
            x = to_input(shifted_crops(self.padded_x, idx, MAX_SHIFT, self.hflip), self.ds.mean, self.ds.std)
        else:
            x = augment_batch(to_input(self.train_x[idx], self.ds.mean, self.ds.std), self.cfg.augment,
                              self.background, hflip=self.hflip)
        return random_erase(x, self.cfg.erase, self.background), self.train_y[idx]

    def autocast(self, enabled: bool = True) -> torch.autocast:
        """bf16 autocast with --precision bf16 (and `enabled`); a no-op context in fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled and self.precision == "bf16")

    def train_step(self, idx: torch.Tensor, step: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the global batch `idx` (B,); returns (loss, number correct) as device tensors
        (the loop checks the loss is finite when it reads them back, so there is no device sync per step).

        Under torchrun this rank computes its share (distributed.shard) and returns its part of the batch's
        mean loss and its count of correct answers, which the loop sums over ranks (reduce_steps)."""
        # dropout and augmentation of this step; each rank its own stream (rank 0's is the one-process one)
        torch.manual_seed(step_seed(self.cfg.seed, step) + self.world.rank)
        mine = distributed.shard(idx)  # (b,), b = B / world size
        # DDP averages the ranks' gradients: weighting each rank's mean loss by world size x its share makes that
        # average the gradient of the mean over the global batch, exactly, when shares are uneven too
        weight = len(mine) * self.world.size / len(idx)
        if len(mine) == 0:  # a last batch smaller than the world: this rank still steps, with weight 0
            mine = idx[:1]
        with memory_errors_as_user_error(len(idx), "--batch-size", self.device):
            x, y = self.get_batch(mine)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with self.autocast():
                logits = self.net(x)  # (b, K)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            (loss if weight == 1.0 else loss * weight).backward()
            if step in self.flow_steps:  # raw gradients, before clipping: clipping would hide an explosion
                gradflow.record(self.run.path, step, self.model, x, y)
            if step in self.tensorboard_grad_steps:  # the epoch's last gradients, before clipping (as grad-flow)
                self.tensorboard.keep_grads()
            if self.cfg.grad_clip:
                # foreach: all norms in one pass (CPU defaults to one op per tensor plus a cat)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip, foreach=True)
            self.optimizer.step()
        correct = (logits.detach().argmax(1) == y).sum()
        if self.distributed:  # this rank's part of the global mean; the loop sums the parts
            return loss.detach() * (weight / self.world.size), correct * (weight > 0)
        return loss.detach(), correct

    def reduce_steps(self, values: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[float, int]]:
        """Pending steps' (loss part, correct) summed over the ranks in one collective: the global batch's
        mean loss and its count of correct answers per step."""
        sums = torch.stack([torch.stack([loss.float(), correct.float()]) for loss, correct in values])  # (S, 2)
        sums = distributed.sum_over_ranks(sums).tolist()
        return [(loss, round(correct)) for loss, correct in sums]

    def any_rank(self, flag: bool) -> bool:
        """`flag` on any rank (Ctrl-C): every rank must stop at the same step."""
        if not self.distributed:
            return flag
        return bool(distributed.sum_over_ranks(torch.tensor([float(flag)], device=self.device)).item())

    def validate(self) -> tuple[float, float]:
        """Per-epoch validation: flips if trained with them, never the 9x shift views (final_eval has them)."""
        val = self.evaluate(self.val_x, self.val_y, shift_tta=False)
        return val.loss, val.accuracy

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, shift_tta: bool, fp32: bool = False) -> EvalResult:
        """Loss and accuracy on images `x` (N, H, W); under torchrun each rank evaluates its share of them with
        rank 0's weights and buffers and the sums are combined (predictions are then not kept). Per-epoch
        validation runs at the training precision; fp32=True (the final evaluation) computes as `mnistlab eval`
        does, so results.json and eval agree."""
        n = len(y)  # all the images, over every rank
        if self.distributed:
            distributed.sync_buffers(self.model)
            x, y = distributed.shard(x), distributed.shard(y)
        with (memory_errors_as_user_error(self.cfg.eval_batch_size, "--eval-batch-size", self.device),
              self.autocast(enabled=not fp32)):
            result = evaluate(self.model, x, y, self.ds.mean, self.ds.std, self.cfg.eval_batch_size, self.tta,
                              shift_tta)
        if not self.distributed:
            return result
        m = len(result.labels)
        sums = torch.tensor([result.loss * m, result.accuracy * m], dtype=torch.float64, device=self.device)
        loss_sum, correct = distributed.sum_over_ranks(sums).tolist()
        empty = torch.zeros(0, dtype=torch.long)
        return EvalResult(loss=loss_sum / n, accuracy=round(correct) / n, predictions=empty, labels=empty)

    def save(self, state: TrainState) -> None:
        # the running sums of an unfinished epoch travel in the header, so its metrics stay whole on resume.
        # Under torchrun rank 0 writes (every rank holds the same weights) and the others wait for it: the
        # collective that tells them whether it found the weights non-finite is also the barrier.
        diverged = None
        if self.run.writes:
            try:
                save_run_checkpoint(self.run, self.model, self.optimizer, self.meta(), state)
            except TrainingDiverged as e:
                diverged = e
        if self.any_rank(diverged is not None) and diverged is None:
            raise TrainingDiverged(f"rank 0 found the weights non-finite by step {state.step}; its message says more")
        if diverged is not None:
            raise diverged

    def start_from_init(self, init: Read) -> dict[str, Any]:
        """Step 0 of an --init run: the pre-trained encoder's weights; returns what env.json records of them."""
        return load_pretrained_encoder(self.model, self.cfg, self.ds.name, init)


def read_init(cfg: TrainConfig) -> Read:
    """The checkpoint of the pre-training run `cfg.init`, checked before any data is loaded or folder made: a
    finished `mnistlab pretrain` run whose encoder fits the model this run builds."""
    ckpt = Path(cfg.init) / CHECKPOINT
    if not ckpt.is_file():
        raise UserError(f"--init {cfg.init}: no {CHECKPOINT} there (not a `mnistlab pretrain` run folder, or one "
                        "that never finished an epoch)")
    read = read_checkpoint(ckpt)
    meta = read[1]
    if meta.get("kind") != PRETRAIN_KIND:
        raise UserError(f"--init {cfg.init}: a training run, not a `mnistlab pretrain` run (--init takes the encoder "
                        "of a pre-training run)")
    if not (Path(cfg.init) / RESULTS).is_file():
        raise UserError(f"--init {cfg.init}: its pre-training stopped at step {meta.get('step')} of "
                        f"{meta.get('total_steps')}; finish it first with `mnistlab pretrain --resume {cfg.init}`")
    _check_encoder_fits(create_model(cfg.model, in_chans=1, num_classes=1, **cfg.model_kwargs), cfg, read)
    return read


def _check_encoder_fits(model: torch.nn.Module, cfg: TrainConfig, read: Read) -> None:
    """Refuse in one line another model, or the same model with options that give other weights (patch, dim,
    depth, heads, mlp_ratio, pool); options that only change the computation (dropout) may differ."""
    tensors, meta = read
    encoder = _encoder_weights(tensors)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    if meta["model"] != cfg.model:
        problem = f"train --model {meta['model']}"
    elif set(own) != set(encoder):
        problem = f"{sorted(set(own) ^ set(encoder))[0]} is in one and not the other"
    else:
        problem = next((f"{k} is {tuple(encoder[k].shape)} there, {tuple(own[k].shape)} here" for k in own
                        if own[k].shape != encoder[k].shape), None)
    if problem is not None:
        raise UserError(f"--init {cfg.init}: its encoder is {model_label(meta['model'], meta['model_kwargs'])}, "
                        f"this run builds {model_label(cfg.model, cfg.model_kwargs)}; they do not match "
                        f"({problem}): give the pre-training's --model and --model-arg values")


def _encoder_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A pre-training checkpoint's encoder weights, named as in the model they go into."""
    return {k.removeprefix("encoder."): v for k, v in prefixed(tensors, "model").items() if k.startswith("encoder.")}


def load_pretrained_encoder(model: torch.nn.Module, cfg: TrainConfig, dataset: str,
                            init: Read | None = None) -> dict[str, Any]:
    """Copy the encoder of the pre-training run `cfg.init` into `model`, every weight but the head's (`init`: its
    checkpoint as read_init returned it). Returns the provenance env.json keeps: where, which weights (the
    sha256 of the checkpoint's tensors), how they were pre-trained."""
    tensors, meta = init if init is not None else read_init(cfg)
    _check_encoder_fits(model, cfg, (tensors, meta))
    encoder = _encoder_weights(tensors)
    for k, v in model.state_dict().items():
        if not k.startswith("head."):
            v.copy_(encoder[k])  # in place: the model's own memory layout (channels-last) stays
    if meta.get("dataset") not in (None, dataset):
        note(f"--init: the encoder was pre-trained on {meta['dataset']}; this run trains on {dataset}")
    return dict(init=str(Path(cfg.init).resolve()), init_payload_sha256=meta["payload_sha256"],
                init_step=meta["step"], init_method=meta.get("method"), init_dataset=meta.get("dataset"))


def load_training_data(cfg: TrainConfig) -> tuple[Dataset, dict[str, Any] | None]:
    """The run's dataset, its training split cut to the labelled subset with --labels-per-class (and the
    subset's record for labelled_subset.json)."""
    ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, offline=cfg.offline, val_size=cfg.val_size)
    if cfg.labels_per_class is None:
        return ds, None
    return with_labelled_subset(ds, cfg.labels_per_class, cfg.seed)


def final_eval(engine: TorchEngine, state: TrainState) -> dict[str, Any]:
    """Validation and test accuracy with every view the run asked for; results.json's contents."""
    cfg, ds = engine.cfg, engine.ds
    val = engine.evaluate(engine.val_x, engine.val_y, engine.shift_tta, fp32=True)
    test = engine.evaluate(ds.test_images.to(engine.device), ds.test_labels.to(engine.device), engine.shift_tta,
                           fp32=True)
    if not (math.isfinite(val.loss) and math.isfinite(test.loss)):
        raise TrainingDiverged(f"the weights became non-finite in the last epoch (test loss {test.loss}); "
                               f"results.json was not written")
    return dict(dataset=ds.name, model=cfg.model, labels_per_class=cfg.labels_per_class, init=cfg.init,
                freeze_encoder=cfg.freeze_encoder, test_accuracy=test.accuracy, test_loss=test.loss,
                val_accuracy=val.accuracy, best_val_accuracy=state.best_val_accuracy, epochs=cfg.epochs,
                steps=state.step, train_seconds=state.train_seconds, params=count_params(engine.model),
                device=str(engine.device), precision=engine.precision, world_size=engine.world.size,
                eval_views=(2 if engine.tta else 1) * (9 if engine.shift_tta else 1))  # best_val: per-epoch views


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Run the training described by `cfg`, or resume the run in cfg.run_dir (with the configuration its
    checkpoint records; only cfg.device and cfg.threads, when set, apply); return results.json's contents."""
    with process_settings():
        if not resume and distributed.restart_count() > 0 and _begun_by_this_torchrun(cfg.run_dir):
            # torchrun restarted the group with the same arguments: continue the run the first attempt began
            cfg = TrainConfig(run_dir=cfg.run_dir, threads=cfg.threads, device=cfg.device)
            resume = True
        return _resume(cfg, progress) if resume else _start(cfg, progress)


def _start(cfg: TrainConfig, progress: bool | None) -> dict[str, Any]:
    """A new run. What can be refused is refused before any data is loaded and before the run folder exists."""
    if cfg.tensorboard:
        require_tensorboard()
    if distributed.may_restart() and cfg.run_dir is None:
        raise UserError("under torchrun --max-restarts, give --run-dir: a restarted group finds its run there "
                        "and resumes it")
    apply_process_settings(cfg)
    _, device_name = distributed.start(cfg.device)
    device = pick_device(device_name)
    if device.type == "cuda" and not cfg.deterministic:  # fixed shapes: cuDNN times its algorithms once
        torch.backends.cudnn.benchmark = True
    if cfg.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn: PyTorch's SyncBatchNorm runs only on CUDA; on the CPU each process "
                        "normalises with the batch statistics of its own share (the default, without --sync-bn)")
    pick_precision(cfg.precision, device)
    init = None
    if cfg.init is not None:
        cfg.init = str(Path(cfg.init).resolve())  # config.json must name it from any working directory
        init = read_init(cfg)
    ds, subset = distributed.main_first(lambda: load_training_data(cfg))
    cfg.dataset = ds.name
    with run_folder(lambda: RunFolder.create(cfg.run_dir, ds.name, cfg.model)) as run:
        cfg.run_dir = str(run.path)
        with TorchEngine(cfg, ds, device, run) as engine:
            provenance = engine.start_from_init(init) if init is not None else {}
            if subset is not None:
                run.write_json(SUBSET_FILE, subset)
            run.begin(cfg, environment(str(device), ds, **provenance, **_world_record(engine)))
            return _fit_and_finish(engine, TrainState(), progress)


def _resume(cfg: TrainConfig, progress: bool | None) -> dict[str, Any]:
    """Continue the run in cfg.run_dir with the configuration its checkpoint records."""
    # the process group first (who is rank 0 decides who opens the folder), on the device trained on
    _, device_name = distributed.start(cfg.device or _saved_device(cfg.run_dir))
    with run_folder(lambda: RunFolder.open(cfg.run_dir)) as run:
        saved, read = resume_config(run, cfg)
        if saved.tensorboard:
            require_tensorboard()
        apply_process_settings(saved)
        if distributed.restart_count() > 0:
            note(f"torchrun restart {distributed.restart_count()}: resuming {run.path}")
        # one process: the device the checkpoint records (or --device); torchrun: this rank's device
        device = pick_device(device_name if distributed.world().distributed else saved.device)
        return _continue(run, saved, read, device, progress)


def _continue(run: RunFolder, cfg: TrainConfig, read: Read | None, device: torch.device,
              progress: bool | None) -> dict[str, Any]:
    """The resumed run from its checkpoint (`read`), or from step 0 when it stopped before its first one."""
    recorded_total = read[1].get("total_steps", math.inf) if read is not None else math.inf
    results = finished_results(run, read, recorded_total, cfg.epochs)
    if results is not None:
        return results  # before loading any data: a finished run needs nothing, not even the network
    if cfg.sync_bn and device.type != "cuda":
        raise UserError(f"--resume {run.path}: trained with --sync-bn, which runs only on CUDA")
    ds, subset = distributed.main_first(lambda: load_training_data(cfg))
    steps_per_epoch = math.ceil(len(ds.train_labels) / cfg.batch_size)
    results = finished_results(run, read, steps_per_epoch * cfg.epochs, cfg.epochs)
    if results is not None:
        return results
    if not run.file(CONFIG).exists():
        run.write_config(cfg.to_json())
    if subset is not None and not run.file(SUBSET_FILE).exists():
        run.write_json(SUBSET_FILE, subset)
    with TorchEngine(cfg, ds, device, run, first_step=read[1]["step"] if read is not None else 0) as engine:
        if read is None and cfg.init is not None:  # killed before its first checkpoint: step 0 is exact
            engine.start_from_init(read_init(cfg))
        state = starting_state(run, engine.model, engine.optimizer, read, steps_per_epoch,
                               steps_per_epoch * cfg.epochs)
        return _fit_and_finish(engine, state, progress)


def _fit_and_finish(engine: TorchEngine, state: TrainState, progress: bool | None) -> dict[str, Any]:
    """The epochs from `state` to the last step, then the final evaluation: results.json."""
    cfg, ds, run = engine.cfg, engine.ds, engine.run
    _describe(engine)
    if progress is None:
        progress = sys.stderr.isatty()
    fit(cfg, engine, state, run, len(ds.train_labels), progress and distributed.is_main(), engine.tensorboard)
    results = final_eval(engine, state)
    run.write_results(results)
    from mnistlab.calibration import write_run_calibration  # calibration.json: predict and serve need no data

    write_run_calibration(run, engine.model, ds, state.step)
    return results


def _describe(engine: TorchEngine) -> None:
    """The notes a run starts with (stderr): what it trains, on what, and how."""
    cfg, ds, run = engine.cfg, engine.ds, engine.run
    if engine.hflip != (cfg.hflip == "on"):
        note(f"--hflip auto: random left-right flips {'on' if engine.hflip else 'off'} for {ds.name}")
    if engine.tta:
        note("evaluating each image and its mirror image (--tta)")
    if engine.shift_tta:
        note("final evaluation also over each image moved 1 pixel in 8 directions (--tta-shifts); "
             "per-epoch validation without, to save time")
    if engine.distributed:
        note(torchrun_note(engine.world, cfg, engine.model))
    if engine.precision != "fp32":
        note(f"--precision {cfg.precision}: bf16 autocast on {engine.device}")
    note(f"{ds.summary()}\nmodel {cfg.model}: {count_params(engine.model):,} parameters on {engine.device}, "
         f"{plural(torch.get_num_threads(), 'thread')}; {plural(cfg.epochs, 'epoch')} of "
         f"{plural(engine.steps_per_epoch, 'step')}")
    if cfg.labels_per_class is not None:
        note(labelled_subset_note(cfg, ds.num_classes, len(ds.train_labels), run.file(SUBSET_FILE)))
    if cfg.init is not None:
        trainable = sum(p.numel() for p in engine.model.parameters() if p.requires_grad)
        note(f"--init {cfg.init}: the pre-trained encoder" + (f", frozen: {trainable:,} trainable parameters (the "
                                                              "head)" if cfg.freeze_encoder else ""))
    if engine.tensorboard is not None:
        note(f"TensorBoard logs in {run.file(TB_DIR)}: tensorboard --logdir {run.path.parent}")


def torchrun_note(world: distributed.World, cfg: TrainConfig, model: torch.nn.Module) -> str:
    """How the processes share the work; BatchNorm's statistics only for a model that has BatchNorm."""
    text = (f"torchrun: {world.size} processes ({world.backend}), each training on about "
            f"{cfg.batch_size // world.size} images of each global batch of {cfg.batch_size}")
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        text += f"; BatchNorm statistics {'over the global batch (--sync-bn)' if cfg.sync_bn else 'per process'}"
    return text


def labelled_subset_note(cfg: TrainConfig, num_classes: int, shown: int, subset_file: Path) -> str:
    """What --labels-per-class trains on, saying why the training split above counts more images than that."""
    n = cfg.labels_per_class * num_classes
    return (f"--labels-per-class {cfg.labels_per_class}: {n:,} labelled training images (seed {cfg.seed}), each "
            f"shown {shown // n} times an epoch (the {shown:,} training images above); indices in {subset_file}")


def _begun_by_this_torchrun(run_dir: str | None) -> bool:
    """Whether `run_dir` holds the run an earlier attempt of this very torchrun job began (env.json records the
    job's TORCHELASTIC_RUN_ID): a restart resumes it, and never another run that happened to be there."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_dir is None or job is None:
        return False
    try:
        return json.loads((Path(run_dir) / ENV).read_text()).get("torchrun_job") == job
    except (OSError, ValueError, AttributeError):
        return False


def _saved_device(run_dir: str | None) -> str:
    """The --device a run folder's config.json records ("auto" when there is none to read)."""
    try:
        return TrainConfig.load(Path(run_dir or ".") / CONFIG).device
    except UserError:
        return "auto"


def _world_record(engine: TorchEngine) -> dict[str, Any]:
    """What env.json records of the processes and the arithmetic."""
    w = engine.world
    record = dict(world_size=w.size, backend=w.backend, precision=engine.precision, compile=engine.cfg.compile,
                  sync_bn=engine.cfg.sync_bn and w.distributed,
                  torchrun_job=os.environ.get("TORCHELASTIC_RUN_ID"))  # which job a restart may resume
    if engine.device.type == "cuda":  # "fp32" convolutions are TF32 on Ampere and later unless turned off
        record.update(tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                      cudnn_benchmark=torch.backends.cudnn.benchmark)
    return record
