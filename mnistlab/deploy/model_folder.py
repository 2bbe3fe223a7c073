"""A run's model as a folder in Hugging Face's conventions: weights, config, model card, a picture.

    mnistlab export runs/RUN --format hf -o digits-cnn      writes digits-cnn/:
        model.safetensors   the model's state_dict, nothing else (no optimizer, no pickle)
        config.json         architecture and its arguments, classes, mean and std, the preprocessing
                            convention, the calibration, the mnistlab version (`mnistlab_format`)
        README.md           the model card: YAML front matter as the Hub reads it, then measured results
        samples.png         test images with the model's answers (only when the dataset is on this machine)

read_model_folder(DIR) rebuilds the model from config.json by its registry name and loads the weights
strictly: every tensor must be there, of the right shape, and nothing else. safetensors checks only a
file's layout, so the header also records a sha256 of the tensor data (checkpoint.payload_sha256):
flipped bytes inside a tensor are refused instead of loading as silently wrong weights.
Nothing is ever downloaded: the samples come from the dataset only if it is already on this machine.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mnistlab.errors import UserError

WEIGHTS, CONFIG, CARD, SAMPLES = "model.safetensors", "config.json", "README.md", "samples.png"
FORMAT = 1  # config.json's "mnistlab_format"; read_model_folder refuses any other
IMG_SIZE = 28
# Hub ids of the datasets the Hub hosts under a known name (the card's `datasets`); others keep their own name
HUB_DATASETS = {"mnist": "ylecun/mnist", "fashion-mnist": "zalando-datasets/fashion_mnist"}
# The reject threshold's measurement, as docs/deploy.md reports it (bench/predict_robustness.py, seeds 0-2;
# tests/test_model_folder.py checks these lines are still there): what fraction of pictures it accepts.
THRESHOLD_MEASUREMENT = {
    "digits": "a digits cnn accepted 87% of its own test digits drawn as 280x280 pictures, 13% of "
              "Fashion-MNIST pictures and 7% of scribbles",
    "fashion-mnist": "a Fashion-MNIST cnn (`--recipe fast`) accepted 90% of its own test pictures, 33% of "
                     "digits and 41% of scribbles",
}
# Everything of the checkpoint's metadata that config.json does not carry under its own names, except what
# only resuming needs (the optimizer, the epoch's running sums) and the checkpoint file's own bookkeeping.
RUN_KEYS = ("config", "step", "total_steps", "best_val_accuracy", "train_seconds", "hflip_tta", "shift_tta",
            "engine")


def _ink_description(convention: str) -> str:
    """deploy/preprocess.py's recipe for a convention, in words."""
    return {
        "mnist": "the ink's bounding box scaled to 20 px on its longer side, centred by its centre of mass in 28x28",
        "digits": "the whole picture's ink box upsampled into a 20x20 box at the centre of 28x28",
        "fashion": "the item trimmed to its edges, its longer side resized to 28 px, centred",
    }[convention]


def folder_config(meta: dict[str, Any], calibration: dict[str, Any] | None, calibration_note: str = "") -> dict:
    """config.json's contents for a run's checkpoint metadata and its calibration (None: there is none)."""
    from mnistlab import __version__
    from mnistlab.deploy.preprocess import convention_for

    dataset = meta["config"].get("dataset") or "custom"
    convention = convention_for(dataset)
    classes = [str(c) for c in meta["classes"]]
    return {
        "library_name": "mnistlab",
        "mnistlab_format": FORMAT,
        "mnistlab_version": __version__,
        "architecture": meta["model"],  # a name in mnistlab.models.list_models()
        "model_args": meta["model_kwargs"],
        "in_chans": meta["in_chans"],
        "num_classes": meta["num_classes"],
        "classes": classes,
        "id2label": {str(i): c for i, c in enumerate(classes)},  # the transformers spelling of the same list
        "label2id": {c: i for i, c in enumerate(classes)},
        "dataset": dataset,
        "mean": float(meta["mean"]),
        "std": float(meta["std"]),
        "preprocessing": {
            "convention": convention,  # mnistlab.deploy.preprocess.to_model_input(ink, convention)
            "input_size": [IMG_SIZE, IMG_SIZE],
            "ink": "light on black (a picture of dark ink on light paper is negated first)",
            "layout": convention + ": " + _ink_description(convention),
            "input": f"N,{meta['in_chans']},{IMG_SIZE},{IMG_SIZE} float32, (pixel/255 - mean)/std",
        },
        "calibration": None if calibration is None else {
            "temperature": calibration["temperature"],  # probabilities: softmax(logits / temperature)
            "threshold": calibration["threshold"],  # null: none; a top probability below it is "unsure"
            **{k: v for k, v in calibration.items() if k not in ("temperature", "threshold")},
        },
        "calibration_note": calibration_note,
        "run": {k: meta[k] for k in RUN_KEYS if k in meta},
    }


def write_weights(path: Path, model: torch.nn.Module) -> None:
    """model.safetensors: the state_dict as plain tensors, with the sha256 of their bytes in the header."""
    from safetensors.torch import save as st_save

    from mnistlab.checkpoint import payload_sha256
    from mnistlab.files import atomic_write_bytes

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": "pt", "mnistlab_payload_sha256": payload_sha256(tensors)}  # "pt": what the Hub expects
    atomic_write_bytes(path, st_save(tensors, metadata=header))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    from mnistlab.checkpoint import payload_sha256

    if not path.is_file():
        raise UserError(f"{path.parent}: no {WEIGHTS} beside its {CONFIG} (copy the whole folder)")
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        recorded = header.get("__metadata__", {}).get("mnistlab_payload_sha256")
    except (SafetensorError, ValueError, OSError, AttributeError, TypeError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None
    if recorded != payload_sha256(tensors):
        raise UserError(f"{path}: the tensor data does not match the checksum recorded when it was exported "
                        "(the file is damaged); export the run again")
    return tensors


def _read_config(folder: Path) -> dict[str, Any]:
    from mnistlab.checkpoint import CHECKPOINT

    path = folder / CONFIG
    if (folder / CHECKPOINT).is_file():  # a run folder has a config.json too, of another kind
        raise UserError(f"{folder}: a training run, not a model folder; `mnistlab.load` reads it, and "
                        f"`mnistlab export {folder} --format hf` makes a model folder of it")
    if not path.is_file():
        raise UserError(f"{folder}: not an mnistlab model folder, no {CONFIG} "
                        f"(`mnistlab export RUN_DIR --format hf -o {folder}` writes one)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(config, dict) or config.get("library_name") != "mnistlab":
        raise UserError(f"{path}: not an mnistlab model's config (no \"library_name\": \"mnistlab\")")
    if config.get("mnistlab_format") != FORMAT:
        raise UserError(f"{path}: mnistlab_format {config.get('mnistlab_format')!r}, this mnistlab reads "
                        f"format {FORMAT}; export the run again with this version")
    needed = ("architecture", "model_args", "in_chans", "num_classes", "classes", "mean", "std", "run")
    missing = [k for k in needed if k not in config]
    if missing:
        raise UserError(f"{path}: lacks {', '.join(missing)}")
    mean, std = config["mean"], config["std"]
    if not (isinstance(mean, (int, float)) and isinstance(std, (int, float)) and math.isfinite(mean)
            and math.isfinite(std) and std > 0):
        raise UserError(f"{path}: mean {mean!r} and std {std!r} must be finite numbers, std > 0")
    if not (isinstance(config["classes"], list) and len(config["classes"]) == config["num_classes"]):
        raise UserError(f"{path}: {len(config['classes'])} classes listed for num_classes {config['num_classes']}")
    if not isinstance(config["model_args"], dict) or not isinstance(config["run"], dict):
        raise UserError(f"{path}: model_args and run must be JSON objects")
    return config


def read_model_folder(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of an exported folder (eval mode, CPU) and its metadata, keyed as a run's checkpoint's
    (model, model_kwargs, in_chans, num_classes, classes, mean, std, config, step, ...) plus `calibration`
    (calibration.json's contents, or None). Reads only; any fault is one UserError."""
    from mnistlab.models import create_model

    folder = Path(path)
    if not folder.exists():
        raise UserError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (an exported model is a folder with {CONFIG} and {WEIGHTS})")
    config = _read_config(folder)
    tensors = _read_weights(folder / WEIGHTS)
    name = config["architecture"]
    try:
        model = create_model(name, in_chans=config["in_chans"], num_classes=config["num_classes"],
                             **config["model_args"])
    except UserError as e:  # an unknown name or option: the registry's own line, anchored to the file
        raise UserError(f"{folder / CONFIG}: {e}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{folder / CONFIG}: cannot build model {name!r} from its arguments ({e})") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise UserError(f"{folder / WEIGHTS}: its tensors do not fit the {name} that {CONFIG} describes "
                        f"({detail[:300]})") from None
    # channels-last, as load_run_checkpoint returns a run's model: the same kernels, so the same logits bit for bit
    model = model.to(memory_format=torch.channels_last).eval()
    meta = dict(config["run"])
    meta.setdefault("config", {})
    meta.update(model=name, model_kwargs=config["model_args"], in_chans=config["in_chans"],
                num_classes=config["num_classes"], classes=list(config["classes"]), mean=float(config["mean"]),
                std=float(config["std"]), calibration=config.get("calibration"))
    return model, meta


def _train_command(config: dict[str, Any]) -> str:
    """An equivalent `mnistlab train` command: the flags whose values differ from what the defaults would give
    (the machine's own: the folders, threads and device, left out)."""
    from dataclasses import fields

    from mnistlab.config import TrainConfig, resolve_config

    named = {k: config.get(k) for k in ("dataset", "model", "recipe") if config.get(k) is not None}
    try:
        defaults = vars(resolve_config(dict(named)))
    except UserError:
        defaults = {}
    words = ["mnistlab", "train", *(f"--{k} {v}" for k, v in named.items())]
    machine_only = ("run_dir", "threads", "device", "data_dir", "offline", "eval_batch_size")
    for f in fields(TrainConfig):
        key, value = f.name, config.get(f.name)
        if (not f.metadata["flag"] or key in named or key in machine_only or key not in config
                or defaults.get(key, object()) == value or value is None or value is False):
            continue
        flag = "--" + key.replace("_", "-")
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        words.append(flag if value is True else f"{flag} {text}")
    for key, value in config.get("model_kwargs", {}).items():
        if defaults.get("model_kwargs", {}).get(key, object()) != value:
            words.append(f"--model-arg {key}={json.dumps(value, separators=(',', ':'))}")
    return " ".join(words)


def _side_file(read: Any) -> dict[str, Any]:
    """A run's results.json or env.json (RunRecord.results, .env); {} when absent or damaged (the card says so)."""
    try:
        return read()
    except UserError:
        return {}


def draw_samples(path: Path, model: torch.nn.Module, meta: dict[str, Any], temperature: float,
                 threshold: float | None) -> str:
    """samples.png: 24 test images with the model's answers ("?": unsure, below the threshold); "" when
    written, else the one-line reason."""
    from mnistlab.calibration import model_logits
    from mnistlab.data.dataset import load_dataset

    cfg = meta["config"]
    try:  # offline: an export never downloads; a dataset that is not here means no picture
        ds = load_dataset(cfg.get("dataset"), data_dir=cfg.get("data_dir"), offline=True, val_size=cfg.get("val_size"))
    except (UserError, OSError) as e:
        return f"no {SAMPLES}: the run's test images are not on this machine ({str(e).splitlines()[0][:160]})"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(24, len(ds.test_images))
    images, labels = ds.test_images[:n], ds.test_labels[:n]
    probs = (model_logits(model, images, meta["mean"], meta["std"]) / temperature).softmax(1)
    p, pred = probs.max(1)
    classes = [str(c) for c in meta["classes"]]
    cols = 8
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(cols * 1.15, math.ceil(n / cols) * 1.6), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i].numpy(), cmap="gray", vmin=0, vmax=255)
        right = int(pred[i]) == int(labels[i])
        unsure = "?" if threshold is not None and p[i] < threshold else ""
        truth = "" if right else f"\n(is {classes[int(labels[i])][:12]})"
        text = f"{classes[int(pred[i])][:12]}{unsure} {p[i]:.0%}{truth}"
        ax.set_title(text, fontsize=7, color="black" if right else "red")
    unsure = "" if threshold is None else f"; ?: below the {threshold:.0%} threshold, answered unsure"
    fig.suptitle(f"the first {n} test images, probabilities as mnistlab predict gives them; red: wrong{unsure}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return ""


def render_card(config: dict[str, Any], results: dict[str, Any], env: dict[str, Any], samples_note: str,
                folder: str = ".") -> str:
    """README.md: the model card, YAML front matter first (license, library_name, tags, datasets, model-index)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    jinja = Environment(loader=PackageLoader("mnistlab.deploy", "templates"), undefined=StrictUndefined,
                        autoescape=False, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    jinja.filters["json"] = lambda v: json.dumps(v, ensure_ascii=False)  # JSON scalars are YAML scalars
    jinja.filters["pct"] = lambda v: f"{100 * v:.2f}%"
    dataset = config["dataset"]
    run_config = config["run"].get("config", {})
    accuracy = results.get("test_accuracy")
    return jinja.get_template("model_card.md.j2").render(
        c=config, dataset=dataset, hub_dataset=HUB_DATASETS.get(dataset, dataset),
        name=f"mnistlab-{dataset}-{config['architecture']}",
        accuracy=accuracy if isinstance(accuracy, (int, float)) else None, results=results,
        run_config=json.dumps(run_config, indent=2), command=_train_command(run_config),
        seed=run_config.get("seed"), commit=env.get("git_commit"), torch_version=env.get("torch"),
        measurement=THRESHOLD_MEASUREMENT.get(dataset), samples_note=samples_note, samples=SAMPLES,
        cal=config["calibration"], folder=folder)


def export_model_folder(run_dir: Path, out: Path | None = None) -> tuple[Path, str]:
    """Write RUN_DIR's model as a folder at `out` (default RUN_DIR/hf); (the folder, a note on the picture).

    Everything is written into a temporary folder beside `out` first, so a failure leaves `out` as it was."""
    from mnistlab.calibration import temperature_and_threshold
    from mnistlab.files import write_json
    from mnistlab.record import RunRecord

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "hf"
    record = RunRecord(run_dir)
    model, meta = record.load_model()
    if meta.get("engine") == "scratch" or meta["config"].get("engine") == "scratch":
        raise UserError(f"{run_dir}: a scratch-engine (numpy) run has no PyTorch module to export; "
                        "train it with the default engine to export it")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or has_folder_marker(out))):
        raise UserError(f"{out}: exists and is not an mnistlab model folder; choose another -o")
    model = model.to("cpu", torch.float32).eval()
    calibration, why_not = record.calibration(meta["step"])
    note = "" if calibration else f"{why_not}: probabilities are the plain softmax and nothing is called unsure"
    config = folder_config(meta, calibration, note)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_weights(staging / WEIGHTS, model)
        write_json(staging / CONFIG, config)
        samples_note = draw_samples(staging / SAMPLES, model, meta, *temperature_and_threshold(calibration))
        card = render_card(config, _side_file(record.results), _side_file(record.env), samples_note,
                           out.name)
        (staging / CARD).write_text(card)
        read_model_folder(staging)  # what was written loads: refuse to leave a folder that does not
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out, samples_note


def has_folder_marker(folder: Path) -> bool:
    """Whether folder/config.json carries this format's marker (a run's config.json has no library_name)."""
    try:
        return json.loads((folder / CONFIG).read_text()).get("library_name") == "mnistlab"
    except (OSError, ValueError, AttributeError):
        return False


def _replace(staging: Path, out: Path) -> None:
    """Put the finished folder at `out`, replacing a previous export there (or an empty folder)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    staging.chmod(0o755)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
