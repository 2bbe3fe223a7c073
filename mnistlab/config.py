"""The one configuration of a training run, its per-model defaults, and the named recipes.

Every training field is declared once, here: its default, its help text, and what values it accepts.
The `mnistlab train` flags are generated from these declarations (cli.py), and the same checks run
whenever a config is built, from flags or from a config.json, so `schedule="cosin"` is refused with
one clear line instead of training with some other schedule.

Precedence, lowest first: the dataclass defaults, the model's defaults (MODEL_DEFAULTS), the
dataset's adjustments (DATASET_DEFAULTS: a small set needs smaller batches and more epochs to take
enough steps), the recipe (RECIPES), then the flags given on the command line. The resolved config
is printed at the start of a run and saved as config.json in its folder; the checkpoint carries it
too, and `--resume` takes it from there.

Why the defaults are what they are: docs/experiments.md holds the measurements.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from mnistlab.errors import UserError

# What a field accepts. Each kind is a check on the parsed value (CLI and config.json alike).
SEED_MAX = 2**63 - 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    if _is_int(v):
        return abs(v) < 2**63  # a JSON integer can be any size; float(10**400) would overflow
    return isinstance(v, float) and math.isfinite(v)


KINDS: dict[str, tuple[Any, str]] = {
    # kind: (predicate, what it accepts)
    "str": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "positive_int": (lambda v: _is_int(v) and 1 <= v <= 2**31 - 1, "an integer from 1 to 2147483647"),
    "seed": (lambda v: _is_int(v) and 0 <= v <= SEED_MAX, f"an integer from 0 to {SEED_MAX}"),
    "positive_float": (lambda v: _is_num(v) and v > 0, "a finite number > 0"),
    "nonneg_float": (lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
    "fraction": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "steps": (lambda v: isinstance(v, list) and len(v) > 0 and all(_is_int(s) and s >= 0 for s in v),
              "a non-empty list of step numbers >= 0"),
    "dict": (lambda v: isinstance(v, dict), "a JSON object"),
}


def opt(default: Any, help: str, kind: str = "str", *, choices: tuple[str, ...] | None = None,
        optional: bool = False, flag: bool = True, group: str = "run") -> Any:
    """A config field with its help text and the values it accepts (read by the CLI and by validate)."""
    meta = dict(help=help, kind=kind, choices=choices, optional=optional, flag=flag, group=group)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


C = TypeVar("C", bound="FieldConfig")


def model_label(model: str, model_kwargs: dict[str, Any]) -> str:
    """A model as messages name it: `vit`, or `vit (depth=1, dim=32)` with the options it was given."""
    if not model_kwargs:
        return model
    return f"{model} ({', '.join(f'{k}={v}' for k, v in sorted(model_kwargs.items()))})"


class FieldConfig:
    """What every run config shares: each field checked against its declaration (opt), JSON in and out.
    A subclass is a dataclass of opt() fields; `problems` adds the checks that involve several fields."""

    def __post_init__(self) -> None:
        self.validate()

    def problems(self) -> list[str]:
        """Checks across fields, beyond each field's own (none here)."""
        return []

    def validate(self) -> None:
        """Refuse any value a field does not accept, naming the field and what it takes."""
        problems = []
        for f in fields(self):
            value, m = getattr(self, f.name), f.metadata
            if value is None and m["optional"]:
                continue
            check, accepts = KINDS[m["kind"]]
            if m["choices"] is not None:
                ok, accepts = value in m["choices"], "one of " + ", ".join(m["choices"])
            else:
                ok = check(value)
            if not ok:
                problems.append(f"{f.name} = {value!r} (expected {accepts})")
        kwargs = getattr(self, "model_kwargs", None)
        reserved = sorted(set(kwargs) & {"in_chans", "num_classes", "img_size"}) if isinstance(kwargs, dict) else []
        if reserved:
            problems.append(f"model_kwargs sets {', '.join(reserved)} (the dataset decides these)")
        problems += self.problems()
        if problems:
            raise UserError("invalid config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, allow_nan=False)

    def describe(self, width: int = 100) -> str:
        """The config as readable lines of key=value (printed at the start of a run)."""
        lines, line = [], "config:"
        for key, value in asdict(self).items():
            item = f" {key}={json.dumps(value)}"
            if len(line) + len(item) > width:
                lines.append(line)
                line = "  "
            line += item
        return "\n".join([*lines, line])

    @classmethod
    def from_dict(cls: type[C], d: Any, source: str = "config") -> C:
        if not isinstance(d, dict):
            raise UserError(f"{source}: expected a JSON object of config fields")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"{source} has unknown keys: {', '.join(sorted(unknown))}")
        try:
            return cls(**d)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        """Read a config.json; a missing, unreadable or invalid file is a one-line UserError."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable config ({e})") from None
        return cls.from_dict(data, source=str(path))


@dataclass
class TrainConfig(FieldConfig):
    # data
    dataset: str | None = opt("mnist", "mnist, fashion-mnist, kmnist or digits (default: mnist; with --data-dir: "
                              "what the folder's files are)", optional=True, group="data")
    data_dir: str | None = opt(None, "a folder holding the four standard IDX files (gzipped or not); searched "
                               "before everything else", optional=True, group="data")
    offline: bool = opt(False, "never download; fail with the offline choices when the dataset is not on disk",
                        "bool", group="data")
    val_size: int | None = opt(None, "validation images carved from train (default: 5000, a tenth for small sets)",
                               "positive_int", optional=True, group="data")
    labels_per_class: int | None = opt(None, "train on a fixed, seeded (--seed) subset of K labelled images per class "
                                       "of the training split, recorded in labelled_subset.json; an epoch shows each "
                                       "of them ceil(validation images / (K x classes)) times. Validation and test "
                                       "stay whole", "positive_int", optional=True, group="data")
    # model
    model: str = opt("cnn", "a name from `mnistlab models` (default: cnn)", group="model")
    model_kwargs: dict[str, Any] = opt({}, "model options (--model-arg KEY=VALUE, --seq)", "dict", flag=False,
                                       group="model")
    engine: str = opt("torch", "torch, or scratch: mnistlab's own numpy autograd engine (mlp and cnn)",
                      choices=("torch", "scratch"), group="model")
    init: str | None = opt(None, "start from the encoder of a `mnistlab pretrain` run folder (--model and --model-arg "
                           "must build the same architecture); the classification head starts fresh",
                           optional=True, group="model")
    freeze_encoder: bool = opt(False, "with --init: train only the classification head on the frozen pre-trained "
                               "features (a linear probe); the encoder's weights stay exactly as pre-trained",
                               "bool", group="model")
    # optimisation
    epochs: int = opt(5, "passes over the training set", "positive_int", group="optimisation")
    batch_size: int = opt(128, "images per step", "positive_int", group="optimisation")
    lr: float = opt(0.05, "peak learning rate", "positive_float", group="optimisation")
    optimizer: str = opt("sgd", "sgd (momentum 0.9, Nesterov), adamw, or muon: sgd with each hidden conv's step "
                         "orthogonalized (mnistlab/optim.py)", choices=("sgd", "adamw", "muon"), group="optimisation")
    muon_lr: float = opt(0.05, "with --optimizer muon: the peak learning rate of the orthogonalized conv steps "
                         "(the schedule scales it as it scales --lr)", "positive_float", group="optimisation")
    schedule: str = opt("onecycle", "learning-rate schedule after the linear warm-up",
                        choices=("onecycle", "cosine", "constant"), group="optimisation")
    warmup: float = opt(0.2, "fraction of all steps spent warming up", "fraction", group="optimisation")
    weight_decay: float = opt(5e-4, "decoupled (adamw) or L2 (sgd) weight decay; not on biases and norms",
                              "nonneg_float", group="optimisation")
    label_smoothing: float = opt(0.0, "label smoothing in [0, 1)", "fraction", group="optimisation")
    grad_clip: float | None = opt(None, "clip the global gradient norm to this value (default: no clipping)",
                                  "positive_float", optional=True, group="optimisation")
    augment: str = opt("none", "batched on-device augmentation: random +-2 px shifts, or affine warps",
                       choices=("none", "shift", "affine"), group="optimisation")
    erase: float = opt(0.0, "random erasing: blank one random rectangle (2-25%% of the image) of each training "
                       "image with this probability", "fraction", group="optimisation")
    hflip: str = opt("off", "random left-right flips; auto: only for mirror-symmetric datasets (fashion-mnist)",
                     choices=("off", "on", "auto"), group="optimisation")
    tta: str = opt("auto", "evaluate each image and its mirror image, averaging probabilities; auto: when "
                   "training used flips", choices=("off", "on", "auto"), group="optimisation")
    tta_shifts: str = opt("off", "final evaluation also averages over each image moved 1 pixel in 8 directions "
                          "(9x the views; per-epoch validation goes without); auto: when training used "
                          "--augment shift", choices=("off", "on", "auto"), group="optimisation")
    # diagnostics
    grad_flow: bool = opt(False, "record gradient norms per layer, and per time step for rnn/gru/lstm "
                          "(grad_flow.jsonl)", "bool")
    grad_flow_steps: list[int] | None = opt(None, "steps to record at (default: step 0 and the last step of each "
                                            "epoch)", "steps", optional=True)
    tensorboard: bool = opt(False, "write TensorBoard logs to RUN_DIR/tb/ at each epoch's end: losses, accuracies, lr, "
                            "images/s, weight and gradient histograms, sample predictions (torch engine; needs "
                            'pip install "mnistlab[tensorboard]")', "bool")
    # reproducibility and hardware
    seed: int = opt(0, "seeds weights, order, dropout and augmentation", "seed")
    deterministic: bool = opt(False, "force deterministic kernels (GPU)", "bool")
    device: str = opt("auto", "where to train: auto picks cuda, then mps, then cpu",
                      choices=("auto", "cpu", "cuda", "mps"))
    threads: int | None = opt(None, "CPU threads (default: one per core; more than the cores is capped)",
                              "positive_int", optional=True)
    eval_batch_size: int = opt(1000, "images per evaluation batch", "positive_int")
    precision: str = opt("fp32", "fp32 (default, reproducible), or bf16 autocast; auto: bf16 where the hardware "
                         "computes it natively and it measured faster (CUDA compute capability 8.0+, CPUs with AMX, "
                         "AMD CPUs with AVX512_BF16), fp32 elsewhere; docs/distributed.md",
                         choices=("auto", "fp32", "bf16"))
    compile: bool = opt(False, "torch.compile the training forward and backward (slow first steps; mostly worth it "
                        "on a GPU)", "bool")
    sync_bn: bool = opt(False, "under torchrun on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm); "
                        "by default each process normalises with its own share of the batch", "bool")
    # bookkeeping
    run_dir: str | None = opt(None, "the run folder (default: runs/<time>-<dataset>-<model>)", optional=True)
    recipe: str | None = opt(None, "a named, documented set of values for its model (see above)", optional=True,
                             group="optimisation")

    def problems(self) -> list[str]:
        problems = []
        if self.tensorboard is True and self.engine == "scratch":
            problems.append("tensorboard = True with engine = 'scratch' (the numpy engine writes no TensorBoard "
                            "logs; train with --engine torch)")
        if self.engine == "scratch" and self.init is not None:
            problems.append("init with engine = 'scratch' (a pre-trained encoder is a torch ViT; train with "
                            "--engine torch)")
        if self.engine == "scratch" and self.labels_per_class is not None:
            problems.append("labels_per_class with engine = 'scratch' (the numpy engine trains on the whole split; "
                            "train with --engine torch)")
        if self.engine == "scratch" and (self.precision == "bf16" or self.compile or self.sync_bn):
            problems.append("precision = 'bf16', compile or sync_bn with engine = 'scratch' (the numpy engine "
                            "computes in float64 on the CPU; train with --engine torch)")
        if self.freeze_encoder and self.init is None:
            problems.append("freeze_encoder = True without init (nothing pre-trained to freeze: give --init "
                            "PRETRAIN_RUN_DIR)")
        if self.recipe is not None and self.recipe not in RECIPES:
            problems.append(f"recipe = {self.recipe!r} (known recipes: {', '.join(RECIPES)})")
        elif self.recipe is not None and RECIPES[self.recipe]["model"] != self.model:
            problems.append(f"recipe = {self.recipe!r} is for model {RECIPES[self.recipe]['model']}, not {self.model}")
        return problems


@dataclass
class PretrainConfig(FieldConfig):
    """A `mnistlab pretrain` run: masked patch modelling without labels (pretrain.py; its docstring has the
    measurements behind the defaults)."""

    # data
    dataset: str | None = opt("mnist", "mnist, fashion-mnist, kmnist or digits (default: mnist): its training "
                              "images, without labels", optional=True, group="data")
    data_dir: str | None = opt(None, "a folder holding the four standard IDX files (gzipped or not)", optional=True,
                               group="data")
    offline: bool = opt(False, "never download; fail with the offline choices when the dataset is not on disk",
                        "bool", group="data")
    val_size: int | None = opt(None, "validation images carved from train, as in `train` (default: 5000): only the "
                               "reconstruction loss curve and figures see them", "positive_int", optional=True,
                               group="data")
    # model
    model: str = opt("vit", "the encoder: vit, the zoo's ViT (its options with --model-arg)", choices=("vit",),
                     group="model")
    model_kwargs: dict[str, Any] = opt({}, "encoder options (--model-arg KEY=VALUE)", "dict", flag=False,
                                       group="model")
    method: str = opt("mae", "mae: the encoder sees only the visible patches and a small decoder predicts the "
                      "hidden ones; simmim: the encoder sees a mask token in their place and a linear layer "
                      "predicts them", choices=("mae", "simmim"), group="model")
    mask_ratio: float = opt(0.75, "fraction of the patches hidden in each image", "fraction", group="model")
    target: str = opt("patch-norm", "what a hidden patch's prediction is compared with: its pixels normalised per "
                      "patch (MAE's norm_pix_loss), or the pixels as they are", choices=("patch-norm", "pixels"),
                      group="model")
    decoder_dim: int = opt(64, "MAE decoder width", "positive_int", group="model")
    decoder_depth: int = opt(1, "MAE decoder transformer blocks", "positive_int", group="model")
    decoder_heads: int = opt(4, "MAE decoder attention heads (must divide --decoder-dim)", "positive_int",
                             group="model")
    # optimisation
    epochs: int = opt(100, "passes over the training images", "positive_int", group="optimisation")
    batch_size: int = opt(256, "images per step", "positive_int", group="optimisation")
    lr: float = opt(1.5e-3, "peak learning rate", "positive_float", group="optimisation")
    optimizer: str = opt("adamw", "adamw, or sgd (momentum 0.9, Nesterov)", choices=("adamw", "sgd"),
                         group="optimisation")
    schedule: str = opt("cosine", "learning-rate schedule after the linear warm-up",
                        choices=("onecycle", "cosine", "constant"), group="optimisation")
    warmup: float = opt(0.05, "fraction of all steps spent warming up", "fraction", group="optimisation")
    weight_decay: float = opt(0.05, "decoupled (adamw) or L2 (sgd) weight decay; not on biases and norms",
                              "nonneg_float", group="optimisation")
    grad_clip: float | None = opt(1.0, "clip the global gradient norm to this value", "positive_float",
                                  optional=True, group="optimisation")
    hflip: str = opt("auto", "random left-right flips; auto: only for mirror-symmetric datasets (fashion-mnist)",
                     choices=("off", "on", "auto"), group="optimisation")
    # reproducibility and hardware
    seed: int = opt(0, "seeds weights, order, flips and masks", "seed")
    deterministic: bool = opt(False, "force deterministic kernels (GPU)", "bool")
    device: str = opt("auto", "where to train: auto picks cuda, then mps, then cpu",
                      choices=("auto", "cpu", "cuda", "mps"))
    threads: int | None = opt(None, "CPU threads (default: one per core; more than the cores is capped)",
                              "positive_int", optional=True)
    eval_batch_size: int = opt(1000, "images per validation batch", "positive_int")
    run_dir: str | None = opt(None, "the run folder (default: runs/<time>-<dataset>-<method>-vit)", optional=True)


# Defaults that give a good result with no flags at all, per model (docs/experiments.md: how they were chosen).
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
    # flips, not shifts: a 7x7 patch grid maps onto itself under a mirror, so the patches stay aligned, while
    # a shift misaligns them. Batch 256 gives more images/s than 128 (fewer, larger matmuls for the same per-step
    # overhead), so 18 epochs fit 5 CPU-minutes on 2 cores.
    "vit": dict(epochs=18, batch_size=256, lr=1.5e-3, optimizer="adamw", weight_decay=0.05, label_smoothing=0.1,
                schedule="cosine", warmup=0.1, grad_clip=1.0, hflip="auto"),
}

# 1,437 digits make 6 steps an epoch at batch 256: too few to learn from. More, smaller steps.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(epochs=15, batch_size=64),
}

# Named recipes. A recipe belongs to its model (its learning rate and optimizer were tuned for it):
# combining one with another --model is refused. Explicit flags override any of its values.
RECIPES: dict[str, dict[str, Any]] = {
    # precision auto: bf16 autocast where the CPU or GPU computes it natively (AMX, AVX512_BF16, CUDA 8.0+), fp32
    # elsewhere. On a 2-core Xeon with AMX it trained 1.4x faster at +0.17 points over seeds 0-2; the numbers
    # then depend on the hardware: --precision fp32 gives the bit-reproducible run (docs/experiments.md).
    # pool_first: BatchNorm and ReLU after the max-pools, on a quarter of the values: 20-28% less time a step and
    # no less accuracy on validation over seeds 0-2; a last stage of 32 rather than 64 channels: 19-20% less again,
    # 0.3 points of validation accuracy, still above the classic example (docs/experiments.md, 2026-12-06).
    "fast": dict(
        doc="the quickest route to about 91.2% on Fashion-MNIST (the classic example's 3-epoch mark)",
        model="cnn", model_kwargs=dict(widths=[16, 32, 32], stem_stride=2, hidden=512, pool_first=True),
        epochs=3, batch_size=256, lr=0.2, optimizer="sgd", schedule="onecycle", warmup=0.25, weight_decay=5e-4,
        label_smoothing=0.1, augment="none", precision="auto",
    ),
    # A narrower network for more epochs beat wider or deeper ones at the same budget, and averaging over
    # 1-pixel shifts at the end adds accuracy for a model trained with shifts (docs/experiments.md). pool_first
    # and bf16 (where the CPU has AMX) make an epoch about 2.3x shorter here, so the budget holds 50 epochs, not
    # 30; Muon's orthogonalized steps on the hidden convs added 0.2 points of validation accuracy at 15 epochs,
    # seeds 0-2 (docs/experiments.md, 2026-12-06).
    "best": dict(
        doc="the highest accuracy we found within 10 CPU-minutes (2 cores)",
        model="cnn", model_kwargs=dict(widths=[24, 48, 96], stem_stride=2, hidden=512, pool_first=True),
        epochs=50, batch_size=256, lr=0.1, optimizer="muon", muon_lr=0.2, schedule="onecycle", warmup=0.2,
        weight_decay=5e-4, label_smoothing=0.1, augment="shift", hflip="auto", tta_shifts="on", precision="auto",
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
        if explicit.get("model", recipe["model"]) != recipe["model"]:
            raise UserError(f"--recipe {recipe_name} is a recipe for --model {recipe['model']} (its optimizer and "
                            f"learning rate were tuned for it); drop --recipe to train {explicit['model']} with its "
                            f"own defaults")
    model = explicit.get("model", recipe.get("model", TrainConfig.model))
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
