"""One process with 2 threads against 2 processes (torchrun, gloo) with 1 thread each, and what DDP sends.

    python bench/ddp_scaling.py                       # both parts: the default CNN on Fashion-MNIST, seeds 0 1 2
    python bench/ddp_scaling.py --part comm           # bytes per step and all-reduce time only (a minute)
    python bench/ddp_scaling.py --part train --seeds 0 --epochs 1 --dataset digits   # a quick look

Part `train`: `mnistlab train` as a user runs it, once as one process (--threads 2) and once under
`torchrun --standalone --nproc-per-node 2` (one thread each: torchrun's OMP_NUM_THREADS=1), same global
batch, per seed. Prints images/s (median over epochs), seconds per epoch and test accuracy (mean +- std).

Part `comm`: for each model, 2 gloo processes on this machine wrap it in DistributedDataParallel and count,
with a communication hook, the bytes each step all-reduces (the gradients, in DDP's buckets) and DDP's
broadcast of buffers (BatchNorm statistics) at each forward; then time an all-reduce of that many bytes on
loopback and one rank's forward+backward of its share of the global batch. Ring all-reduce moves
2 (N - 1) / N times the buffer through each rank's link: the bytes per step do not shrink as N grows while
each rank's compute does, which is what limits data parallelism for small models.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_line  # noqa: E402
from mnistlab.run import METRICS, read_metrics  # noqa: E402

COMM_MODELS = ["mlp", "lenet5", "cnn", "lstm", "vit"]


def train_once(args: list[str], run: Path, nproc: int) -> dict:
    env = dict(os.environ, MNISTLAB_DIST_TIMEOUT="120")
    if nproc == 1:
        cmd = [sys.executable, "-m", "mnistlab", "train", *args, "--threads", "2", "--run-dir", str(run)]
    else:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "mnistlab", "train", *args, "--run-dir", str(run)]
    if not (run / "results.json").exists():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    results = json.loads((run / "results.json").read_text())
    metrics = read_metrics(run / METRICS)
    return dict(accuracy=results["test_accuracy"], seconds=results["train_seconds"],
                epoch_seconds=statistics.median(r["seconds"] for r in metrics),
                images_per_second=statistics.median(r["images_per_second"] for r in metrics))


def part_train(a: argparse.Namespace, out: Path) -> None:
    flags = ["--dataset", a.dataset, *(["--epochs", str(a.epochs)] if a.epochs else [])]
    rows = []
    for label, nproc in (("1 process x 2 threads", 1), ("2 processes x 1 thread (torchrun, gloo)", 2)):
        runs = []
        for seed in a.seeds:
            r = train_once([*flags, "--seed", str(seed)], out / f"p{nproc}-s{seed}", nproc)
            print(f"{label}, seed {seed}: {r['accuracy']:.2%}, {r['seconds']:.1f} s, "
                  f"{r['images_per_second']:,.0f} img/s", file=sys.stderr, flush=True)
            runs.append(r)
        acc = [r["accuracy"] * 100 for r in runs]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        rows.append(f"| {label} | {statistics.median(r['images_per_second'] for r in runs):,.0f} | "
                    f"{statistics.median(r['epoch_seconds'] for r in runs):.1f} s | "
                    f"{statistics.median(r['seconds'] for r in runs):.1f} s | "
                    f"{statistics.mean(acc):.2f}% +- {std:.2f} |")
    print(f"\n{a.dataset}, default cnn, `mnistlab train {' '.join(flags)}`, seeds {' '.join(map(str, a.seeds))} "
          "(medians over seeds; accuracy mean +- sample std)\n")
    print("| processes | images/s | seconds per epoch | training | test accuracy |\n|---|---|---|---|---|")
    print("\n".join(rows))


def _comm_worker(rank: int, size: int, port: int, model_name: str, batch: int, steps: int, queue) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from mnistlab.models import create_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    torch.manual_seed(0)
    model = create_model(model_name, in_chans=1, num_classes=10).to(memory_format=torch.channels_last)
    warnings.filterwarnings("ignore", message="Grad strides do not match")  # size-1 dims: see distributed.wrap
    ddp = DistributedDataParallel(model)
    sent = {"bytes": 0, "calls": 0}

    def counting_allreduce(state, bucket):  # what DDP's default hook does, plus a count
        buf = bucket.buffer()
        sent["bytes"] += buf.numel() * buf.element_size()
        sent["calls"] += 1
        fut = dist.all_reduce(buf.div_(size), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    ddp.register_comm_hook(None, counting_allreduce)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    share = batch // size
    x, y = torch.randn(share, 1, 28, 28), torch.randint(0, 10, (share,))
    for _ in range(2):  # warm-up: DDP rebuilds its buckets after the first step
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    sent.update(bytes=0, calls=0)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    grad_bytes, buckets = sent["bytes"] / steps, sent["calls"] / steps
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers() if b.is_floating_point())
    # the same bytes all-reduced on their own (loopback gloo), and one rank's compute without DDP
    flat = torch.zeros(int(grad_bytes) // 4)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        dist.all_reduce(flat)
    allreduce_s = (time.perf_counter() - t0) / steps
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    compute_s = (time.perf_counter() - t0) / steps
    if rank == 0:
        queue.put(dict(model=model_name, params=sum(p.numel() for p in model.parameters()), grad_bytes=grad_bytes,
                       buckets=buckets, buffer_bytes=buffer_bytes, allreduce_s=allreduce_s, compute_s=compute_s))
    dist.destroy_process_group()


def part_comm(a: argparse.Namespace) -> None:
    import socket

    import torch.multiprocessing as mp

    from mnistlab.config import MODEL_DEFAULTS
    from mnistlab.models import create_model
    from mnistlab.models.flops import forward_flops

    ctx = mp.get_context("spawn")
    print("\nDDP traffic per step, 2 gloo processes on this machine (1 thread each), each model at its default "
          "global batch\n")
    print("| model | parameters | all-reduced per step | buckets | buffers broadcast | ring traffic per rank, N=2 / "
          "N=8 | all-reduce time (loopback) | compute per step (one rank) | GFLOP per step (global) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in a.models:
        batch = MODEL_DEFAULTS.get(name, {}).get("batch_size", 128)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = ctx.Queue()
        procs = [ctx.Process(target=_comm_worker, args=(r, 2, port, name, batch, a.steps, queue)) for r in range(2)]
        for p in procs:
            p.start()
        r = queue.get(timeout=600)
        for p in procs:
            p.join(60)
        gflop = 3 * forward_flops(create_model(name, in_chans=1, num_classes=10)) * batch / 1e9  # fwd + 2x bwd
        ring = [2 * (n - 1) / n * r["grad_bytes"] for n in (2, 8)]
        print(f"| {name} | {r['params']:,} | {r['grad_bytes'] / 1e6:.2f} MB | {r['buckets']:.0f} | "
              f"{r['buffer_bytes'] / 1e3:.1f} kB | {ring[0] / 1e6:.2f} / {ring[1] / 1e6:.2f} MB | "
              f"{r['allreduce_s'] * 1e3:.1f} ms | {r['compute_s'] * 1e3:.1f} ms | {gflop:.2f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("train", "comm", "both"), default="both")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=None, help="default: the model's default (cnn: 5)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--models", nargs="+", default=COMM_MODELS)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model in part comm")
    p.add_argument("-o", "--out", default=None, help="run folders (default: a temporary folder)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        if a.part in ("train", "both"):
            part_train(a, out)
        if a.part in ("comm", "both"):
            part_comm(a)
    print(f"\n{machine_line()}")


if __name__ == "__main__":
    main()
