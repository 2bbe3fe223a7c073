"""The `mnistlab` command: parses arguments, calls the library, prints. Nothing else lives here.

    mnistlab train                          the default CNN on MNIST (downloads it once)
    mnistlab train --dataset digits         offline, in seconds
    mnistlab train --recipe fast --dataset fashion-mnist
    mnistlab train --resume runs/RUN        continue a stopped run exactly
    mnistlab pretrain --dataset fashion-mnist          masked patch modelling, no labels (MAE)
    mnistlab train --model vit --init runs/PRE --labels-per-class 100   fine-tune it on 1,000 labels
    mnistlab eval runs/RUN                  accuracy, per-class accuracy, confusion matrix
    mnistlab report runs/RUN                one HTML page of what the run learned
    mnistlab compare --models cnn vit --seeds 0 1 2    train a grid, then a leaderboard
    mnistlab compare runs/*                 a leaderboard of finished runs
    mnistlab models                         the zoo: parameters, MFLOPs, description
    mnistlab data list                      where each dataset is (or "not present")
    mnistlab data fetch fashion-mnist       download and verify into ~/.cache/mnistlab
    mnistlab data verify mnist              hash and header of every file (exit 0 or 2)
    mnistlab data show digits -o grid.png   a labelled grid of samples
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mnistlab.errors import UserError


def _add_data_source_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--data-dir", metavar="DIR", help="a folder holding the four standard IDX files "
                   "(gzipped or not); searched before everything else")
    p.add_argument("--offline", action="store_true", help="never download; fail with the offline "
                   "choices when the dataset is not on disk")


def cmd_data_list(args: argparse.Namespace) -> int:
    from mnistlab.data.registry import DATASETS
    from mnistlab.data.resolve import find_present

    rows = [("name", "size", "where", "source")]
    for spec in DATASETS.values():
        if spec.is_idx:
            present = find_present(spec)
            where = f"{present[1]} ({present[0]})" if present else "not present"
            size = f"{spec.download_bytes / 1e6:.1f} MB"
        else:
            where, size = "bundled with scikit-learn", "1,797 images"
        rows.append((spec.name, size, where, spec.source))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
    print("\nSearch order: --data-dir, $MNISTLAB_DATA/<name>, ~/.cache/mnistlab/<name>, "
          "/usr/share/datasets/<name>, then a download (unless --offline).")
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from mnistlab.data.registry import get_spec
    from mnistlab.data.resolve import locate

    spec = get_spec(args.name)
    if not spec.is_idx:
        print(f"{spec.name}: bundled with scikit-learn; nothing to download")
        return 0
    label, folder = locate(spec, offline=args.offline)
    print(f"{spec.name}: {folder} ({label}, verified)")
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mnistlab.data.registry import get_spec
    from mnistlab.data.resolve import find_present, verify_folder

    spec = get_spec(args.name)
    if not spec.is_idx and args.data_dir is None:
        from mnistlab.data.dataset import load_dataset

        ds = load_dataset(spec.name)
        n_train, n_test = len(ds.train_labels) + len(ds.val_labels), len(ds.test_labels)
        ok = (n_train, n_test) == (spec.train_count, spec.test_count)
        print(f"{spec.name}: {n_train} train + {n_test} test images: {'OK' if ok else 'UNEXPECTED'}")
        return 0 if ok else 2
    if args.data_dir is not None:
        folder = Path(args.data_dir).expanduser()
        if not folder.is_dir():
            raise UserError(f"--data-dir {folder}: no such folder")
    else:
        present = find_present(spec)
        if present is None:
            raise UserError(f"{spec.name}: not present on this machine; `mnistlab data fetch "
                            f"{spec.name}` downloads it, `mnistlab data list` shows where we look")
        folder = present[1]
    checks = verify_folder(folder, spec if spec.is_idx else None)
    print(f"{spec.name}: {folder}")
    for c in checks:
        print(f"  {'OK  ' if c.ok else 'FAIL'} {c.path.name}: {c.detail}")
    failed = sum(not c.ok for c in checks)
    print(f"{len(checks) - failed} of {len(checks)} files verified")
    return 0 if failed == 0 else 2


def cmd_data_show(args: argparse.Namespace) -> int:
    from mnistlab.data.dataset import load_dataset
    from mnistlab.plots import sample_grid

    if args.name is None and args.data_dir is None:
        raise UserError("data show: name a dataset (see `mnistlab data list`) or give --data-dir")
    ds = load_dataset(args.name, data_dir=args.data_dir, offline=args.offline)
    images, labels = ds.split(args.split)
    out = sample_grid(images.numpy(), labels.numpy(), ds.classes, args.output,
                      title=f"{ds.name} ({args.split}, {len(labels):,} images)",
                      per_class=args.per_class, seed=args.seed)
    print(ds.summary())
    print(f"wrote {out}")
    return 0


def _model_arg(text: str) -> tuple[str, object]:
    import json

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare word such as relu
    return key.replace("-", "_"), value


def _arg_type(kind: str):
    """An argparse type for a config field kind (config.KINDS): parse the text, then the same check."""
    from mnistlab.config import KINDS

    check, accepts = KINDS[kind]

    def parse(text: str):
        try:
            if kind == "steps":
                value = sorted({int(s) for s in text.split(",") if s.strip()})
            elif kind in ("positive_int", "seed"):
                value = int(text)
            else:
                value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {accepts}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {accepts}, got {text!r}")
        return value

    parse.__name__ = kind  # argparse names the type in its own messages
    return parse


def _add_config_flags(p: argparse.ArgumentParser, config_cls: type) -> dict[str, argparse._ArgumentGroup]:
    """One flag per field of a config dataclass (config.py declares each once, with its help and kind);
    returns the argument groups, by name, for the flags a command adds by hand."""
    from dataclasses import fields

    from mnistlab.config import RECIPES

    groups = {name: p.add_argument_group(name) for name in ("data", "model", "optimisation", "run")}
    for f in fields(config_cls):
        m = f.metadata
        if not m["flag"]:
            continue
        flag, kw = "--" + f.name.replace("_", "-"), dict(help=m["help"], default=None)
        if m["kind"] == "bool":
            kw["action"] = "store_true"
        elif f.name == "recipe":
            kw["choices"] = sorted(RECIPES)
        elif m["choices"]:
            kw["choices"] = m["choices"]
        elif m["kind"] != "str":
            kw["type"] = _arg_type(m["kind"])
        if f.name in ("data_dir", "run_dir", "init"):
            kw["metavar"] = "DIR"
        groups[m["group"]].add_argument(flag, **kw)
    return groups


def _add_train_parser(sub) -> None:
    """`mnistlab train`: one flag per TrainConfig field, declared once in config.py."""
    from mnistlab.config import RECIPES, TrainConfig

    p = sub.add_parser(
        "train", help="train a model; writes a run folder",
        description="Train a model. Precedence: defaults < the model's defaults < the dataset's < --recipe < "
                    "explicit flags. Recipes (each belongs to its model): "
                    + "; ".join(f"{k} ({v['model']}): {v['doc']}" for k, v in RECIPES.items()) + ".",
    )
    groups = _add_config_flags(p, TrainConfig)
    g = groups["model"]
    g.add_argument("--seq", choices=("rows", "pixels", "permuted"),
                   help="rnn/gru/lstm: read 28 rows, 784 pixels, or 784 pixels in a seeded fixed order")
    g.add_argument("--model-arg", action="append", type=_model_arg, metavar="KEY=VALUE",
                   help="a model option, repeatable: --model-arg widths=[16,32,64] --model-arg activation=gelu")
    groups["run"].add_argument("--resume", metavar="RUN_DIR",
                               help="continue the run in RUN_DIR from its last checkpoint, with the configuration "
                                    "the checkpoint records (only --device and --threads may be given)")
    p.set_defaults(func=cmd_train)


def _add_pretrain_parser(sub) -> None:
    """`mnistlab pretrain`: one flag per PretrainConfig field, declared once in config.py."""
    from mnistlab.config import PretrainConfig

    p = sub.add_parser(
        "pretrain", help="pre-train a ViT encoder without labels (masked patch modelling); writes a run folder",
        description="Masked patch modelling (MAE or SimMIM) on the training split's images, without their labels "
                    "and never the test split; validation images only for the reconstruction loss curve. Writes a "
                    "run folder like train's, with a reconstruction figure per epoch. Fine-tune the encoder with "
                    "`mnistlab train --model vit --init RUN_DIR`.")
    groups = _add_config_flags(p, PretrainConfig)
    groups["model"].add_argument("--model-arg", action="append", type=_model_arg, metavar="KEY=VALUE",
                                 help="an encoder option, repeatable: --model-arg patch=4 --model-arg dim=96 "
                                      "(`mnistlab train --init` needs the same ones)")
    groups["run"].add_argument("--resume", metavar="RUN_DIR",
                               help="continue the pre-training in RUN_DIR from its last checkpoint, with the "
                                    "configuration the checkpoint records (only --device and --threads may be given)")
    p.set_defaults(func=cmd_pretrain)


def _refuse_flags_with_resume(explicit: dict, others: dict) -> None:
    """--resume takes only --device and --threads: name every other flag given (config fields and `others`,
    the flags that are not fields, such as --model-arg and --seq), as typed."""
    given = [k for k, v in {**explicit, **others}.items() if v is not None and k not in ("device", "threads")]
    if given:
        raise UserError(f"--resume continues with the run's saved config; drop "
                        f"{', '.join('--' + k.replace('_', '-') for k in given)}")


def _under_torchrun() -> bool:
    """Started by torchrun with more than one process (only `train`'s torch engine runs distributed)."""
    return os.environ.get("WORLD_SIZE", "1") not in ("", "1")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from dataclasses import fields

    if _under_torchrun():
        raise UserError("pretrain runs in one process; run it without torchrun (`mnistlab train` runs distributed)")

    from mnistlab.config import PretrainConfig

    explicit = {f.name: getattr(args, f.name, None) for f in fields(PretrainConfig) if f.metadata["flag"]}
    model_kwargs = dict(args.model_arg or [])
    if args.resume:
        _refuse_flags_with_resume(explicit, dict(model_arg=args.model_arg))
        cfg = PretrainConfig(run_dir=args.resume, threads=args.threads)
        cfg.device = args.device  # None: as the run was trained
    else:
        cfg = PretrainConfig.from_dict(dict({k: v for k, v in explicit.items() if v is not None},
                                            model_kwargs=model_kwargs), source="pretrain flags")
        from mnistlab.models import create_model
        from mnistlab.models.mae import create_masked_model

        # a bad --model-arg or decoder shape fails here, before any data is loaded
        create_masked_model(cfg.method, create_model(cfg.model, **cfg.model_kwargs), decoder_dim=cfg.decoder_dim,
                            decoder_depth=cfg.decoder_depth, decoder_heads=cfg.decoder_heads)
    from mnistlab.pretrain import pretrain

    pretrain(cfg, resume=bool(args.resume))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    start_training(args)
    return 0


def start_training(args: argparse.Namespace, progress: bool | None = None) -> str:
    """`mnistlab train`'s work, shared with `mnistlab.train(**flags)`: resolve and check the flags (a bad one fails
    before any data is loaded), train, and return the run folder. progress: tqdm bars (None: when stderr is a
    terminal)."""
    from dataclasses import fields

    from mnistlab.config import TrainConfig, resolve_config

    explicit = {f.name: getattr(args, f.name, None) for f in fields(TrainConfig) if f.metadata["flag"]}
    model_kwargs = dict(args.model_arg or [])
    if args.seq is not None:
        model_kwargs["seq"] = args.seq
    if args.resume:
        _refuse_flags_with_resume(explicit, dict(model_arg=args.model_arg, seq=args.seq))
        cfg = TrainConfig(run_dir=args.resume, threads=args.threads)
        cfg.device = args.device  # None: as the run was trained (train() takes the rest from the checkpoint)
    else:
        explicit["model_kwargs"] = model_kwargs
        if args.data_dir is not None and args.dataset is None:
            explicit["dataset"] = None  # with --data-dir, the folder's files say what it holds
        cfg = resolve_config(explicit)
        if args.data_dir is not None and args.dataset is None:
            cfg.dataset = None
        if cfg.engine == "scratch":
            from mnistlab.scratch import train as scratch_train

            if _under_torchrun():
                raise UserError("--engine scratch trains in one process; run it without torchrun")

            scratch_train.train(cfg, progress=progress)
            return cfg.run_dir
        from mnistlab.models import create_model, model_entry

        model_entry(cfg.model)  # an unknown name fails here, before any data is loaded
        if "seq" in cfg.model_kwargs and cfg.model not in ("rnn", "gru", "lstm"):
            raise UserError(f"--seq applies to rnn, gru and lstm, not {cfg.model}")
        create_model(cfg.model, **cfg.model_kwargs)  # and so does a bad --model-arg
    from mnistlab.training import train

    train(cfg, resume=bool(args.resume), progress=progress)
    return cfg.run_dir


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from mnistlab.config import TrainConfig
    from mnistlab.data.dataset import load_dataset
    from mnistlab.evaluate import (
        EvalResult,
        describe_views,
        eval_json,
        evaluate,
        per_class_accuracy,
        tta_views,
        untrained_views_warning,
    )
    from mnistlab.record import RunRecord
    from mnistlab.run import note

    run_dir = Path(args.run_dir)
    model, meta = RunRecord(run_dir).load_model()  # the checkpoint holds all it needs; config.json is not read
    cfg = TrainConfig.from_dict(meta["config"], source=f"{run_dir}: the checkpoint's config")
    ds = load_dataset(cfg.dataset, data_dir=args.data_dir or cfg.data_dir, offline=args.offline or cfg.offline,
                      val_size=cfg.val_size)
    images, labels = ds.split(args.split)
    if meta.get("engine") == "scratch":
        from mnistlab.scratch import train as scratch_train

        if args.tta == "on" or args.tta_shifts == "on":
            raise UserError("--tta, --tta-shifts: the scratch engine evaluates plain images only")
        loss, accuracy, preds = scratch_train.evaluate(model, images.numpy(), labels.numpy(), meta["mean"],
                                                       meta["std"])
        result = EvalResult(loss, accuracy, torch.from_numpy(preds), labels)
        tta = shifts = False
    else:
        tta = meta.get("hflip_tta", False) if args.tta == "auto" else args.tta == "on"
        shifts = meta.get("shift_tta", False) if args.tta_shifts == "auto" else args.tta_shifts == "on"
        result = evaluate(model, images, labels, meta["mean"], meta["std"], hflip_tta=tta, shift_tta=shifts)
    trained_flips = cfg.hflip == "on" or (cfg.hflip == "auto" and ds.mirror_symmetric)  # as training.py resolves it
    warning = untrained_views_warning(tta, shifts, trained_flips, cfg.augment in ("shift", "affine"))
    if warning:
        note(warning)
    cm = result.confusion(len(ds.classes))
    per_class = per_class_accuracy(cm)
    engine = meta.get("engine", "torch")
    if args.json:
        print(eval_json(dict(run_dir=str(run_dir), split=args.split, dataset=ds.name, model=meta["model"],
                             engine=engine, step=meta["step"], tta=describe_views(tta, shifts),
                             views=tta_views(tta, shifts),
                             warnings=[warning] if warning else [], accuracy=result.accuracy, loss=result.loss,
                             per_class_accuracy=dict(zip(ds.classes, per_class.tolist(), strict=True)),
                             confusion=cm.tolist())))
        return 0
    label = " (scratch engine)" if engine == "scratch" else ""
    print(f"{run_dir}: {meta['model']}{label} on {ds.name} {args.split} ({len(labels):,} images), step {meta['step']}")
    print(f"accuracy {result.accuracy:.2%}   loss {result.loss:.4f}   ({describe_views(tta, shifts)})\n")
    name_w = max(len(c) for c in ds.classes)
    print(f"{'class':<{name_w + 4}}  accuracy")
    for i, (c, a) in enumerate(zip(ds.classes, per_class.tolist(), strict=True)):
        print(f"{i:>2}  {c:<{name_w}}  {a:8.2%}")
    k = len(ds.classes)
    print("\nconfusion matrix (rows: true class, columns: predicted)")
    print("    " + "".join(f"{j:>6}" for j in range(k)))
    for i in range(k):
        print(f"{i:>3} " + "".join(f"{int(v):>6}" for v in cm[i].tolist()))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from mnistlab.models import create_model, list_models, model_entry
    from mnistlab.models.flops import count_params, forward_flops

    rows = [("name", "params", "MFLOPs", "description")]
    for name in list_models():
        model = create_model(name)
        rows.append((name, f"{count_params(model):,}", f"{forward_flops(model) / 1e6:.2f}",
                     model_entry(name).description))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")
    print("\nMFLOPs: forward pass, one 28x28 image, default options (a multiply-add counts as 2).")
    return 0


def cmd_plot_grad_flow(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mnistlab import gradflow, plots
    from mnistlab.record import RunRecord

    run_dir = Path(args.run_dir)
    records = gradflow.read(run_dir)
    if not records:
        raise UserError(f"{run_dir}: grad_flow.jsonl is empty (did the run reach a recorded step?)")
    try:
        cfg = RunRecord(run_dir).config()
    except UserError:
        cfg = {}  # the title only: a missing or damaged config.json does not stop the plot
    seq = cfg.get("model_kwargs", {}).get("seq", "rows" if cfg.get("model") in ("rnn", "gru", "lstm") else "")
    title = f"{cfg.get('model', '?')} {('--seq ' + seq) if seq else ''} on {cfg.get('dataset', '?')}"
    out = plots.grad_flow(records, args.output, title=title)
    last = records[-1].get("time_grad_norm")
    if last:
        ratio = last[0] / last[-1]
        text = f"{ratio:.3e}" if ratio > 0 else "exactly 0 (the gradient died out before the first step)"
        print(f"step {records[-1]['step']}: ||dL/dh_1|| / ||dL/dh_T|| = {text} over {len(last)} time steps")
    print(f"wrote {out}")
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from mnistlab.labs import LABS, load_lab

    if args.topic is None:
        width = max(len(t) for t in LABS)
        print("labs (mnistlab lab TOPIC [-o FIG.png]):")
        for topic in LABS:
            print(f"  {topic:<{width}}  {load_lab(topic).TITLE}")
        return 0
    lab = load_lab(args.topic)
    out = Path(args.output) if args.output else Path(f"lab_{args.topic.replace('-', '_')}.png")
    print(f"lab {args.topic}: {lab.TITLE}", flush=True)
    t0 = time.perf_counter()
    checks = lab.run(out)
    for check in checks:
        print(check.line())
    failed = sum(not c.passed for c in checks)
    print(f"{len(checks) - failed}/{len(checks)} checks passed in {time.perf_counter() - t0:.1f}s; figure: {out}")
    if hasattr(lab, "sound_folder"):  # a lab with sounds (cocktail-party) writes WAV files beside the figure
        print(f"sounds: {lab.sound_folder(out)}/ (16-bit WAV files to listen to)")
    return 1 if failed else 0


def _add_eval_parser(sub) -> None:
    from mnistlab.config import TrainConfig

    tta_help = {f: TrainConfig.__dataclass_fields__[f].metadata["help"] for f in ("tta", "tta_shifts")}
    p = sub.add_parser("eval", help="evaluate a run folder: accuracy, per-class accuracy, confusion",
                       description="Rebuild the model from RUN_DIR's checkpoint alone and evaluate it.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `mnistlab train`")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which split (default: test)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    # the same values as in train; here auto means: as the run was trained
    p.add_argument("--tta", choices=("off", "on", "auto"), default="auto",
                   help=tta_help["tta"].split(";")[0] + "; auto (default): as in training")
    p.add_argument("--tta-shifts", choices=("off", "on", "auto"), default="auto",
                   help=tta_help["tta_shifts"].split(";")[0] + "; auto (default): as in training")
    _add_data_source_flags(p)
    p.set_defaults(func=cmd_eval)


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from mnistlab.deploy.predict import Predictor

    # a run folder, or an exported model folder; --runtime and --precision choose what computes the logits
    predictor = Predictor.open(args.run_dir, runtime=args.runtime, precision=args.precision,
                               force_bf16=args.force_bf16)
    results, errors = predictor.predict_files(args.images, top_k=args.top)
    for r in results:
        if args.json:
            print(json.dumps(r.to_dict(), allow_nan=False))
        elif r.status == "blank":
            print(f"{r.path}: blank (nothing drawn)")
        else:
            others = ", ".join(f"{t['label']} {t['probability']:.1%}" for t in r.top[1:])
            verdict = "" if r.status == "ok" else f"  (unsure: below the {predictor.threshold:.1%} threshold)"
            print(f"{r.path}: {r.label} {r.probability:.1%}{verdict}" + (f"; then {others}" if others else ""))
    for line in errors:
        print(f"mnistlab: error: {line}", file=sys.stderr)
    return 2 if errors else 0


def _add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="predict the class of your own pictures with a trained run",
                       description="Predict PNG, JPEG or BMP pictures (any size; dark on light or light on dark; "
                                   "ink in the alpha channel of a transparent canvas) with RUN_DIR's model. Each "
                                   "picture is made into the 28x28 image the dataset's own recipe would give; "
                                   "probabilities are temperature-calibrated on the validation split when training "
                                   "ends (calibration.json; no data is loaded here), and a picture scoring below "
                                   "the threshold that accepts 95% of correctly classified validation images is "
                                   "answered 'unsure'. Exit 2 if a file could not be read (the others are still "
                                   "answered).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `mnistlab train`, or a model folder "
                   "written by `mnistlab export --format hf`")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="picture files")
    p.add_argument("--json", action="store_true", help="one JSON object per picture")
    p.add_argument("--top", type=_arg_type("positive_int"), default=3, help="how many classes to list (default: 3)")
    _add_runtime_flags(p)
    p.set_defaults(func=cmd_predict)


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """--runtime, --precision and --force-bf16: what computes the logits (mnistlab/deploy/runtime.py's RUNTIMES and
    PRECISIONS, spelled out here so that building the parser imports no torch)."""
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default=None,
                   help="what computes the logits: torch (default for fp32 and bf16) or onnxruntime (default for "
                        "int8; reads the files `mnistlab export` writes into the run folder)")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                   help="fp32 (default); bf16 (PyTorch autocast, on CPUs that compute bf16 natively); int8 "
                        "(onnxruntime, after `mnistlab export RUN_DIR --quantize int8`). docs/deploy.md measures them")
    p.add_argument("--force-bf16", action="store_true", help="bf16 even on a CPU that only emulates it (slower)")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from mnistlab.calibration import CALIBRATION, describe
    from mnistlab.deploy.predict import calibrate_run

    cal = calibrate_run(args.run_dir, data_dir=args.data_dir, offline=args.offline)
    print(f"wrote {args.run_dir}/{CALIBRATION}: {describe(cal)}")
    return 0


def _add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="fit a run's calibration (for runs trained before training did it)",
                       description="Fit RUN_DIR's temperature and 'unsure' threshold on its validation split and "
                                   "write calibration.json, as training does when it ends; this loads the dataset. "
                                   "T stays 1 when too few validation images are misclassified to fit it, and "
                                   "there is no threshold when too few correct answers support one; "
                                   "calibration.json says which rule applied (mnistlab/calibration.py).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `mnistlab train`")
    _add_data_source_flags(p)
    p.set_defaults(func=cmd_calibrate)


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.quantize and args.format == "hf":
        raise UserError("--quantize int8 writes an ONNX file: drop --format hf (or --quantize)")
    if args.format == "hf":
        from mnistlab.deploy.model_folder import export_model_folder

        folder, samples_note = export_model_folder(Path(args.run_dir), Path(args.output) if args.output else None)
        if samples_note:
            print(samples_note)
        print(f"wrote {folder}/ (model.safetensors, config.json, README.md{'' if samples_note else ', samples.png'}); "
              f"upload it with: huggingface-cli upload USER/NAME {folder}")
        return 0
    if args.quantize == "int8":
        from mnistlab.deploy.quantize import MIN_AGREEMENT, quantize_run

        out, check = quantize_run(Path(args.run_dir), Path(args.output) if args.output else None,
                                  data_dir=args.data_dir, offline=args.offline)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, int8 weights and activations); its check on held-out "
              f"training images: the same class as fp32 for {check['agreement']:.1%} (needs {MIN_AGREEMENT:.0%}), "
              f"logit error {check['logit_error']:.3f} of the logits' spread")
        return 0
    from mnistlab.deploy.export import export_onnx

    out = export_onnx(Path(args.run_dir), Path(args.output) if args.output else None)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB; metadata: classes, mean, std, input layout, "
          "preprocessing, calibration)")
    return 0


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a run's model to ONNX, or as a Hugging Face style model folder",
                       description="Export RUN_DIR's model as one ONNX file (torch.onnx dynamo export, a dynamic "
                                   "batch dimension, metadata: classes, mean, std, input layout, preprocessing, "
                                   "calibration), written only after onnxruntime reproduces PyTorch's logits "
                                   '(needs the export extra: pip install "mnistlab[export]"); or, with --format hf, '
                                   "as a model folder in Hugging Face's conventions: model.safetensors, "
                                   "config.json, a model card (README.md) and samples.png.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `mnistlab train`")
    p.add_argument("--format", choices=("onnx", "hf"), default="onnx",
                   help="onnx (default): one .onnx file; hf: a model folder (docs/deploy.md)")
    p.add_argument("-o", "--output", metavar="PATH",
                   help="where to write (default: RUN_DIR/model.onnx, RUN_DIR/model.int8.onnx with --quantize int8, "
                        "or the folder RUN_DIR/hf for --format hf)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="int8: onnxruntime static quantization calibrated on training images, written only if it "
                        "agrees with fp32 (loads the dataset; --data-dir, --offline); `predict --precision int8` "
                        "uses it")
    _add_data_source_flags(p)
    p.set_defaults(func=cmd_export)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}")
    return int(text)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from mnistlab.deploy.serve.server import run_server
    except ImportError as e:
        raise UserError(f'serving needs the serve extra: pip install "mnistlab[serve]" ({e})') from None
    from mnistlab.deploy.serve.server import ServeSettings

    chosen = {name: getattr(args, name) for name in ("max_batch", "workers", "keep_alive",
                                                       "read_timeout") if getattr(args, name) is not None}
    options = dict(runtime=args.runtime, precision=args.precision, force_bf16=args.force_bf16)
    settings = ServeSettings(run_dirs=args.run_dirs, max_upload=round(args.max_upload_mb * 2**20),
                             open_options=options, **chosen)
    run_server(args.run_dirs, args.host, args.port, settings=settings)
    return 0


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="a page to draw on and a JSON API for trained runs",
                       description="Serve RUN_DIRs over HTTP: a page to draw on (/), POST /api/predict, "
                                   "GET /api/models, GET /healthz, OpenAPI docs at /docs. Binds 127.0.0.1 unless "
                                   'told otherwise. Needs the serve extra: pip install "mnistlab[serve]".')
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders written by `mnistlab train`, or model "
                   "folders written by `mnistlab export --format hf`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port, 1-65535 (default: 8000)")
    p.add_argument("--max-upload-mb", type=_arg_type("positive_float"), default=8.0, metavar="MIB",
                   help="largest picture upload in MiB (default: 8, a phone photo); JSON bodies stay under 64 KiB")
    # the defaults live in deploy/serve/server.py's ServeSettings (measured: docs/deploy.md, "A server that batches")
    p.add_argument("--workers", type=_arg_type("positive_int"), metavar="N",
                   help="server processes, each with its own copy of the models and using about one core "
                        "(default: 1)")
    p.add_argument("--max-batch", type=_arg_type("positive_int"), metavar="N",
                   help="most pictures per model call; pictures that arrive while the server is busy join the "
                        "next call, a lone picture never waits (default: 32; 1 turns batching off)")
    p.add_argument("--keep-alive", type=_arg_type("positive_int"), metavar="S",
                   help="seconds an idle keep-alive connection stays open (default: 5)")
    p.add_argument("--read-timeout", type=_arg_type("positive_float"), metavar="S",
                   help="seconds a request's body may take to arrive, else 408 (default: 10)")
    _add_runtime_flags(p)
    p.set_defaults(func=cmd_serve)


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mnistlab.inspect.report import write_report

    out = write_report(Path(args.run_dir), Path(args.output) if args.output else None)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, self-contained: open it in a browser)")
    return 0


def _add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page of what a run learned",
                       description="Build an HTML report from RUN_DIR alone: the run, learning curves, confusion, "
                                   "mistakes, calibration, saliency, and what the model's layers, attention or "
                                   "hidden states do. Images and styles are inline: it opens from disk, offline.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `mnistlab train`")
    p.add_argument("-o", "--output", metavar="FILE", help="where to write (default: RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)


def cmd_compare(args: argparse.Namespace) -> int:
    from mnistlab.inspect.compare import run_compare

    return run_compare(args)


def _add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="train a grid of models x seeds, or aggregate runs, into a leaderboard",
                       description="With --models: train every (model, seed) of the grid, each in its own process "
                                   "and run folder under -o DIR (finished runs are skipped, a killed one resumed), "
                                   "then write the leaderboard. With RUN_DIRs: aggregate existing runs, grouped by "
                                   "dataset, model, recipe and configuration less the seed; folders that are not "
                                   "finished training runs are skipped, one line each. The leaderboard "
                                   "(markdown, CSV and a figure) reports test accuracy as mean +- std over seeds.")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="existing runs to aggregate (instead of a grid)")
    p.add_argument("--dataset", help="the grid's dataset (default: fashion-mnist)")
    p.add_argument("--models", nargs="+", metavar="MODEL", help="the grid's models (mnistlab models lists them)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="the grid's seeds (default: 0 1 2)")
    p.add_argument("--recipe", help="a recipe for every run of the grid")
    p.add_argument("--epochs", type=_arg_type("positive_int"), help="epochs for every run of the grid")
    p.add_argument("--threads", type=_arg_type("positive_int"), help="CPU threads per run (default: all cores)")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="folder for the grid's runs and the leaderboard (default: runs/compare); "
                        "with RUN_DIRs, where to write leaderboard.md, .csv and .png (default: none written, "
                        "the leaderboard is printed)")
    p.set_defaults(func=cmd_compare)


def _add_models_parser(sub) -> None:
    p = sub.add_parser("models", help="list the model zoo: parameters, MFLOPs, description",
                       description="The model zoo: each model's parameters, forward MFLOPs and description.")
    p.set_defaults(func=cmd_models)


def _add_plot_parser(sub) -> None:
    plot = sub.add_parser("plot", help="pictures of a run", description="Pictures drawn from a run folder.")
    psub = plot.add_subparsers(dest="plot_command", required=True, metavar="KIND")
    p = psub.add_parser("grad-flow", help="gradient norms per time step and per layer (train with --grad-flow)",
                        description="Draw the gradient norms a run recorded with --grad-flow.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run trained with --grad-flow")
    p.add_argument("-o", "--output", default="grad_flow.png", help="PNG file to write (default: grad_flow.png)")
    p.set_defaults(func=cmd_plot_grad_flow)


def _add_lab_parser(sub) -> None:
    from mnistlab.labs import LABS

    p = sub.add_parser("lab", help="the notes' principles, runnable: checks and a figure",
                       description="Run a lab: it prints what it verified (PASS/FAIL with numbers) and draws a "
                                   "figure. Without TOPIC: list the labs. Exit status 1 if a check failed.")
    p.add_argument("topic", nargs="?", choices=list(LABS), metavar="TOPIC", help=", ".join(LABS))
    p.add_argument("-o", "--output", help="PNG file for the figure (default: lab_<topic>.png); cocktail-party "
                                          "also writes its WAV files into <stem>_wav/ beside it")
    p.set_defaults(func=cmd_lab)


def _add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="list, fetch, verify and show datasets",
                          description="Datasets: mnist, fashion-mnist, kmnist (IDX, 60k/10k) and "
                                      "digits (scikit-learn's bundled 8x8 digits, no download).")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = dsub.add_parser("list", help="each dataset, its size and where it was found",
                        description="Each dataset, its size, and where it was found (or 'not present').")
    p.set_defaults(func=cmd_data_list)

    p = dsub.add_parser("fetch", help="download a dataset into the cache and verify it",
                        description="Download a dataset into the cache and verify it (nothing to do when present).")
    p.add_argument("name", help="dataset name (see `mnistlab data list`)")
    p.add_argument("--offline", action="store_true", help="only check what is on disk")
    p.set_defaults(func=cmd_data_fetch)

    p = dsub.add_parser("verify", help="check the hash and IDX header of every file (exit 0 or 2)",
                        description="Check the hash and IDX header of every file of a dataset (exit 0 or 2).")
    p.add_argument("name", help="dataset name whose hashes to check against")
    p.add_argument("--data-dir", metavar="DIR", help="verify this folder instead of the one found")
    p.set_defaults(func=cmd_data_verify)

    p = dsub.add_parser("show", help="save a labelled grid of samples as a PNG",
                        description="Save a grid of samples as a PNG, one row per class.")
    p.add_argument("name", nargs="?", help="dataset name (see `mnistlab data list`); optional with --data-dir, "
                   "whose files say what it holds")
    p.add_argument("-o", "--output", default="grid.png", help="PNG file to write (default: grid.png)")
    p.add_argument("--split", choices=("train", "val", "test"), default="train",
                   help="which split to sample from (default: train)")
    p.add_argument("--per-class", type=_arg_type("positive_int"), default=8, help="samples per class (default: 8)")
    p.add_argument("--seed", type=_arg_type("seed"), default=0, help="which samples to draw (default: 0)")
    _add_data_source_flags(p)
    p.set_defaults(func=cmd_data_show)


def build_parser() -> argparse.ArgumentParser:
    from mnistlab import __version__

    parser = argparse.ArgumentParser(
        prog="mnistlab",
        description="A deep-learning lab around MNIST and its family: data, models, training, "
                    "and no black boxes.",
    )
    parser.add_argument("--version", action="version", version=f"mnistlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train_parser, _add_pretrain_parser, _add_eval_parser, _add_predict_parser,
                _add_calibrate_parser, _add_export_parser,
                _add_serve_parser, _add_report_parser, _add_compare_parser, _add_models_parser, _add_plot_parser,
                _add_lab_parser, _add_data_parser):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        rank = os.environ.get("RANK", "0") if _under_torchrun() else "0"  # under torchrun: which process
        print(f"mnistlab: error{'' if rank == '0' else f' (rank {rank})'}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mnistlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
