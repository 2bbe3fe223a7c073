"""The classic PyTorch MNIST example recipe against `mnistlab train --recipe fast`, side by side.

    python bench/classic_vs_mnistlab.py                # Fashion-MNIST, both, then the ratio
    python bench/classic_vs_mnistlab.py --only classic # just the reference
    python bench/classic_vs_mnistlab.py --dataset mnist
    python bench/classic_vs_mnistlab.py --only mnistlab --repeats 3 --precision auto   # seeds 1, 2, 3
    python bench/classic_vs_mnistlab.py --seed 0 --repeats 3 --precision auto,fp32     # both, one window

With --repeats N each contender runs N times, seeds SEED..SEED+N-1, alternating between them so that a
slow spell of a shared machine falls on both; the summary gives the median wall time with its range and
the mean accuracy with its standard deviation, and the ratio of the medians. --precision takes a
comma-separated list: each precision is its own mnistlab contender, in the same rounds.

The classic recipe is pytorch/examples mnist/main.py as its README runs it: conv 3x3 32, conv 3x3
64, max-pool, dropout 0.25, fc 128, dropout 0.5, fc 10, log-softmax + NLL; Adadelta lr 1.0, StepLR
gamma 0.7, batch 64, MNIST's normalisation, and a shuffling DataLoader over a per-sample Dataset.
Each contender runs in its own fresh process, one after the other, and is timed from process
start to exit (imports, data loading, training and the test evaluation included). The classic
process runs with PyTorch's defaults; mnistlab runs as a user would run it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import accuracy_spread, run_train


def classic_main(dataset: str, epochs: int, seed: int) -> None:
    """The classic recipe, in this process. Prints one JSON line with its test accuracy."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torch.utils.data import Dataset as TorchDataset

    from mnistlab.data.dataset import load_dataset

    torch.manual_seed(seed)
    ds = load_dataset(dataset)
    # The example trains on all 60,000 training images (it has no validation split).
    train_x = torch.cat([ds.train_images, ds.val_images])
    train_y = torch.cat([ds.train_labels, ds.val_labels])

    class PerSample(TorchDataset):
        """ToTensor + Normalize((0.1307,), (0.3081,)) per sample, as torchvision does it."""

        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            img = self.x[i].to(torch.float32).div(255).unsqueeze(0)  # (1, 28, 28)
            return (img - 0.1307) / 0.3081, int(self.y[i])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 3, 1)
            self.conv2 = nn.Conv2d(32, 64, 3, 1)
            self.dropout1 = nn.Dropout(0.25)
            self.dropout2 = nn.Dropout(0.5)
            self.fc1 = nn.Linear(9216, 128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x):
            x = F.relu(self.conv1(x))
            x = F.relu(self.conv2(x))
            x = F.max_pool2d(x, 2)
            x = self.dropout1(x)
            x = torch.flatten(x, 1)
            x = F.relu(self.fc1(x))
            x = self.dropout2(x)
            return F.log_softmax(self.fc2(x), dim=1)

    train_loader = DataLoader(PerSample(train_x, train_y), batch_size=64, shuffle=True)
    test_loader = DataLoader(PerSample(ds.test_images, ds.test_labels), batch_size=1000)
    model = Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = F.nll_loss(model(x), y)
            loss.backward()
            optimizer.step()
        scheduler.step()
    train_seconds = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in test_loader:
            correct += (model(x).argmax(1) == y).sum().item()
    print(json.dumps({"test_accuracy": correct / len(ds.test_labels), "train_seconds": train_seconds,
                      "images_per_second": epochs * len(train_y) / train_seconds}))


def run_timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.1f} s (range {min(values):.1f}-{max(values):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist", help="dataset name (default: fashion-mnist)")
    ap.add_argument("--epochs", type=int, default=3, help="classic recipe epochs (default: 3)")
    ap.add_argument("--recipe", default="fast", help="mnistlab recipe to race (default: fast)")
    ap.add_argument("--precision", help="mnistlab --precision, or several comma-separated, each its own contender "
                                        "(default: the recipe's)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the first run of each (default: 1)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each contender, one seed each (default: 1)")
    ap.add_argument("--only", choices=("classic", "mnistlab"), help="run one contender only")
    ap.add_argument("--classic-inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.classic_inner:
        classic_main(args.dataset, args.epochs, args.seed)
        return

    precisions = args.precision.split(",") if args.precision else [None]
    contenders = {p: f"mnistlab --precision {p}" if p else "mnistlab" for p in precisions}
    results: dict[str, list[tuple[float, float]]] = {"classic": [], **{name: [] for name in contenders.values()}}
    for seed in range(args.seed, args.seed + args.repeats):
        if args.only in (None, "classic"):
            wall, out = run_timed([sys.executable, __file__, "--classic-inner", "--dataset", args.dataset,
                                   "--epochs", str(args.epochs), "--seed", str(seed)])
            r = json.loads(out.strip().splitlines()[-1])
            results["classic"].append((r["test_accuracy"], wall))
            print(f"classic  ({args.epochs} epochs, seed {seed}): test accuracy {r['test_accuracy']:.2%}, wall "
                  f"{wall:.1f} s (training {r['train_seconds']:.1f} s at {r['images_per_second']:,.0f} images/s)",
                  flush=True)
        if args.only in (None, "mnistlab"):
            for precision, name in contenders.items():
                extra = ["--precision", precision] if precision else []
                r, wall, _ = run_train(["--recipe", args.recipe, "--dataset", args.dataset, "--seed", str(seed),
                                        *extra])
                results[name].append((r["test_accuracy"], wall))
                print(f"mnistlab (--recipe {args.recipe}{' --precision ' + precision if precision else ''}, seed "
                      f"{seed}): test accuracy {r['test_accuracy']:.2%}, wall {wall:.1f} s (training "
                      f"{r['train_seconds']:.1f} s, {r['epochs']} epochs, {r['precision']})", flush=True)
    for name, runs in results.items():
        if len(runs) > 1:
            print(f"{name}: wall {_spread([w for _, w in runs])}; "
                  f"test accuracy {accuracy_spread([a for a, _ in runs])} over {len(runs)} seeds")
    for name in contenders.values():
        if not (results["classic"] and results[name]):
            continue
        acc_c, acc_m = (statistics.mean(a for a, _ in results[k]) for k in ("classic", name))
        walls_c, walls_m = ([w for _, w in results[k]] for k in ("classic", name))
        ratio = statistics.median(walls_c) / statistics.median(walls_m)
        verdict = "meets" if acc_m >= acc_c and ratio >= 10 else "misses"
        low, high = min(walls_c) / max(walls_m), max(walls_c) / min(walls_m)
        print(f"ratio, {name}: 1/{ratio:.1f} of the classic wall time (medians; 1/{low:.1f} to 1/{high:.1f} "
              f"over the runs), accuracy {acc_m - acc_c:+.2%} points (means); "
              f"{verdict} the target (>= classic accuracy in <= 1/10 the time)")
    print(f"cpu threads: {os.cpu_count()}")


if __name__ == "__main__":
    main()
