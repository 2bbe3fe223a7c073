"""Pre-training without labels: masked patch modelling (models/mae.py) on the run machinery of `train`.

    mnistlab pretrain --dataset fashion-mnist                  # MAE, 75% of the patches hidden
    mnistlab pretrain --dataset digits --epochs 3 --batch-size 64   # offline, seconds
    mnistlab pretrain --resume runs/<run>                      # continue exactly where it stopped
    mnistlab train --model vit --init runs/<run> --labels-per-class 100        # then fine-tune it
    mnistlab train --model vit --init runs/<run> --freeze-encoder --lr 0.01    # or probe it linearly

What it reads: the training split's images, and the validation split's images for the
reconstruction loss curve and figures. Never a label, never the test split: the dataset is cut down
to `UnlabelledImages` as soon as it is loaded, and a test runs pre-training on a dataset whose
labels and test split raise when touched. Validation images never reach the weights either (a test
changes them and gets the same checkpoint).

The run folder is train's (run.py): config.json (a PretrainConfig), env.json, metrics.jsonl (one
record per epoch: the training and validation reconstruction losses, seconds, images/s),
checkpoint.safetensors (the encoder under model/encoder.*, the decoder, the optimizer, the loop's
TrainState: resume after a SIGKILL is bit-identical), results.json at the end, plus
reconstructions/epoch_NNN.png (original, masked, reconstructed validation images, the same images
and masks every epoch) and reconstruction_loss.png. The epochs run in loop.fit, the same loop as
`train`: this module supplies the engine (its step, its validation, its checkpoint).

Why MAE, with per-patch normalised targets and a one-block decoder: `python bench/mae_vs_simmim.py
--budget 120 --threads 1 --variants ...` pre-trained the default ViT (patch 7, 16 patches, 75% hidden)
on Fashion-MNIST's 55,000 training images for the same ~2 minutes each, then fitted a linear probe on
the frozen features of K labelled images per class (3 subsets), scored on the 5,000 validation images
(2-core AMD EPYC, 1 thread, torch 2.13; mean +- std over the subsets):

    encoder                      images/s  epochs  probe, 10/class   probe, 100/class
    random (no pre-training)         -        -    49.34 +- 2.17%    66.63 +- 1.01%
    MAE                            5,004      9    72.00 +- 1.44%    80.37 +- 0.53%
    SimMIM                         3,544      7    60.24 +- 0.89%    73.25 +- 0.63%
    MAE, raw pixel targets         5,177     10    70.89 +- 1.40%    78.94 +- 0.49%
    MAE, two decoder blocks        3,919      8    72.39 +- 0.98%    80.12 +- 0.50%

MAE beats SimMIM by 12 and 7 points at equal time. Part of it is speed (its encoder sees 4 tokens, not
16: 1.4x the images/s, 9 epochs to SimMIM's 7); equal epochs were not measured. Per-patch normalised
targets add 1.1-1.4 points; a second decoder block is a tie that costs 22% of the throughput, so one.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch

from mnistlab.checkpoint import PRETRAIN_KIND
from mnistlab.config import PretrainConfig, model_label
from mnistlab.data.batches import augment_batch, to_input
from mnistlab.data.dataset import Dataset, load_dataset
from mnistlab.lifecycle import (
    apply_process_settings,
    finished_results,
    make_optimizer,
    memory_errors_as_user_error,
    pick_device,
    process_settings,
    resume_config,
    save_run_checkpoint,
    starting_state,
)
from mnistlab.loop import Engine, TrainState, fit, step_seed
from mnistlab.models import create_model
from mnistlab.models.flops import count_params
from mnistlab.models.mae import MaskedImageModel, create_masked_model, hide, random_mask
from mnistlab.run import RESULTS, RunFolder, duration_text, environment, note, plural, say

VAL_MASK_SEED = 2021  # one fixed mask per validation image, the same every epoch and every run
FIGURE_IMAGES = 8  # validation images in each reconstruction figure


@dataclass(frozen=True)
class UnlabelledImages:
    """All pre-training may see of a dataset: training and validation images, pixel statistics, provenance."""

    name: str
    train: torch.Tensor  # (N, H, W) uint8
    val: torch.Tensor  # (M, H, W) uint8: the reconstruction loss curve only
    mean: float
    std: float
    mirror_symmetric: bool
    source: str
    location: str
    file_sha256: dict[str, str]

    @classmethod
    def of(cls, ds: Dataset) -> UnlabelledImages:
        """The label-free part of `ds` (nothing else of it is read)."""
        return cls(ds.name, ds.train_images, ds.val_images, ds.mean, ds.std, ds.mirror_symmetric, ds.source,
                   ds.location, ds.file_sha256)

    def summary(self) -> str:
        return (f"{self.name}: {len(self.train):,} training images (no labels), {len(self.val):,} validation images "
                f"for the loss curve; mean {self.mean:.4f} std {self.std:.4f}; from {self.source} ({self.location})")


def load_images(cfg: PretrainConfig) -> UnlabelledImages:
    ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, offline=cfg.offline, val_size=cfg.val_size)
    return UnlabelledImages.of(ds)


class PretrainEngine(Engine):
    """One pre-training run's torch objects and its step; loop.fit drives it as it drives TorchEngine."""

    command = "pretrain"  # how the loop tells the user to continue an interrupted run

    def __init__(self, cfg: PretrainConfig, images: UnlabelledImages, device: torch.device, run: RunFolder) -> None:
        self.cfg, self.images, self.device, self.run = cfg, images, device, run
        self.train_x, self.val_x = images.train.to(device), images.val.to(device)
        torch.manual_seed(cfg.seed)  # the initial weights
        encoder = create_model(cfg.model, in_chans=1, num_classes=1, **cfg.model_kwargs)
        self.model: MaskedImageModel = create_masked_model(
            cfg.method, encoder, norm_pix_loss=cfg.target == "patch-norm", decoder_dim=cfg.decoder_dim,
            decoder_depth=cfg.decoder_depth, decoder_heads=cfg.decoder_heads).to(device)
        self.optimizer = make_optimizer(self.model, cfg)
        self.hflip = cfg.hflip == "on" or (cfg.hflip == "auto" and images.mirror_symmetric)
        self.background = (0.0 - images.mean) / images.std  # a black pixel, normalised
        self.steps_per_epoch = math.ceil(len(images.train) / cfg.batch_size)
        gen = torch.Generator().manual_seed(VAL_MASK_SEED)
        self.val_mask = random_mask(len(images.val), self.model.n_patches, cfg.mask_ratio, generator=gen).to(device)
        self.model.train()

    def meta(self) -> dict[str, Any]:
        """The checkpoint header besides the training state: enough to rebuild the encoder alone (train --init)."""
        cfg = self.cfg
        return dict(kind=PRETRAIN_KIND, model=cfg.model, model_kwargs=cfg.model_kwargs, in_chans=1, method=cfg.method,
                    mask_ratio=cfg.mask_ratio, target=cfg.target, dataset=self.images.name, mean=self.images.mean,
                    std=self.images.std, config=cfg.to_dict(), total_steps=self.steps_per_epoch * cfg.epochs)

    def train_step(self, idx: torch.Tensor, step: int, lr: float) -> tuple[torch.Tensor, None]:
        """One optimizer step on the training images `idx`; returns (loss, None): there is no accuracy."""
        torch.manual_seed(step_seed(self.cfg.seed, step))  # this step's flips and masks
        with memory_errors_as_user_error(len(idx), "--batch-size", self.device):
            x = to_input(self.train_x[idx], self.images.mean, self.images.std)  # (B, 1, H, W)
            x = augment_batch(x, "none", self.background, hflip=self.hflip)
            mask = random_mask(len(idx), self.model.n_patches, self.cfg.mask_ratio, self.device)  # (B, N)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, _ = self.model.loss(x, mask)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip, foreach=True)
            self.optimizer.step()
        return loss.detach(), None

    @torch.no_grad()
    def validate(self) -> tuple[float, None]:
        """(reconstruction loss on the validation images with their fixed masks, None)."""
        self.model.eval()
        total, bs = 0.0, self.cfg.eval_batch_size
        for i in range(0, len(self.val_x), bs):
            x = to_input(self.val_x[i : i + bs], self.images.mean, self.images.std)
            loss, _ = self.model.loss(x, self.val_mask[i : i + bs])
            total += float(loss) * len(x)  # every image hides the same number of patches: a plain mean
        self.model.train()
        return total / max(len(self.val_x), 1), None

    def save(self, state: TrainState) -> None:
        """The checkpoint; at an epoch's end, that epoch's reconstruction figure first (so a checkpoint's epoch
        always has its figure)."""
        if state.step % self.steps_per_epoch == 0:
            self.draw_reconstructions(state.step // self.steps_per_epoch)
        save_run_checkpoint(self.run, self.model, self.optimizer, self.meta(), state)

    def draw_reconstructions(self, epoch: int) -> None:
        """reconstructions/epoch_NNN.png: the first validation images, their fixed masks, the model's filling-in."""
        from mnistlab.plots import image_rows_figure, save_figure

        self.model.eval()
        x = to_input(self.val_x[:FIGURE_IMAGES], self.images.mean, self.images.std)  # (B, 1, H, W)
        mask = self.val_mask[:FIGURE_IMAGES]
        rows = [("original", x), ("masked", hide(x, mask, self.model.patch)),
                ("reconstructed", self.model.reconstruct(x, mask))]
        self.model.train()
        white = (1.0 - self.images.mean) / self.images.std
        fig = image_rows_figure([(label, t[:, 0].cpu().numpy()) for label, t in rows], self.background, white,
                                title=f"{self.cfg.method.upper()} on {self.images.name}, epoch {epoch}: "
                                      f"{self.cfg.mask_ratio:.0%} of the patches hidden (validation images)")
        save_figure(fig, self.run.path / "reconstructions" / f"epoch_{epoch:03d}.png")


def pretrain(cfg: PretrainConfig, *, resume: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Run the pre-training `cfg` describes, or resume the one in cfg.run_dir; return results.json's contents."""
    with process_settings():
        return _resume(cfg, progress) if resume else _start(cfg, progress)


def _start(cfg: PretrainConfig, progress: bool | None) -> dict[str, Any]:
    apply_process_settings(cfg)
    device = pick_device(cfg.device)
    images = load_images(cfg)
    cfg.dataset = images.name
    with RunFolder.create(cfg.run_dir, images.name, f"{cfg.method}-{cfg.model}") as run:
        cfg.run_dir = str(run.path)
        engine = PretrainEngine(cfg, images, device, run)
        run.begin(cfg, environment(str(device), images))
        return _fit_and_finish(engine, TrainState(), progress)


def _resume(cfg: PretrainConfig, progress: bool | None) -> dict[str, Any]:
    with RunFolder.open(cfg.run_dir) as run:
        cfg, read = resume_config(run, cfg)
        apply_process_settings(cfg)
        results = finished_results(run, read, read[1]["total_steps"] if read is not None else math.inf, cfg.epochs)
        if results is not None:
            return results
        engine = PretrainEngine(cfg, load_images(cfg), pick_device(cfg.device), run)
        total_steps = engine.steps_per_epoch * cfg.epochs
        state = starting_state(run, engine.model, engine.optimizer, read, engine.steps_per_epoch, total_steps)
        return _fit_and_finish(engine, state, progress)


def _fit_and_finish(engine: PretrainEngine, state: TrainState, progress: bool | None) -> dict[str, Any]:
    cfg, images, run = engine.cfg, engine.images, engine.run
    if engine.hflip != (cfg.hflip == "on"):
        note(f"--hflip auto: random left-right flips {'on' if engine.hflip else 'off'} for {images.name}")
    encoder_params = count_params(engine.model.encoder)
    note(f"{images.summary()}\n{cfg.method.upper()} around {model_label(cfg.model, cfg.model_kwargs)}: "
         f"{encoder_params:,} encoder parameters, {count_params(engine.model) - encoder_params:,} in the decoder, on "
         f"{engine.device}, {plural(torch.get_num_threads(), 'thread')}; {plural(cfg.epochs, 'epoch')} of "
         f"{plural(engine.steps_per_epoch, 'step')}")
    fit(cfg, engine, state, run, len(images.train), sys.stderr.isatty() if progress is None else progress)
    records = run.read_metrics()
    results = dict(kind=PRETRAIN_KIND, dataset=images.name, model=cfg.model, model_kwargs=cfg.model_kwargs,
                   method=cfg.method, mask_ratio=cfg.mask_ratio, val_loss=records[-1]["val_loss"],
                   first_val_loss=records[0]["val_loss"],
                   epochs=cfg.epochs, steps=state.step, train_seconds=state.train_seconds,
                   images_per_second=len(images.train) * cfg.epochs / max(state.train_seconds, 1e-9),
                   encoder_params=encoder_params, decoder_params=count_params(engine.model) - encoder_params,
                   device=str(engine.device))
    from mnistlab.plots import reconstruction_loss_figure, save_figure

    save_figure(reconstruction_loss_figure(records, f"{cfg.method.upper()} on {images.name}"),
                run.path / "reconstruction_loss.png")
    run.write_json(RESULTS, results)
    say(f"validation reconstruction loss {results['val_loss']:.4f} (epoch 1: {results['first_val_loss']:.4f}), "
        f"{duration_text(results['train_seconds'])} at {results['images_per_second']:,.0f} images/s; fine-tune with "
        f"`mnistlab train --model {cfg.model} --init {run.path}`")
    return results
