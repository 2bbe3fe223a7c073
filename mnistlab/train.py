"""The training loop: plain and explicit, after nanoGPT's train.py.

    mnistlab train                                   # default CNN on MNIST (downloads it once)
    mnistlab train --dataset digits                  # offline, seconds
    mnistlab train --recipe fast --dataset fashion-mnist
    mnistlab train --resume runs/<run>               # continue exactly where it stopped

Exact resume: every source of randomness is a pure function of (seed, epoch) or (seed, step): the
epoch's permutation, and torch's global RNG reseeded before each step (dropout, augmentation).
So a checkpoint needs only weights, optimizer state and the step: a run killed at any moment and
resumed from its last checkpoint ends with weights bit-identical to an uninterrupted run (on the
CPU, with the same thread count).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mnistlab import gradflow
from mnistlab.checkpoint import CHECKPOINT, atomic_write_text, load_into, save_checkpoint
from mnistlab.config import TrainConfig
from mnistlab.data.batches import augment_batch, epoch_permutation, random_erase, shifted_crops, to_input
from mnistlab.data.dataset import Dataset, load_dataset
from mnistlab.data.registry import DATASETS
from mnistlab.errors import UserError
from mnistlab.evaluate import evaluate
from mnistlab.models import create_model
from mnistlab.models.flops import count_params


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""

    exit_code = 1


def tune_allocator() -> None:
    """Keep freed activation buffers in glibc's heap instead of returning them to the OS.

    By default glibc serves blocks above 128 KiB with mmap and gives them back on free, so every
    step pays page faults to re-zero the same activation memory; raising the mmap and trim
    thresholds made CNN training 30-80% faster on the reference 2-core CPU (bench/speed.py).
    mallopt is glibc's runtime equivalent of MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_;
    elsewhere this does nothing. An explicitly set MALLOC_ variable wins, and MNISTLAB_ALLOCATOR=default
    turns this off (bench/speed.py measures both).
    """
    if (sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ
            or os.environ.get("MNISTLAB_ALLOCATOR") == "default"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum on 64-bit
    libc.mallopt(m_trim_threshold, 1 << 30)


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


def get_lr(step: int, total_steps: int, cfg: TrainConfig) -> float:
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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters: decaying them only fights BatchNorm.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    # fused: one kernel updates every parameter instead of a handful of ops per tensor (unfused, AdamW took
    # ~6 ms of the ViT's ~45 ms CPU step in the profiler). CPU and CUDA have fused kernels. Resume keeps
    # its state in each weight's memory layout, which the fused kernels rely on (checkpoint.py).
    fused = True if all(p.device.type in ("cpu", "cuda") for p in model.parameters()) else None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, fused=fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=fused)
    raise UserError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**63 - 1)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, ds: Dataset) -> dict[str, Any]:
    import numpy

    from mnistlab import __version__

    return {
        "mnistlab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "git_commit": git_commit(),
        "dataset": ds.name,
        "data_source": f"{ds.source}: {ds.location}",
        "data_sha256": ds.file_sha256,
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


class StopFlag:
    """Ctrl-C sets a flag the loop checks between steps (so a step is never half-applied);
    a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopFlag:
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\nstopping after this step (Ctrl-C again to abort without saving)", file=sys.stderr)

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def default_run_dir(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.dataset}-{cfg.model}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def epoch_summary(record: dict[str, Any], epochs: int) -> str:
    """The one log line of a finished epoch, from its metrics.jsonl record (both engines)."""
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.2%}  val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.2%}  "
            f"{record['seconds']:.1f}s  {record['images_per_second']:,.0f} img/s")


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    """Write results.json and say where it is (both engines)."""
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    log(f"test accuracy {results['test_accuracy']:.2%} (loss {results['test_loss']:.4f}), "
        f"val {results['val_accuracy']:.2%}, {results['train_seconds']:.1f}s of training; "
        f"results in {run_dir / 'results.json'}")


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Run (or resume) the training described by `cfg`; return the contents of results.json."""
    tune_allocator()
    # thread count and determinism are process-wide: set them for this run, restore them after
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, resume, progress)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(cfg: TrainConfig, resume: bool, progress: bool | None) -> dict[str, Any]:
    device = pick_device(cfg.device)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    cfg.run_dir = str(run_dir)
    ckpt_path = run_dir / CHECKPOINT
    if not resume and ckpt_path.exists():
        raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} or another --run-dir")
    if progress is None:
        progress = sys.stderr.isatty()

    ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, offline=cfg.offline, val_size=cfg.val_size)
    train_x, train_y = ds.train_images.to(device), ds.train_labels.to(device)
    val_x, val_y = ds.val_images.to(device), ds.val_labels.to(device)

    torch.manual_seed(cfg.seed)  # the initial weights
    model = create_model(cfg.model, in_chans=1, num_classes=ds.num_classes, **cfg.model_kwargs).to(device)
    model = model.to(memory_format=torch.channels_last)  # faster convs on CPU and GPU; no-op for 2-D weights
    optimizer = make_optimizer(model, cfg)
    n_params = count_params(model)

    steps_per_epoch = math.ceil(len(train_y) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    symmetric = ds.name in DATASETS and DATASETS[ds.name].mirror_symmetric  # a --data-dir folder: unknown, no
    hflip = cfg.hflip == "on" or (cfg.hflip == "auto" and symmetric)
    if cfg.hflip == "auto":
        log(f"--hflip auto: random left-right flips {'on' if hflip else 'off'} for {ds.name}")
    tta = cfg.tta == "on" or (cfg.tta == "auto" and hflip)
    if tta:
        log("evaluating each image and its mirror image (--tta)")
    shift_tta = cfg.tta_shifts == "on"
    if shift_tta:
        log("final evaluation also over each image moved 1 pixel in 8 directions (--tta-shifts); "
            "per-epoch validation without, to save time")
    meta_base = dict(model=cfg.model, model_kwargs=cfg.model_kwargs, in_chans=1, num_classes=ds.num_classes,
                     classes=list(ds.classes), mean=ds.mean, std=ds.std, config=asdict(cfg), hflip_tta=tta,
                     shift_tta=shift_tta)
    step, best_val, train_seconds = 0, 0.0, 0.0
    resumed: dict[str, Any] = {}  # running sums of a half-done epoch
    if resume:
        meta, extra = load_into(ckpt_path, model, optimizer)
        step, best_val, train_seconds = meta["step"], meta["best_val_accuracy"], meta["train_seconds"]
        if step % steps_per_epoch:
            resumed = dict(seen=meta["epoch_seen"], seconds=meta["epoch_seconds"],
                           loss_sum=extra["loss_sum"].to(device), correct=extra["correct"].to(device))
        log(f"resuming {run_dir} at step {step}/{total_steps} (epoch {step // steps_per_epoch + 1})")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", cfg.to_json() + "\n")
        atomic_write_text(run_dir / "env.json", json.dumps(environment(device, ds), indent=2) + "\n")
        log(f"run folder {run_dir}\nconfig {json.dumps(asdict(cfg))}")
    log(f"{ds.summary()}\nmodel {cfg.model}: {n_params:,} parameters on {device}, "
        f"{torch.get_num_threads()} threads; {cfg.epochs} epochs of {steps_per_epoch} steps")

    def checkpoint(at_step: int) -> None:
        # the running sums of an unfinished epoch travel along, so its metrics stay whole on resume
        meta = dict(meta_base, step=at_step, epoch=at_step // steps_per_epoch, best_val_accuracy=best_val,
                    train_seconds=train_seconds, epoch_seen=seen, epoch_seconds=seconds)
        save_checkpoint(ckpt_path, model, meta, optimizer, extra=dict(loss_sum=loss_sum, correct=correct))

    metrics_file = run_dir / "metrics.jsonl"
    if step == 0:
        metrics_file.write_text("")
    else:  # drop records of epochs after the checkpoint (a kill between the two writes)
        done = step // steps_per_epoch
        keep = [ln for ln in metrics_file.read_text().splitlines() if ln and json.loads(ln)["epoch"] <= done]
        metrics_file.write_text("".join(ln + "\n" for ln in keep))

    flow_steps: set[int] = set()
    if cfg.grad_flow:
        flow_steps = set(cfg.grad_flow_steps if cfg.grad_flow_steps is not None else
                         [0, *(e * steps_per_epoch - 1 for e in range(1, cfg.epochs + 1))])
        flow_file = run_dir / gradflow.GRAD_FLOW_FILE
        kept = [r for r in gradflow.read(run_dir) if r["step"] < step] if step and flow_file.exists() else []
        flow_file.write_text("".join(json.dumps(r) + "\n" for r in kept))  # drop records a resume will redo
    background = (0.0 - ds.mean) / ds.std  # normalised value of a black pixel
    # shifts: every image with max_shift black pixels around it, once, so that a shifted image is a window of it
    max_shift = 2
    padded_x = F.pad(train_x, (max_shift,) * 4) if cfg.augment == "shift" else None  # (N, H + 2m, W + 2m) uint8
    model.train()
    with StopFlag() as stop:
        while step < total_steps:
            epoch = step // steps_per_epoch
            perm = epoch_permutation(len(train_y), cfg.seed, epoch, device)
            loss_sum = resumed.get("loss_sum", torch.zeros((), dtype=torch.float64, device=device))
            correct = resumed.get("correct", torch.zeros((), dtype=torch.int64, device=device))
            seen, seconds_before = resumed.get("seen", 0), resumed.get("seconds", 0.0)
            resumed = {}
            t0 = time.perf_counter()
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=steps_per_epoch, initial=step % steps_per_epoch, leave=False, unit="step",
                           desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr)
            for i in range(step % steps_per_epoch, steps_per_epoch):
                idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                torch.manual_seed(step_seed(cfg.seed, step))  # dropout and augmentation of this step
                if padded_x is not None:
                    x = to_input(shifted_crops(padded_x, idx, max_shift, hflip), ds.mean, ds.std)  # (B, 1, H, W)
                else:
                    x = augment_batch(to_input(train_x[idx], ds.mean, ds.std), cfg.augment, background, hflip=hflip)
                x = random_erase(x, cfg.erase, background)
                y = train_y[idx]
                lr = get_lr(step, total_steps, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                logits = model(x)  # (B, K)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"the loss became {loss.item()} at step {step} (epoch {epoch + 1}, batch {i + 1}, "
                        f"lr {lr:.3g}); nothing was saved from this epoch. Try a lower --lr or --grad-clip. "
                        f"The last checkpoint (if any) is intact in {run_dir}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if step in flow_steps:  # raw gradients, before clipping: clipping would hide an explosion
                    gradflow.record(run_dir, step, model, x, y)
                if cfg.grad_clip:
                    # foreach: all norms in one pass (CPU defaults to one op per tensor plus a cat)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
                optimizer.step()
                step += 1
                loss_sum += loss.detach().double() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                if bar is not None:
                    bar.update(1)
                    if i % 10 == 0:
                        rate = seen / max(seconds_before + time.perf_counter() - t0, 1e-9)
                        bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}",
                                        acc=f"{correct.item() / seen:.2%}", img_s=f"{rate:,.0f}")
                if stop.requested:
                    break
            if bar is not None:
                bar.close()
            train_seconds += time.perf_counter() - t0
            seconds = seconds_before + time.perf_counter() - t0
            if stop.requested and step % steps_per_epoch != 0:
                checkpoint(step)
                log(f"interrupted at step {step}/{total_steps}; checkpoint saved. "
                    f"Continue with: mnistlab train --resume {run_dir}")
                raise KeyboardInterrupt
            val = evaluate(model, val_x, val_y, ds.mean, ds.std, cfg.eval_batch_size, tta)
            best_val = max(best_val, val.accuracy)
            record = dict(epoch=epoch + 1, step=step, train_loss=loss_sum.item() / max(seen, 1),
                          train_accuracy=correct.item() / max(seen, 1), val_loss=val.loss,
                          val_accuracy=val.accuracy, lr=lr, seconds=seconds, images_per_second=seen / seconds)
            with open(metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            checkpoint(step)
            log(epoch_summary(record, cfg.epochs))
            if stop.requested:
                log(f"interrupted at the end of epoch {epoch + 1}; checkpoint saved. "
                    f"Continue with: mnistlab train --resume {run_dir}")
                raise KeyboardInterrupt

    val = evaluate(model, val_x, val_y, ds.mean, ds.std, cfg.eval_batch_size, tta, shift_tta)
    test = evaluate(model, ds.test_images.to(device), ds.test_labels.to(device), ds.mean, ds.std,
                    cfg.eval_batch_size, tta, shift_tta)
    results = dict(dataset=ds.name, model=cfg.model, test_accuracy=test.accuracy, test_loss=test.loss,
                   val_accuracy=val.accuracy, best_val_accuracy=best_val, epochs=cfg.epochs, steps=step,
                   train_seconds=train_seconds, params=n_params, device=str(device),
                   eval_views=(2 if tta else 1) * (9 if shift_tta else 1))  # best_val_accuracy: per-epoch views
    write_results(run_dir, results)
    return results
