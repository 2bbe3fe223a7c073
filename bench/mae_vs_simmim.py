"""MAE or SimMIM? The same encoder pre-trained both ways for the same time, then judged by a linear probe.

    python bench/mae_vs_simmim.py                                  # Fashion-MNIST, 120 s each, 1 thread
    python bench/mae_vs_simmim.py --budget 600 --threads 2         # closer to a real pre-training
    python bench/mae_vs_simmim.py --variants "--method mae" "--method mae --target pixels"   # other choices

For each variant (a set of `mnistlab pretrain` flags; by default MAE and SimMIM): a few steps measure
its images/s, the epochs that fit the budget follow, and `mnistlab pretrain FLAGS --epochs E` runs in
its own process. Then the frozen encoder's features
(the mean of its patch tokens, what fine-tuning uses) of K labelled training images per class feed a
linear classifier (evaluate.linear_probe), scored on the validation split, for three labelled subsets.
The randomly initialised encoder is the baseline. Nothing here reads the test split.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path


def variant_config(flags: list[str]):
    """The PretrainConfig that `mnistlab pretrain FLAGS` would run."""
    from dataclasses import fields

    from mnistlab.cli import build_parser
    from mnistlab.config import PretrainConfig

    args = build_parser().parse_args(["pretrain", *flags])
    given = {f.name: getattr(args, f.name) for f in fields(PretrainConfig) if getattr(args, f.name, None) is not None}
    return PretrainConfig.from_dict(dict(given, model_kwargs=dict(args.model_arg or [])))


def images_per_second(flags: list[str], threads: int, steps: int = 8) -> float:
    import torch

    from mnistlab.models import create_model
    from mnistlab.models.mae import create_masked_model, random_mask

    cfg = variant_config(flags)
    torch.set_num_threads(threads)
    model = create_masked_model(cfg.method, create_model("vit", num_classes=1, **cfg.model_kwargs),
                                cfg.target == "patch-norm", cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = cfg.batch_size
    x = torch.randn(batch, 1, 28, 28)
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        loss, _ = model.loss(x, random_mask(batch, model.n_patches, cfg.mask_ratio))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def probe_accuracies(run: Path | None, ds, ks: list[int], seeds: list[int]) -> dict[int, list[float]]:
    """Validation accuracy of a linear probe on the encoder of `run` (None: a random encoder), per K and seed."""
    import torch

    from mnistlab.config import TrainConfig
    from mnistlab.data.batches import to_input
    from mnistlab.data.subset import stratified_subset
    from mnistlab.evaluate import linear_probe
    from mnistlab.models import create_model
    from mnistlab.training import load_pretrained_encoder

    kwargs = json.loads((run / "config.json").read_text())["model_kwargs"] if run is not None else {}
    torch.manual_seed(0)
    model = create_model("vit", num_classes=ds.num_classes, **kwargs)
    if run is not None:
        load_pretrained_encoder(model, TrainConfig(model="vit", model_kwargs=kwargs, init=str(run)), ds.name)
    model.eval()

    def features(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model.forward_features(to_input(images[i : i + 1000], ds.mean, ds.std))
                              for i in range(0, len(images), 1000)])

    val = features(ds.val_images)
    out: dict[int, list[float]] = {}
    for k in ks:
        for seed in seeds:
            idx = stratified_subset(ds.train_labels, k, seed, ds.num_classes)
            out.setdefault(k, []).append(linear_probe(features(ds.train_images[idx]), ds.train_labels[idx], val,
                                                      ds.val_labels))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist", help="dataset (default: fashion-mnist)")
    ap.add_argument("--budget", type=float, default=120, help="pre-training seconds per method (default: 120)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    ap.add_argument("--ks", nargs="+", type=int, default=[10, 100], help="labels per class (default: 10 100)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="labelled subsets (default: 0 1 2)")
    ap.add_argument("--variants", nargs="+", default=["--method mae", "--method simmim"], metavar="FLAGS",
                    help='`mnistlab pretrain` flags of each variant (default: "--method mae" "--method simmim")')
    ap.add_argument("-o", "--output", default="runs/mae_vs_simmim", help="run folders (default: runs/mae_vs_simmim)")
    args = ap.parse_args()
    import torch

    from mnistlab.data.dataset import load_dataset

    torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset)
    rows = [("random init", None, probe_accuracies(None, ds, args.ks, args.seeds))]
    for variant in args.variants:
        flags = shlex.split(variant)
        run = Path(args.output) / "_".join(f.lstrip("-").replace("=", "-") for f in flags)
        if not (run / "results.json").is_file():
            rate = images_per_second(flags, args.threads)
            epochs = max(1, round(0.9 * args.budget * rate / len(ds.train_images)))
            cmd = [sys.executable, "-m", "mnistlab", "pretrain", "--dataset", args.dataset, *flags,
                   "--epochs", str(epochs), "--threads", str(args.threads), "--run-dir", str(run)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        rows.append((variant, run, probe_accuracies(run, ds, args.ks, args.seeds)))

    print("| encoder | pre-training | images/s | val reconstruction loss | "
          + " | ".join(f"probe, {k} labels/class (val)" for k in args.ks) + " |")
    print("|---|---|---|---|" + "---|" * len(args.ks))
    for name, run, acc in rows:
        if run is None:
            cost = "none | | "
        else:
            r = json.loads((run / "results.json").read_text())
            cost = (f"{r['epochs']} epochs, {r['train_seconds']:.0f} s | {r['images_per_second']:,.0f} | "
                    f"{r['val_loss']:.4f}")
        cells = [f"{statistics.fmean(v):.2%} +- {statistics.stdev(v) if len(v) > 1 else 0:.2%}" for v in acc.values()]
        print(f"| {name} | {cost} | " + " | ".join(cells) + " |")
    from mnistlab.inspect.leaderboard import machine_line

    print(machine_line(args.threads))


if __name__ == "__main__":
    main()
