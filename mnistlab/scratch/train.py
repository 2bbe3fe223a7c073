"""`mnistlab train --engine scratch`: the same run, trained by the numpy engine instead of torch.

Same config, same data split, same per-epoch order, same learning-rate schedule, and the same run
folder (config.json, env.json, metrics.jsonl, checkpoint.safetensors, results.json), so runs of the
two engines compare line by line. The data layer hands over tensors; from there on it is numpy.
Supported: models mlp and cnn (nn.MLP, nn.CNN), optimizers sgd and adamw, label smoothing,
gradient clipping; no augmentation and no resume (the torch engine has both).

Unlike mnistlab.scratch itself, this module imports torch (through the data layer and the
checkpoint writer): it is the glue between the engine and the product.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mnistlab.scratch import functional as F
from mnistlab.scratch import nn, optim
from mnistlab.scratch.engine import no_grad, tensor


def check_supported(cfg) -> None:
    """Fail before loading data when the config asks for something the scratch engine lacks."""
    from mnistlab.errors import UserError

    problems = []
    if cfg.model not in nn.MODELS:
        problems.append(f"--model {cfg.model} (the scratch engine has {', '.join(nn.MODELS)})")
    if cfg.optimizer not in ("sgd", "adamw"):
        problems.append(f"--optimizer {cfg.optimizer}")
    if (cfg.augment != "none" or cfg.hflip == "on" or cfg.tta == "on" or cfg.erase > 0
            or cfg.tta_shifts == "on"):
        problems.append("augmentation (--augment, --erase, --hflip, --tta, --tta-shifts)")
    if cfg.grad_flow:
        problems.append("--grad-flow")
    if cfg.recipe:
        problems.append(f"--recipe {cfg.recipe} (recipes are tuned for the torch engine)")
    if cfg.device not in ("auto", "cpu"):
        problems.append(f"--device {cfg.device} (numpy runs on the CPU)")
    if problems:
        raise UserError("the scratch engine does not support " + "; ".join(problems))
    try:
        nn.create_model(cfg.model, **cfg.model_kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"--model-arg for the scratch {cfg.model}: {e}") from None


def make_optimizer(model: nn.Module, cfg) -> optim.Optimizer:
    # as the torch engine: no weight decay on biases
    params = model.parameters()
    groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]
    if cfg.optimizer == "sgd":
        return optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return optim.AdamW(groups, lr=cfg.lr)


def to_input(images_u8: np.ndarray, mean: float, std: float) -> np.ndarray:
    """(B, H, W) uint8 -> (B, 1, H, W) float32 normalised, as mnistlab.data.batches.to_input."""
    x = images_u8[:, None].astype(np.float32)
    return (x - np.float32(255.0 * mean)) * np.float32(1.0 / (255.0 * std))


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, mean: float, std: float,
             batch_size: int = 1000) -> tuple[float, float, np.ndarray]:
    """(mean loss, accuracy, predictions) of a scratch model on uint8 images (N, H, W)."""
    model.eval()
    loss_sum, preds = 0.0, []
    with no_grad():
        for i in range(0, len(labels), batch_size):
            logits = model(tensor(to_input(images[i : i + batch_size], mean, std)))
            loss_sum += F.cross_entropy(logits, labels[i : i + batch_size]).item() * len(logits.data)
            preds.append(logits.data.argmax(1))
    model.train()
    predictions = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    n = max(len(labels), 1)
    return loss_sum / n, float((predictions == labels).sum()) / n, predictions


def clip_grad_norm(params: list, max_norm: float) -> float:
    """Scale all gradients together so that their global L2 norm is at most max_norm (as torch)."""
    total = math.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in params if p.grad is not None))
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        for p in params:
            if p.grad is not None:
                p.grad *= scale
    return total


def save(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    import torch

    from mnistlab.checkpoint import write_tensors

    tensors = {f"model/{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.state_dict().items()}
    write_tensors(path, tensors, dict(meta, engine="scratch"))


def load_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a scratch model from its checkpoint file alone."""
    from mnistlab.checkpoint import prefixed, read_checkpoint

    tensors, meta = read_checkpoint(path)
    model = nn.create_model(meta["model"], in_chans=meta["in_chans"], num_classes=meta["num_classes"],
                            **meta["model_kwargs"])
    model.load_state_dict({k: v.numpy() for k, v in prefixed(tensors, "model").items()})
    return model.eval(), meta


def train(cfg, progress: bool | None = None) -> dict[str, Any]:
    """Train cfg.model with the numpy engine; write the run folder; return results.json's contents."""
    import torch

    from mnistlab.checkpoint import CHECKPOINT, atomic_write_text
    from mnistlab.data.batches import epoch_permutation
    from mnistlab.data.dataset import load_dataset
    from mnistlab.errors import UserError
    from mnistlab.train import (
        StopFlag,
        TrainingDiverged,
        default_run_dir,
        environment,
        epoch_summary,
        get_lr,
        log,
        step_seed,
        write_results,
    )

    check_supported(cfg)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    cfg.run_dir = str(run_dir)
    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.exists():
        raise UserError(f"{run_dir} already holds a run; choose another --run-dir")
    if progress is None:
        progress = sys.stderr.isatty()

    ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, offline=cfg.offline, val_size=cfg.val_size)
    train_x, train_y = ds.train_images.numpy(), ds.train_labels.numpy()
    val_x, val_y = ds.val_images.numpy(), ds.val_labels.numpy()
    h, w = train_x.shape[1:]
    if h != w:
        raise UserError(f"the scratch models take square images, {ds.name} has {h}x{w}")

    nn.manual_seed(cfg.seed)
    model = nn.create_model(cfg.model, in_chans=1, num_classes=ds.num_classes, img_size=h, **cfg.model_kwargs)
    optimizer = make_optimizer(model, cfg)
    n_params = sum(p.data.size for p in model.parameters())
    steps_per_epoch = math.ceil(len(train_y) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", cfg.to_json() + "\n")
    env = dict(environment(torch.device("cpu"), ds), engine="scratch", numpy_blas=_blas_name())
    atomic_write_text(run_dir / "env.json", json.dumps(env, indent=2) + "\n")
    log(f"run folder {run_dir}\nconfig {json.dumps(asdict(cfg))}\n{ds.summary()}\n"
        f"model {cfg.model} (scratch engine, numpy): {n_params:,} parameters; "
        f"{cfg.epochs} epochs of {steps_per_epoch} steps")
    meta_base = dict(model=cfg.model, model_kwargs=dict(cfg.model_kwargs, img_size=h), in_chans=1,
                     num_classes=ds.num_classes, classes=list(ds.classes), mean=ds.mean, std=ds.std,
                     config=asdict(cfg))
    metrics_file = run_dir / "metrics.jsonl"
    metrics_file.write_text("")
    step, best_val, train_seconds = 0, 0.0, 0.0
    params = model.parameters()
    with StopFlag() as stop:
        for epoch in range(cfg.epochs):
            perm = epoch_permutation(len(train_y), cfg.seed, epoch).numpy()
            loss_sum, correct, seen = 0.0, 0, 0
            t0 = time.perf_counter()
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=steps_per_epoch, leave=False, unit="step", desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           file=sys.stderr)
            for i in range(steps_per_epoch):
                idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                x, y = to_input(train_x[idx], ds.mean, ds.std), train_y[idx]
                nn.manual_seed(step_seed(cfg.seed, step))  # dropout masks: a function of (seed, step)
                lr = get_lr(step, total_steps, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                logits = model(tensor(x))  # (B, K)
                loss = F.cross_entropy(logits, y, cfg.label_smoothing)
                if not np.isfinite(loss.data):
                    raise TrainingDiverged(f"the loss became {loss.item()} at step {step} (epoch {epoch + 1}, "
                                           f"batch {i + 1}, lr {lr:.3g}). Try a lower --lr or --grad-clip.")
                optimizer.zero_grad()
                loss.backward()
                if cfg.grad_clip:
                    clip_grad_norm(params, cfg.grad_clip)
                optimizer.step()
                step += 1
                loss_sum += loss.item() * len(y)
                correct += int((logits.data.argmax(1) == y).sum())
                seen += len(y)
                if bar is not None:
                    bar.update(1)
                    if i % 10 == 0:
                        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.2%}",
                                        img_s=f"{seen / (time.perf_counter() - t0):,.0f}")
                if stop.requested:
                    break
            if bar is not None:
                bar.close()
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            val_loss, val_acc, _ = evaluate(model, val_x, val_y, ds.mean, ds.std, cfg.eval_batch_size)
            best_val = max(best_val, val_acc)
            record = dict(epoch=epoch + 1, step=step, train_loss=loss_sum / max(seen, 1),
                          train_accuracy=correct / max(seen, 1), val_loss=val_loss, val_accuracy=val_acc, lr=lr,
                          seconds=seconds, images_per_second=seen / seconds)
            with open(metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            save(ckpt_path, model, dict(meta_base, step=step, epoch=epoch + 1, best_val_accuracy=best_val,
                                        train_seconds=train_seconds))
            log(epoch_summary(record, cfg.epochs))
            if stop.requested:
                log(f"interrupted in epoch {epoch + 1}; weights saved in {ckpt_path} "
                    "(the scratch engine does not resume)")
                raise KeyboardInterrupt

    val_loss, val_acc, _ = evaluate(model, val_x, val_y, ds.mean, ds.std, cfg.eval_batch_size)
    test_loss, test_acc, _ = evaluate(model, ds.test_images.numpy(), ds.test_labels.numpy(), ds.mean, ds.std,
                                      cfg.eval_batch_size)
    results = dict(dataset=ds.name, model=cfg.model, engine="scratch", test_accuracy=test_acc, test_loss=test_loss,
                   val_accuracy=val_acc, best_val_accuracy=best_val, epochs=cfg.epochs, steps=step,
                   train_seconds=train_seconds, params=n_params, device="cpu (numpy)")
    write_results(run_dir, results)
    return results


def _blas_name() -> str | None:
    """Which BLAS numpy uses (it decides the matmul speed), from numpy's build config."""
    try:
        cfg = np.show_config(mode="dicts")
        return cfg["Build Dependencies"]["blas"]["name"]
    except Exception:  # an older numpy without mode="dicts"
        return None
