"""CNN against RNN, GRU, LSTM (rows) and the ViT on one fixed time budget each.

    python bench/sequence_models.py                      # Fashion-MNIST, 300 s per model (~25 min)
    python bench/sequence_models.py --budget 60 --models lstm vit

For each model: a short probe measures its training images/s, the number of epochs that fits the
budget follows (at least 1), then `mnistlab train --model NAME --epochs E` runs in its own process
with the model's default settings. Prints test accuracy, images/s, epochs and wall time.
"""

from __future__ import annotations

import argparse
import time

from common import run_train


def probe_rate(name: str, batch: int, steps: int = 6) -> float:
    import torch
    import torch.nn.functional as F

    from mnistlab.models import create_model
    from mnistlab.run import tune_allocator

    tune_allocator()
    model = create_model(name).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist", help="dataset (default: fashion-mnist)")
    ap.add_argument("--budget", type=float, default=300, help="training seconds per model (default: 300)")
    ap.add_argument("--models", nargs="*", default=["cnn", "rnn", "gru", "lstm", "vit"], help="models to run")
    ap.add_argument("--train-size", type=int, default=55_000, help="training images per epoch (default: 55000)")
    args = ap.parse_args()
    from mnistlab.config import resolve_config

    print(f"| model | test accuracy | images/s | epochs | training | wall | budget {args.budget:.0f} s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        batch = resolve_config({"model": name}).batch_size
        rate = probe_rate(name, batch)
        # evaluation passes and start-up take a few percent; leave them room inside the budget
        epochs = max(1, int(0.93 * args.budget * rate / args.train_size))
        try:
            r, wall, metrics = run_train(["--dataset", args.dataset, "--model", name, "--epochs", str(epochs)])
        except RuntimeError as e:
            print(f"| {name} | {e} | | | | | |", flush=True)
            continue
        rate = sum(m["images_per_second"] for m in metrics) / len(metrics)
        print(f"| {name} | {r['test_accuracy']:.2%} | {rate:,.0f} | {epochs} | "
              f"{r['train_seconds']:.0f} s | {wall:.0f} s | `mnistlab train --dataset {args.dataset} --model {name} "
              f"--epochs {epochs}` |", flush=True)

if __name__ == "__main__":
    main()
