"""Training with torch: set up a run, then the loop, then the final evaluation. After nanoGPT's train.py.

    mnistlab train                                   # default CNN on MNIST (downloads it once)
    mnistlab train --dataset digits                  # offline, seconds
    mnistlab train --recipe fast --dataset fashion-mnist
    mnistlab train --resume runs/<run>               # continue exactly where it stopped
    mnistlab train --model vit --init runs/<pretrain run> --labels-per-class 100   # fine-tune on 1,000 labels

Read top to bottom: `train` opens the run folder (run.py), `TorchEngine` builds data, model and optimizer,
`fit` (loop.py, shared with the numpy engine) runs the epochs, calling this engine's `train_step`
(`get_batch`, forward, loss, backward, clip, step), `validate` and `save` (with --tensorboard, also
tensorboard.py's writer at each epoch's end); `final_eval` writes results.json. Under torchrun the same
code runs in every process (distributed.py): each trains on its share of the global batch through DDP,
metrics and evaluations are summed over the processes, and rank 0 writes the folder. The training state is one
object (loop.TrainState) that a checkpoint carries. --init starts the encoder from a pre-training run
(`load_pretrained_encoder`), --freeze-encoder leaves only the head trainable, --labels-per-class trains
on a seeded stratified subset (data/subset.py, which also says what an epoch is then).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mnistlab import distributed, gradflow
from mnistlab.checkpoint import (
    CHECKPOINT,
    PRETRAIN_KIND,
    RUN_META,
    NonFiniteCheckpoint,
    Read,
    load_into,
    prefixed,
    read_checkpoint,
    require_meta,
    save_checkpoint,
)
from mnistlab.config import PretrainConfig, TrainConfig
from mnistlab.data.batches import augment_batch, random_erase, shifted_crops, to_input
from mnistlab.data.dataset import Dataset, load_dataset
from mnistlab.data.subset import SUBSET_FILE, with_labelled_subset
from mnistlab.errors import UserError
from mnistlab.evaluate import EvalResult, evaluate
from mnistlab.loop import TrainingDiverged, TrainState, fit, step_seed
from mnistlab.models import create_model
from mnistlab.models.flops import count_params
from mnistlab.run import (
    CONFIG,
    ENV,
    RESULTS,
    RunFolder,
    cap_threads,
    environment,
    note,
    say,
    tune_allocator,
)
from mnistlab.tensorboard import TB_DIR, TensorBoardLog, require_tensorboard

MAX_SHIFT = 2  # --augment shift moves images by up to this many pixels


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (try --device auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: Apple's MPS backend is not available (try --device auto)")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    """fp32 or bf16 for --precision `name` on `device`.

    auto: bf16 autocast where the hardware computes bf16 natively and it measured faster than fp32, from what
    the hardware reports (`bf16_is_fast`); fp32 elsewhere. The default is fp32, PyTorch's, so that every
    published number reproduces bit for bit; auto is asked for."""
    if name == "fp32":
        return "fp32"
    if device.type == "mps":
        if name == "auto":
            return "fp32"
        raise UserError("--precision bf16: not on Apple's MPS backend; use --precision fp32")
    if name == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not compute bf16 natively; "
                        "use --precision fp32")
    return "bf16"


def bf16_is_fast(device: torch.device, cpuinfo: str | None = None) -> bool:
    """The rule behind --precision auto (measurements: docs/distributed.md, bench/precision.py).

    CUDA: compute capability 8.0 or newer (Ampere, Hopper and later have bf16 tensor cores).
    CPU: AMX-BF16 (Intel's matrix unit for bf16; not measured here, its purpose), or an AMD CPU with
    AVX512_BF16 (Zen 4 and later: bf16 autocast trained 1.12-1.57x faster than fp32). An Intel CPU with
    AVX512_BF16 but no AMX measured 0.70-0.80x and an AVX2 CPU 0.25x: fp32 there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags: set[str] = set()
    vendor = ""
    for line in cpuinfo.splitlines():
        if line.startswith("vendor_id") and not vendor:
            vendor = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    return "amx_bf16" in flags or (vendor == "AuthenticAMD" and "avx512_bf16" in flags)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig | PretrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable parameters (a frozen encoder's are not the optimizer's)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    # No weight decay on biases and norm parameters: decaying them only fights BatchNorm.
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    # fused: one kernel updates every parameter instead of a handful of ops per tensor (it matters for the ViT,
    # whose step is many small ops). CPU and CUDA have fused kernels. Resume keeps the optimizer state in each
    # weight's memory layout, which the fused kernels rely on (checkpoint.py).
    fused = True if all(p.device.type in ("cpu", "cuda") for p in model.parameters()) else None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=fused)


def save_run_checkpoint(run: RunFolder, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        meta: dict[str, Any], state: TrainState) -> None:
    """An engine's checkpoint: weights, optimizer and TrainState; non-finite weights stop the run (exit 1)."""
    try:
        save_checkpoint(run.file(CHECKPOINT), model, dict(meta, **state.to_meta()), optimizer)
    except NonFiniteCheckpoint as e:
        raise TrainingDiverged(f"the weights became non-finite by step {state.step} ({e}); the last "
                               f"checkpoint (if any) is intact in {run.path}") from None


def restore_run_checkpoint(run: RunFolder, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           read: Read) -> TrainState:
    """Weights, optimizer state and TrainState from a run's checkpoint, as read_checkpoint read it."""
    meta, _ = load_into(run.file(CHECKPOINT), model, optimizer, read=read)
    return TrainState.from_meta(meta)


class TorchEngine:
    """One training run's torch objects and its step; the loop (loop.fit) drives it."""

    def __init__(self, cfg: TrainConfig, ds: Dataset, device: torch.device, run: RunFolder) -> None:
        self.cfg, self.ds, self.device, self.run = cfg, ds, device, run
        self.world = distributed.world()
        self.precision = pick_precision(cfg.precision, device)
        self.train_x, self.train_y = ds.train_images.to(device), ds.train_labels.to(device)
        self.val_x, self.val_y = ds.val_images.to(device), ds.val_labels.to(device)
        torch.manual_seed(cfg.seed)  # the initial weights
        model = create_model(cfg.model, in_chans=1, num_classes=ds.num_classes, **cfg.model_kwargs).to(device)
        self.model = model.to(memory_format=torch.channels_last)  # faster convs on CPU and GPU; no-op for 2-D
        if cfg.freeze_encoder:  # a linear probe: only the head learns (before the optimizer, which takes the rest)
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith("head."))
        if cfg.sync_bn and self.distributed:  # same parameter names: checkpoints load into plain BatchNorm
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
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
        self.flow_steps: set[int] = set()
        self.tensorboard: TensorBoardLog | None = None
        self.tensorboard_grad_steps: set[int] = set()  # the last step of each epoch, with --tensorboard
        self.model.train()

    def meta(self) -> dict[str, Any]:
        """What the checkpoint's header carries besides the training state: enough to rebuild the model alone."""
        cfg, ds = self.cfg, self.ds
        total_steps = math.ceil(len(ds.train_labels) / cfg.batch_size) * cfg.epochs
        return dict(model=cfg.model, model_kwargs=cfg.model_kwargs, in_chans=1, num_classes=ds.num_classes,
                    classes=list(ds.classes), mean=ds.mean, std=ds.std, config=cfg.to_dict(),
                    hflip_tta=self.tta, shift_tta=self.shift_tta, total_steps=total_steps)

    def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised, augmented images (B, 1, H, W) and labels (B,) of training indices `idx`."""
        if self.padded_x is not None:
            x = to_input(shifted_crops(self.padded_x, idx, MAX_SHIFT, self.hflip), self.ds.mean, self.ds.std)
        else:
            x = augment_batch(to_input(self.train_x[idx], self.ds.mean, self.ds.std), self.cfg.augment,
                              self.background, hflip=self.hflip)
        return random_erase(x, self.cfg.erase, self.background), self.train_y[idx]

    @property
    def distributed(self) -> bool:
        """Under torchrun with more than one process: the loop sums its running metrics over ranks (reduce_steps)."""
        return self.world.distributed

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

    def restore(self, read: Read) -> TrainState:
        """Weights, optimizer state and training state from this run's checkpoint, as read_checkpoint read it."""
        return restore_run_checkpoint(self.run, self.model, self.optimizer, read)

    def start_from_init(self) -> dict[str, Any]:
        """Step 0 of an --init run: the pre-trained encoder's weights; returns what env.json records of them."""
        return load_pretrained_encoder(self.model, self.cfg, self.ds.name)


def load_pretrained_encoder(model: torch.nn.Module, cfg: TrainConfig, dataset: str) -> dict[str, Any]:
    """Copy the encoder of the pre-training run `cfg.init` into `model`, every weight but the head's.

    Refused in one line: a folder that is not a pre-training run, another model, or the same model with options
    that give other weights (patch, dim, depth, heads, mlp_ratio, pool); options that only change the
    computation (dropout) may differ. Returns the provenance env.json keeps: where, which weights (the sha256
    of the checkpoint's tensors), how they were pre-trained."""
    ckpt = Path(cfg.init) / CHECKPOINT
    if not ckpt.is_file():
        raise UserError(f"--init {cfg.init}: no {CHECKPOINT} there (not a `mnistlab pretrain` run folder, or one "
                        "that never finished an epoch)")
    tensors, meta = read_checkpoint(ckpt)
    if meta.get("kind") != PRETRAIN_KIND:
        raise UserError(f"--init {cfg.init}: a training run, not a `mnistlab pretrain` run (--init takes the encoder "
                        "of a pre-training run)")
    theirs = f"{meta['model']} {json.dumps(meta['model_kwargs'], sort_keys=True)}"
    ours = f"{cfg.model} {json.dumps(cfg.model_kwargs, sort_keys=True)}"
    encoder = {k.removeprefix("encoder."): v for k, v in prefixed(tensors, "model").items() if k.startswith("encoder.")}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    if meta["model"] != cfg.model:
        problem = f"train --model {meta['model']}"
    elif set(own) != set(encoder):
        problem = f"{sorted(set(own) ^ set(encoder))[0]} is in one and not the other"
    else:
        problem = next((f"{k} is {tuple(encoder[k].shape)} there, {tuple(own[k].shape)} here" for k in own
                        if own[k].shape != encoder[k].shape), None)
    if problem is not None:
        raise UserError(f"--init {cfg.init}: its encoder is {theirs}, this run builds {ours}; they do not match "
                        f"({problem}): give the pre-training's --model and --model-arg values")
    for k, v in own.items():
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


def is_out_of_memory(err: Exception) -> bool:
    """torch's OOM on CUDA, or the CPU allocator's message (a plain RuntimeError)."""
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or any(
        phrase in text for phrase in ("out of memory", "not enough memory", "can't allocate memory"))


def out_of_memory(batch: int, flag: str, device: torch.device, err: Exception) -> UserError:
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return UserError(f"a batch of {batch} images does not fit in memory on {device} ({first}); "
                     f"try a smaller {flag}")


@contextmanager
def memory_errors_as_user_error(batch: int, flag: str, device: torch.device) -> Iterator[None]:
    """Running out of memory inside the block becomes one line naming the flag to lower (other errors pass)."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise out_of_memory(batch, flag, device, e) from None


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
    tune_allocator()
    # thread count and determinism are process-wide: set them for this run, restore them after
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    try:
        if not resume and distributed.restart_count() > 0 and _begun_by_this_torchrun(cfg.run_dir):
            # torchrun restarted the group with the same arguments: continue the run the first attempt began
            cfg = TrainConfig(run_dir=cfg.run_dir, threads=cfg.threads, device=cfg.device)
            resume = True
        if resume:
            # the process group first (who is rank 0 decides who opens the folder), on the device trained on
            _, device_name = distributed.start(cfg.device or _saved_device(cfg.run_dir))
            with _run_folder(lambda: RunFolder.open(cfg.run_dir)) as run:
                saved, read = resume_config(run)
                if saved.tensorboard:
                    require_tensorboard()
                # the device as named (config.json keeps "cuda", never torchrun's "cuda:<local rank>")
                saved.run_dir, saved.device = str(run.path), cfg.device or saved.device
                saved.threads = cfg.threads if cfg.threads is not None else saved.threads
                apply_process_settings(saved)
                if distributed.restart_count() > 0:
                    note(f"torchrun restart {distributed.restart_count()}: resuming {run.path}")
                # one process: the device the checkpoint records (or --device); torchrun: this rank's device
                device = pick_device(device_name if distributed.world().distributed else saved.device)
                results = _resume(run, saved, read, device, progress)
            distributed.stop()
            return results
        if cfg.tensorboard:
            require_tensorboard()  # before the data and the run folder
        if distributed.may_restart() and cfg.run_dir is None:
            raise UserError("under torchrun --max-restarts, give --run-dir: a restarted group finds its run there "
                            "and resumes it")
        apply_process_settings(cfg)
        world, device_name = distributed.start(cfg.device)
        device = pick_device(device_name)
        if device.type == "cuda" and not cfg.deterministic:  # fixed shapes: cuDNN times its algorithms once
            torch.backends.cudnn.benchmark = True
        if cfg.sync_bn and device.type != "cuda":
            raise UserError("--sync-bn: PyTorch's SyncBatchNorm runs only on CUDA; on the CPU each process "
                            "normalises with the batch statistics of its own share (the default, without --sync-bn)")
        pick_precision(cfg.precision, device)  # refused here, before any data
        ds, subset = distributed.main_first(lambda: load_training_data(cfg))
        cfg.dataset = ds.name
        if cfg.init is not None:
            cfg.init = str(Path(cfg.init).resolve())  # config.json must name it from any working directory
        with _run_folder(lambda: RunFolder.create(cfg.run_dir, ds.name, cfg.model)) as run:
            cfg.run_dir = str(run.path)
            engine = TorchEngine(cfg, ds, device, run)
            init = engine.start_from_init() if cfg.init is not None else {}
            run.write_config(cfg.to_json())
            run.write_json(ENV, environment(str(device), ds, **init, **_world_record(engine)))
            if subset is not None:
                run.write_json(SUBSET_FILE, subset)
            run.start_metrics()
            note(f"run folder {run.path}\n{cfg.describe()}")
            results = _fit_and_finish(engine, TrainState(), progress)
        distributed.stop()
        return results
    except BaseException:
        distributed.stop(finished=False)
        raise
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = benchmark


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


def _run_folder(make: Callable[[], RunFolder]) -> RunFolder:
    """This process's view of the run folder: rank 0 makes it (creates or opens it, and holds its lock), the
    other ranks of a torchrun group follow the folder it made, without writing."""
    run = distributed.main_first(make, lambda: None)
    path = distributed.share_text(str(run.path) if run is not None else None)
    return run if run is not None else RunFolder.follow(path)


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


def apply_process_settings(cfg: TrainConfig | PretrainConfig) -> None:
    """Thread count (capped at the cores) and deterministic kernels, process-wide, as `cfg` asks."""
    cfg.threads = cap_threads(cfg.threads)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def resume_config(run: RunFolder) -> tuple[TrainConfig, Read | None]:
    """The run's config as its checkpoint records it (a config.json that disagrees is refused), and the
    checkpoint as read (tensors, meta); (config.json's config, None) for a run stopped before its first
    checkpoint."""
    ckpt = run.file(CHECKPOINT)
    if not ckpt.is_file():
        if not run.file(CONFIG).is_file():
            raise UserError(f"--resume {run.path}: no checkpoint and no config.json there (not a run folder?)")
        cfg = TrainConfig.load(run.file(CONFIG))
        if cfg.engine == "scratch":
            raise UserError(f"--resume {run.path}: a scratch-engine run cannot be resumed (the torch engine's can)")
        return cfg, None
    read = read_checkpoint(ckpt)
    meta = read[1]
    if meta.get("kind") == PRETRAIN_KIND:
        raise UserError(f"--resume {run.path}: a pre-training run; continue it with `mnistlab pretrain --resume "
                        f"{run.path}`")
    require_meta(meta, RUN_META, ckpt)
    if meta.get("engine") == "scratch":
        raise UserError(f"--resume {run.path}: a scratch-engine run cannot be resumed (the torch engine's can)")
    saved = TrainConfig.from_dict(meta["config"], source=f"{ckpt} (its config)")
    if (meta["model"], meta["model_kwargs"]) != (saved.model, saved.model_kwargs):
        raise UserError(f"{ckpt}: the checkpoint names model {meta['model']} {meta['model_kwargs']} but its config "
                        f"says {saved.model} {saved.model_kwargs}; it was not written by this run")
    if run.file(CONFIG).exists():
        on_disk = TrainConfig.load(run.file(CONFIG)).to_dict()
        ignore = {"run_dir", "device", "threads"}  # where it runs, not what it computes
        differ = [k for k, v in saved.to_dict().items() if k not in ignore and on_disk[k] != v]
        if differ:
            k = differ[0]
            raise UserError(f"--resume {run.path}: config.json says {k}={on_disk[k]!r} but the checkpoint was "
                            f"trained with {k}={saved.to_dict()[k]!r} ({len(differ)} field(s) differ); resume "
                            f"continues the run as it was: restore config.json, or start a new run")
    return saved, read


def _finished(run: RunFolder, cfg: TrainConfig) -> dict[str, Any]:
    say(f"{run.path} finished all {cfg.epochs} epochs; nothing to resume (results in {run.file(RESULTS)})")
    try:
        return json.loads(run.file(RESULTS).read_text())
    except ValueError:
        raise UserError(f"{run.file(RESULTS)}: not valid JSON (the run had finished)") from None


def _resume(run: RunFolder, cfg: TrainConfig, read: Read | None, device: torch.device,
            progress: bool | None) -> dict[str, Any]:
    meta = read[1] if read is not None else None
    done = meta is not None and run.file(RESULTS).exists()
    if done and "total_steps" in meta and meta["step"] >= meta["total_steps"]:
        return _finished(run, cfg)  # before loading any data: a finished run needs nothing, not even the network
    if cfg.sync_bn and device.type != "cuda":
        raise UserError(f"--resume {run.path}: trained with --sync-bn, which runs only on CUDA")
    ds, subset = distributed.main_first(lambda: load_training_data(cfg))
    steps_per_epoch = math.ceil(len(ds.train_labels) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if done and meta["step"] >= total_steps:
        return _finished(run, cfg)
    if not run.file(CONFIG).exists():
        run.write_config(cfg.to_json())
    if subset is not None and not run.file(SUBSET_FILE).exists():
        run.write_json(SUBSET_FILE, subset)
    engine = TorchEngine(cfg, ds, device, run)
    if read is None:  # killed before its first checkpoint: step 0 is exact
        if cfg.init is not None:
            engine.start_from_init()
        state = TrainState()
        run.start_metrics()
        note(f"{run.path} stopped before its first checkpoint; starting it again from step 0")
    else:
        state = engine.restore(read)
        run.keep_metrics(state.step // steps_per_epoch)
        note(f"resuming {run.path} at step {state.step}/{total_steps} (epoch {state.step // steps_per_epoch + 1})")
    return _fit_and_finish(engine, state, progress)


def _fit_and_finish(engine: TorchEngine, state: TrainState, progress: bool | None) -> dict[str, Any]:
    cfg, ds, run = engine.cfg, engine.ds, engine.run
    steps_per_epoch = math.ceil(len(ds.train_labels) / cfg.batch_size)
    if engine.hflip != (cfg.hflip == "on"):
        note(f"--hflip auto: random left-right flips {'on' if engine.hflip else 'off'} for {ds.name}")
    if engine.tta:
        note("evaluating each image and its mirror image (--tta)")
    if engine.shift_tta:
        note("final evaluation also over each image moved 1 pixel in 8 directions (--tta-shifts); "
             "per-epoch validation without, to save time")
    if engine.world.distributed:
        note(f"torchrun: {engine.world.size} processes ({engine.world.backend}), each training on about "
             f"{cfg.batch_size // engine.world.size} images of each global batch of {cfg.batch_size}; BatchNorm "
             f"statistics {'over the global batch (--sync-bn)' if cfg.sync_bn else 'per process'}")
    if engine.precision != "fp32":
        note(f"--precision {cfg.precision}: bf16 autocast on {engine.device}")
    if cfg.grad_flow and engine.run.writes:
        engine.flow_steps = set(cfg.grad_flow_steps if cfg.grad_flow_steps is not None else
                                [0, *(e * steps_per_epoch - 1 for e in range(1, cfg.epochs + 1))])
        gradflow.keep_before(run.path, state.step)  # drop records a resume will redo
    note(f"{ds.summary()}\nmodel {cfg.model}: {count_params(engine.model):,} parameters on {engine.device}, "
         f"{torch.get_num_threads()} threads; {cfg.epochs} epochs of {steps_per_epoch} steps")
    if cfg.labels_per_class is not None:
        n = cfg.labels_per_class * ds.num_classes
        note(f"--labels-per-class {cfg.labels_per_class}: {n:,} labelled training images (seed {cfg.seed}), each "
             f"shown {len(ds.train_labels) // n} times an epoch; indices in {run.file(SUBSET_FILE)}")
    if cfg.init is not None:
        trainable = sum(p.numel() for p in engine.model.parameters() if p.requires_grad)
        note(f"--init {cfg.init}: the pre-trained encoder" + (f", frozen: {trainable:,} trainable parameters (the "
                                                              "head)" if cfg.freeze_encoder else ""))
    if cfg.tensorboard and engine.run.writes:
        # a resume hides the events after its checkpoint's step: those of the steps it redoes
        engine.tensorboard = TensorBoardLog(run.path, engine.model, ds.val_images, ds.val_labels, ds.classes,
                                            ds.mean, ds.std, purge_step=state.step + 1)
        engine.tensorboard_grad_steps = {e * steps_per_epoch - 1 for e in range(1, cfg.epochs + 1)}
        note(f"TensorBoard logs in {run.file(TB_DIR)}: tensorboard --logdir {run.path.parent}")
    if progress is None:
        progress = sys.stderr.isatty()
    progress = progress and distributed.is_main()
    try:
        fit(cfg, engine, state, run, len(ds.train_labels), progress, engine.tensorboard)
    finally:
        if engine.tensorboard is not None:
            engine.tensorboard.close()
    results = final_eval(engine, state)
    run.write_results(results)
    from mnistlab.calibration import write_run_calibration  # calibration.json: predict and serve need no data

    write_run_calibration(run, engine.model, ds, state.step)
    engine.net = None  # drop the DDP wrapper before the process group goes (distributed.stop)
    return results


def load_run_checkpoint(run_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model of a run folder (either engine) and its checkpoint metadata."""
    ckpt = Path(run_dir) / CHECKPOINT
    if not ckpt.is_file():
        raise UserError(f"{run_dir}: no {CHECKPOINT} (not a run folder, or it never finished an epoch)")
    read = read_checkpoint(ckpt)
    if read[1].get("kind") == PRETRAIN_KIND:
        raise UserError(f"{run_dir}: a pre-training run (an encoder, no classifier); fine-tune it with "
                        f"`mnistlab train --model {read[1].get('model')} --init {run_dir}`")
    require_meta(read[1], RUN_META, ckpt)
    if read[1].get("engine") == "scratch":
        from mnistlab.scratch.train import load_model as load_scratch

        return load_scratch(ckpt, read)
    from mnistlab.checkpoint import load_model

    return load_model(ckpt, read=read)
