"""Training throughput of every model (and the recipes' CNNs), with and without the allocator tuning.

    python bench/speed.py                 # all models, batch 256, 2 threads
    python bench/speed.py --models cnn fast --steps 20

Each measurement runs in a fresh process (glibc's allocator settings are per process): a few
warm-up steps, then `--steps` timed SGD steps on random data of MNIST's shape. Prints images/s,
forward MFLOPs per image and the achieved training GFLOP/s (forward + backward taken as 3x forward).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def measure(name: str, steps: int, batch: int) -> dict:
    import time

    import torch
    import torch.nn.functional as F

    from mnistlab.config import RECIPES
    from mnistlab.models import create_model
    from mnistlab.models.flops import forward_flops
    from mnistlab.run import tune_allocator

    tune_allocator()
    if name in RECIPES:
        model = create_model(RECIPES[name]["model"], **RECIPES[name].get("model_kwargs", {}))
    else:
        model = create_model(name)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    rate = steps * batch / (time.perf_counter() - t0)
    flops = forward_flops(model)
    return dict(images_per_second=rate, mflops=flops / 1e6, gflops_per_second=3 * flops * rate / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="model or recipe names (default: every model, then each recipe)")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per measurement (default: 15)")
    ap.add_argument("--batch-size", type=int, default=256, help="images per step (default: 256)")
    ap.add_argument("--inner", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        print(json.dumps(measure(args.inner[0], int(args.inner[1]), int(args.inner[2]))))
        return
    from mnistlab.config import RECIPES
    from mnistlab.models import list_models

    names = args.models or [*list_models(), *RECIPES]
    header = f"{'model':<10} {'MFLOPs':>7} {'default img/s':>14} {'tuned img/s':>12} {'speed-up':>9}"
    print(header + f" {'tuned GFLOP/s':>14}")
    for name in names:
        row = {}
        for mode in ("default", "tuned"):
            env = dict(os.environ, MNISTLAB_ALLOCATOR=mode)
            out = subprocess.run([sys.executable, __file__, "--inner", name, str(args.steps), str(args.batch_size)],
                                 env=env, capture_output=True, text=True, check=True).stdout
            row[mode] = json.loads(out)
        d, t = row["default"], row["tuned"]
        print(f"{name:<10} {t['mflops']:>7.2f} {d['images_per_second']:>14,.0f} {t['images_per_second']:>12,.0f} "
              f"{t['images_per_second'] / d['images_per_second']:>8.2f}x {t['gflops_per_second']:>14.1f}", flush=True)
    print(f"threads: {os.cpu_count()} cores; batch {args.batch_size}; MNISTLAB_ALLOCATOR=default disables the tuning")


if __name__ == "__main__":
    main()
