"""bf16 autocast against fp32 on this machine: the measurement behind `--precision auto`.

    python bench/precision.py                          # Fashion-MNIST, 4 configurations, 1 epoch each (3 minutes)
    python bench/precision.py --device cuda            # the same on a GPU

Each configuration trains one epoch as `mnistlab train ... --precision fp32` and `--precision bf16` in a fresh
process and prints the median images/s of each and their ratio (above 1: bf16 is faster). `auto` picks bf16 only
where this ratio has been measured above 1: CUDA GPUs with native bf16 (lifecycle.pick_precision).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_line, run_train  # noqa: E402

CONFIGS = {
    "cnn --recipe fast": ["--recipe", "fast"],
    "cnn (default)": ["--model", "cnn"],
    "vit": ["--model", "vit"],
    "lstm": ["--model", "lstm"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    a = p.parse_args()
    print(f"{a.dataset}, 1 epoch each, median images/s over the epoch's steps as metrics.jsonl reports it\n")
    print("| configuration | fp32 images/s | bf16 images/s | bf16 / fp32 | test accuracy fp32 / bf16 |")
    print("|---|---|---|---|---|")
    for name in a.configs:
        rates, accs = {}, {}
        for precision in ("fp32", "bf16"):
            results, _, metrics = run_train([*CONFIGS[name], "--dataset", a.dataset, "--epochs", "1", "--device",
                                             a.device, "--precision", precision])
            rates[precision] = statistics.median(r["images_per_second"] for r in metrics)
            accs[precision] = results["test_accuracy"]
        print(f"| {name} | {rates['fp32']:,.0f} | {rates['bf16']:,.0f} | {rates['bf16'] / rates['fp32']:.2f}x | "
              f"{accs['fp32']:.2%} / {accs['bf16']:.2%} |", flush=True)
    print(f"\n{machine_line()}")


if __name__ == "__main__":
    main()
