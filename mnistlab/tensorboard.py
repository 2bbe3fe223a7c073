"""TensorBoard logs of a run (`mnistlab train --tensorboard`), in RUN_DIR/tb/, through torch.utils.tensorboard.

    pip install "mnistlab[tensorboard]"
    mnistlab train --dataset digits --tensorboard --run-dir runs/a
    tensorboard --logdir runs                  # every run side by side (each shows as <run>/tb)

At each epoch's end, at global step = the optimisation steps done (metrics.jsonl's `step`): the epoch's
metrics.jsonl values (loss/, accuracy/, lr, images_per_second; TensorBoard scalars are float32, so they
are the file's numbers rounded to float32), histograms of every parameter (weights/<name>) and of its
gradient at the epoch's last step, before clipping (grads/<name>), and the predictions on the first 16
validation images (predictions/val: green when right, red when wrong).

Resume: the writer opens a new event file whose first event purges every step after the checkpoint's
(SummaryWriter's purge_step), and each epoch's events are flushed before its checkpoint is written, so a
run killed at any moment and resumed shows each step once, as the uninterrupted run would.
The module imports tensorboard only when a writer is made: without --tensorboard nothing loads it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnistlab.data.batches import to_input
from mnistlab.errors import UserError

TB_DIR = "tb"
N_SAMPLES = 16  # validation images shown with their predictions: a 4 x 4 grid
HIST_BINS = 64  # equal buckets from a tensor's min to its max (TensorBoard redraws them as 30)
INSTALL = 'pip install "mnistlab[tensorboard]"'


def require_tensorboard() -> None:
    """Fail at once, before any data is loaded, when the tensorboard package is missing."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise UserError(f"--tensorboard needs the tensorboard package: {INSTALL}") from None


class TensorBoardLog:
    """The SummaryWriter of one run and what it records at each epoch's end."""

    def __init__(self, run_dir: Path, model: torch.nn.Module, val_images: torch.Tensor, val_labels: torch.Tensor,
                 classes: tuple[str, ...], mean: float, std: float, purge_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at this step and after, left by a killed run, are hidden (a resume redoes them)
        self.writer = SummaryWriter(str(Path(run_dir) / TB_DIR), purge_step=purge_step)
        self.model, self.classes = model, classes
        device = next(model.parameters()).device
        self.sample_u8 = val_images[:N_SAMPLES].cpu()  # (S, H, W) uint8
        self.sample_x = to_input(val_images[:N_SAMPLES], mean, std).to(device)  # (S, 1, H, W)
        self.sample_y = val_labels[:N_SAMPLES].cpu()
        self.grads: dict[str, torch.Tensor] = {}

    def keep_grads(self) -> None:
        """Copy the gradients now in .grad (the epoch's last step, before clipping) for log_epoch."""
        self.grads = {name: p.grad.detach().to("cpu", copy=True)
                      for name, p in self.model.named_parameters() if p.grad is not None}

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Write an epoch's metrics.jsonl record, histograms and sample predictions; flush before the checkpoint."""
        step, w = record["step"], self.writer
        for tag, key in (("loss/train", "train_loss"), ("loss/val", "val_loss"), ("accuracy/train", "train_accuracy"),
                         ("accuracy/val", "val_accuracy"), ("lr", "lr"), ("images_per_second", "images_per_second")):
            # classic float32 scalars: readers list them as scalars and apply purge_step to them (a float64
            # tensor scalar would be exact, but EventAccumulator purges no tensors on resume)
            w.add_scalar(tag, record[key], step)
        for name, p in self.model.named_parameters():
            self.histogram(f"weights/{name}", p, step)
        for name, g in self.grads.items():
            self.histogram(f"grads/{name}", g, step)
        self.grads = {}
        w.add_image("predictions/val", self.predictions_grid(), step, dataformats="HWC")
        w.flush()

    @torch.no_grad()
    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        """Counted by torch.histc where it lies: add_histogram's numpy binning (float64 copies, a sort over
        ~1,500 edges) took ~100 ms an epoch for the default CNN, as long as a digits epoch's steps."""
        v = values.detach().reshape(-1).float()
        vmin, vmax = v.min().item(), v.max().item()
        if not (math.isfinite(vmin) and math.isfinite(vmax)):
            return  # an inf or nan gradient has no bucket; the loss check reports the divergence
        counts = torch.histc(v, HIST_BINS, vmin, vmax).tolist()
        # histc counts a constant tensor (min == max) over [min - 1, max + 1]: the edges follow the same range
        lo, hi = (vmin - 1, vmax + 1) if vmin == vmax else (vmin, vmax)
        v64 = v.double()
        # bucket_limits are right edges: an empty bucket ending at `lo` gives the first bucket its left edge
        self.writer.add_histogram_raw(tag, min=vmin, max=vmax, num=v.numel(), sum=v64.sum().item(),
                                      sum_squares=v64.dot(v64).item(),
                                      bucket_limits=np.linspace(lo, hi, HIST_BINS + 1).tolist(),
                                      bucket_counts=[0.0, *counts], global_step=step)

    @torch.no_grad()
    def predictions_grid(self) -> np.ndarray:
        """The sample images with 'true' and 'pred' captions, as one (H, W, 3) uint8 picture."""
        was_training = self.model.training
        self.model.eval()
        predicted = self.model(self.sample_x).argmax(1).cpu()  # (S,)
        self.model.train(was_training)
        return caption_grid(self.sample_u8.numpy(), self.sample_y.numpy(), predicted.numpy(), self.classes)

    def close(self) -> None:
        self.writer.close()


def caption_grid(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...],
                 cols: int = 4) -> np.ndarray:
    """Images (S, H, W) uint8 in a grid, each above its true and predicted class: (H', W', 3) uint8."""
    from PIL import Image, ImageDraw  # Pillow comes with matplotlib

    s, h, w = images.shape
    zoom = max(1, 56 // h)
    cell_w, cell_h, text_h = 112, h * zoom + 28, 24
    rows = -(-s // cols)
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(s):
        x0, y0 = (i % cols) * cell_w, (i // cols) * cell_h
        picture = Image.fromarray(images[i]).resize((w * zoom, h * zoom), Image.NEAREST)
        canvas.paste(picture.convert("RGB"), (x0 + (cell_w - w * zoom) // 2, y0 + 2))
        colour = (0, 128, 0) if predicted[i] == labels[i] else (200, 0, 0)
        ty = y0 + cell_h - text_h
        draw.text((x0 + 4, ty), f"true {classes[labels[i]]}"[:18], fill=(0, 0, 0))
        draw.text((x0 + 4, ty + 11), f"pred {classes[predicted[i]]}"[:18], fill=colour)
    return np.asarray(canvas)
