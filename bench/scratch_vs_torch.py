"""The numpy engine against PyTorch: one epoch of the same MLP, then (with --full) whole training runs.

    python bench/scratch_vs_torch.py                 # epoch time of each engine, and the ratio
    python bench/scratch_vs_torch.py --full          # + mnistlab train --engine scratch|torch --model mlp

Epoch: the zoo's `mlp` (784-256-128-10, ReLU), Fashion-MNIST's 55,000 training images, batch 128,
AdamW, the same per-epoch order; each step gathers and normalises its batch, runs forward,
backward and the update. Both engines run in this process one after the other, float32, on the
CPU's cores (torch with its default thread count, numpy with its BLAS's). Best of `--repeats`.
Target (issue): scratch within 2x torch.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def scratch_epoch(x_u8: np.ndarray, y: np.ndarray, mean: float, std: float, batch: int, perm: np.ndarray) -> float:
    from mnistlab.scratch import functional as F
    from mnistlab.scratch import nn, optim, tensor
    from mnistlab.scratch.train import to_input

    nn.manual_seed(0)
    model = nn.MLP()
    opt = optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    t0 = time.perf_counter()
    for i in range(0, len(perm), batch):
        idx = perm[i : i + batch]
        loss = F.cross_entropy(model(tensor(to_input(x_u8[idx], mean, std))), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def torch_epoch(x_u8, y, mean: float, std: float, batch: int, perm) -> float:
    import torch
    import torch.nn.functional as F

    from mnistlab.data.batches import to_input
    from mnistlab.models import create_model

    torch.manual_seed(0)
    model = create_model("mlp")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    t0 = time.perf_counter()
    for i in range(0, len(perm), batch):
        idx = perm[i : i + batch]
        loss = F.cross_entropy(model(to_input(x_u8[idx], mean, std)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="also train both engines with mnistlab train's defaults")
    args = ap.parse_args()

    import torch

    from mnistlab.data.batches import epoch_permutation
    from mnistlab.data.dataset import load_dataset
    from mnistlab.run import tune_allocator

    tune_allocator()
    ds = load_dataset(args.dataset)
    perm = epoch_permutation(len(ds.train_labels), 0, 0)
    np_cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    print(f"{ds.name}: {len(perm):,} images per epoch, batch {args.batch_size}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), numpy {np.__version__} ({np_cfg.get('name')} {np_cfg.get('version')})")
    times = {"torch": [], "scratch": []}
    for _ in range(args.repeats):
        times["torch"].append(torch_epoch(ds.train_images, ds.train_labels, ds.mean, ds.std, args.batch_size, perm))
        times["scratch"].append(scratch_epoch(ds.train_images.numpy(), ds.train_labels.numpy(), ds.mean, ds.std,
                                              args.batch_size, perm.numpy()))
    t_torch, t_scratch = min(times["torch"]), min(times["scratch"])
    print(f"mlp epoch   torch {t_torch:6.2f} s ({len(perm) / t_torch:,.0f} img/s)   "
          f"scratch {t_scratch:6.2f} s ({len(perm) / t_scratch:,.0f} img/s)   "
          f"ratio scratch/torch {t_scratch / t_torch:.2f}"
          f"   (target <= 2.0; all runs: torch {[round(t, 2) for t in times['torch']]}, "
          f"scratch {[round(t, 2) for t in times['scratch']]})")
    sys.stdout.flush()
    if args.full:
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
        from common import run_train

        for engine in ("scratch", "torch"):
            for model in ("mlp", "cnn"):
                cmd = ["--engine", engine, "--model", model, "--dataset", args.dataset]
                res, wall, metrics = run_train(cmd)
                print(f"mnistlab train {' '.join(cmd)}: test {res['test_accuracy']:.2%}, {res['epochs']} epochs, "
                      f"{res['train_seconds']:.1f} s training, {wall:.1f} s wall", flush=True)


if __name__ == "__main__":
    main()
