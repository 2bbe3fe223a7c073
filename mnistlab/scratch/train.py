"""`mnistlab train --engine scratch`: the same run, trained by the numpy engine instead of torch.

Same config, same data split, same per-epoch order, same learning-rate schedule, and the same run
folder (config.json, env.json, metrics.jsonl, checkpoint.safetensors, results.json), so runs of the
two engines compare line by line: both run loop.fit, this module supplies the numpy step. The data
layer hands over tensors; from there on it is numpy.
Supported: models mlp and cnn (nn.MLP, nn.CNN), optimizers sgd and adamw, label smoothing,
gradient clipping; no augmentation and no resume (the torch engine has both).

Unlike mnistlab.scratch itself, this module imports torch (through the data layer and the
checkpoint writer): it is the glue between the engine and the product.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mnistlab.loop import Engine
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
    if cfg.threads is not None:
        problems.append("--threads (numpy's BLAS sets its own; use OPENBLAS_NUM_THREADS)")
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


class ScratchEngine(Engine):
    """The numpy engine's step, validation and checkpoint, driven by the same loop as torch's (loop.fit)."""

    device = "cpu"  # the epoch permutation is made on the CPU and handed over as numpy indices
    resumable = False  # its checkpoint holds weights only, no optimizer state

    def __init__(self, cfg, ds, run) -> None:
        self.cfg, self.ds, self.run = cfg, ds, run
        self.train_x, self.train_y = ds.train_images.numpy(), ds.train_labels.numpy()
        self.val_x, self.val_y = ds.val_images.numpy(), ds.val_labels.numpy()
        h, w = self.train_x.shape[1:]
        nn.manual_seed(cfg.seed)
        self.model = nn.create_model(cfg.model, in_chans=1, num_classes=ds.num_classes, img_size=h,
                                     **cfg.model_kwargs)
        self.optimizer = make_optimizer(self.model, cfg)
        self.params = self.model.parameters()
        self.meta = dict(model=cfg.model, model_kwargs=dict(cfg.model_kwargs, img_size=h), in_chans=1,
                         num_classes=ds.num_classes, classes=list(ds.classes), mean=ds.mean, std=ds.std,
                         config=cfg.to_dict(), engine="scratch")

    def train_step(self, idx, step: int, lr: float) -> tuple[float, int]:
        from mnistlab.loop import step_seed

        idx = idx.numpy()
        x, y = to_input(self.train_x[idx], self.ds.mean, self.ds.std), self.train_y[idx]
        nn.manual_seed(step_seed(self.cfg.seed, step))  # dropout masks: a function of (seed, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        logits = self.model(tensor(x))  # (B, K)
        loss = F.cross_entropy(logits, y, self.cfg.label_smoothing)  # the loop stops on a non-finite loss
        self.optimizer.zero_grad()
        loss.backward()
        if self.cfg.grad_clip:
            clip_grad_norm(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        return loss.item(), int((logits.data.argmax(1) == y).sum())

    def validate(self) -> tuple[float, float]:
        loss, accuracy, _ = evaluate(self.model, self.val_x, self.val_y, self.ds.mean, self.ds.std,
                                     self.cfg.eval_batch_size)
        return loss, accuracy

    def save(self, state) -> None:
        import torch

        from mnistlab.checkpoint import CHECKPOINT, write_tensors

        tensors = {f"model/{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.model.state_dict().items()}
        write_tensors(self.run.file(CHECKPOINT), tensors, dict(self.meta, **state.to_meta()))


def load_model(path: Path, read: tuple[dict, dict[str, Any]] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a scratch model from its checkpoint file alone (`read`: read_checkpoint's result, if at hand)."""
    from mnistlab.checkpoint import prefixed, read_checkpoint
    from mnistlab.errors import UserError

    tensors, meta = read if read is not None else read_checkpoint(path)
    try:
        model = nn.create_model(meta["model"], in_chans=meta["in_chans"], num_classes=meta["num_classes"],
                                **meta["model_kwargs"])
        model.load_state_dict({k: v.numpy() for k, v in prefixed(tensors, "model").items()})
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: the checkpoint does not fit the scratch model it names ({e})") from None
    return model.eval(), meta


def train(cfg, progress: bool | None = None) -> dict[str, Any]:
    """Train cfg.model with the numpy engine; write the run folder; return results.json's contents."""
    from mnistlab.data.dataset import load_dataset
    from mnistlab.errors import UserError
    from mnistlab.loop import TrainState, fit
    from mnistlab.run import RunFolder, environment, note, plural

    check_supported(cfg)
    ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, offline=cfg.offline, val_size=cfg.val_size)
    cfg.dataset = ds.name
    h, w = ds.image_size
    if h != w:
        raise UserError(f"the scratch models take square images, {ds.name} has {h}x{w}")
    with RunFolder.create(cfg.run_dir, ds.name, cfg.model) as run:
        cfg.run_dir = str(run.path)
        engine = ScratchEngine(cfg, ds, run)
        run.begin(cfg, environment("cpu (numpy)", ds, engine="scratch", numpy_blas=_blas_name()))
        n_params = sum(p.data.size for p in engine.params)
        steps = math.ceil(len(engine.train_y) / cfg.batch_size)
        note(f"{ds.summary()}\nmodel {cfg.model} (scratch engine, numpy): {n_params:,} parameters; "
             f"{plural(cfg.epochs, 'epoch')} of {plural(steps, 'step')}")
        state = TrainState()
        fit(cfg, engine, state, run, len(engine.train_y), sys.stderr.isatty() if progress is None else progress)
        val_loss, val_acc, _ = evaluate(engine.model, engine.val_x, engine.val_y, ds.mean, ds.std,
                                        cfg.eval_batch_size)
        test_loss, test_acc, _ = evaluate(engine.model, ds.test_images.numpy(), ds.test_labels.numpy(), ds.mean,
                                          ds.std, cfg.eval_batch_size)
        if not (math.isfinite(val_loss) and math.isfinite(test_loss)):
            from mnistlab.loop import TrainingDiverged

            raise TrainingDiverged(f"the weights became non-finite in the last epoch (test loss {test_loss}); "
                                   "results.json was not written")
        results = dict(dataset=ds.name, model=cfg.model, engine="scratch", test_accuracy=test_acc,
                       test_loss=test_loss, val_accuracy=val_acc, best_val_accuracy=state.best_val_accuracy,
                       epochs=cfg.epochs, steps=state.step, train_seconds=state.train_seconds, params=n_params,
                       device="cpu (numpy)")
        run.write_results(results)
        return results


def _blas_name() -> str | None:
    """Which BLAS numpy uses (it decides the matmul speed), from numpy's build config."""
    try:
        cfg = np.show_config(mode="dicts")
        return cfg["Build Dependencies"]["blas"]["name"]
    except Exception:  # an older numpy without mode="dicts"
        return None
