"""int8 and bf16 inference against fp32, for every model of the zoo: accuracy, file size, latency, throughput.

    python bench/quantize.py runs/quantize --part train        # train what is missing: 8 models x 3 seeds, 1 epoch
    python bench/quantize.py runs/quantize --part accuracy     # export, quantize, test accuracy of each runtime
    python bench/quantize.py runs/quantize --part timing       # latency and throughput, seed 0 of each model
    python bench/quantize.py runs/quantize                     # all three, then the tables

FOLDER holds one run per model and seed, FOLDER/<model>-s<seed> (the CNN is `--recipe fast`, the others their
model's defaults, each trained for --epochs on --dataset): runs already there are reused, so any finished runs
can be measured by placing (or linking) them there. One epoch is enough: what is measured is the CHANGE in
accuracy that int8 or bf16 brings to the same weights, and one epoch keeps 24 trainings within CPU-minutes.

accuracy: each run is exported (RUN/model.onnx) and quantized (RUN/model.int8.onnx, deploy/quantize.py:
calibrated on training images, checked on other training images), then the whole test split goes through
torch fp32, torch bf16 (CPU autocast), onnxruntime fp32 and onnxruntime int8; the figures are kept in
RUN/quantize_bench.json, so an interrupted part resumes. A model whose quantization is refused is listed
with the reason. timing: for seed 0 of each model, the median time of one call on a batch of 1 (latency) and
of 256 images (throughput), each runtime in this process with its default threads. Run it on a quiet
machine: the figures are only as good as the machine is idle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_line  # noqa: E402
from mnistlab.run import cpu  # noqa: E402

MODELS = ("cnn", "lenet5", "mlp", "linear", "vit", "rnn", "gru", "lstm")
RUNTIMES = (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))
RESULTS = "quantize_bench.json"


def train_flags(model: str) -> list[str]:
    return ["--recipe", "fast"] if model == "cnn" else ["--model", model]


def train(folder: Path, models: list[str], seeds: list[int], dataset: str, epochs: int) -> None:
    """Train each missing FOLDER/<model>-s<seed> with `mnistlab train` in a fresh process."""
    for seed in seeds:
        for model in models:
            run = folder / f"{model}-s{seed}"
            if (run / "results.json").is_file():
                continue
            print(f"training {run.name}", flush=True)
            cmd = [sys.executable, "-m", "mnistlab", "train", *train_flags(model), "--dataset", dataset,
                   "--epochs", str(epochs), "--seed", str(seed), "--run-dir", str(run)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed: {(proc.stderr.strip().splitlines() or [''])[-1]}")


def runs_of(folder: Path, models: list[str]) -> list[Path]:
    return sorted((r for r in folder.glob("*-s*") if r.name.rsplit("-s", 1)[0] in models
                   and (r / "results.json").is_file()), key=lambda r: (models.index(r.name.rsplit("-s", 1)[0]), r.name))


def open_runtimes(run: Path) -> dict[str, object]:
    """name -> Runtime for the four runtimes of a run that has its ONNX files (int8 left out when refused)."""
    from mnistlab.deploy.predict import Predictor
    from mnistlab.errors import UserError

    out = {}
    for runtime, precision in RUNTIMES:
        try:
            p = Predictor.open(run, runtime=runtime, precision=precision, warn_uncalibrated=False, force_bf16=True)
        except UserError:
            continue
        out[p.runtime] = p.backend
    return out


def accuracy(folder: Path, models: list[str]) -> None:
    """Export, quantize and measure the test accuracy of each runtime, for every run not measured yet."""
    import numpy as np

    from mnistlab.data.dataset import load_dataset
    from mnistlab.deploy.export import export_onnx
    from mnistlab.deploy.quantize import quantize_run
    from mnistlab.errors import UserError
    from mnistlab.record import RunRecord

    sets: dict[str, object] = {}
    for run in runs_of(folder, models):
        if (run / RESULTS).is_file():
            continue
        print(f"accuracy {run.name}", flush=True)
        cfg = RunRecord(run).config()
        key = f"{cfg['dataset']}:{cfg.get('val_size')}"
        if key not in sets:
            sets[key] = load_dataset(cfg["dataset"], offline=True, val_size=cfg.get("val_size"))
        ds = sets[key]
        row: dict[str, object] = {"model": run.name.rsplit("-s", 1)[0], "run": run.name}
        t0 = time.perf_counter()
        export_onnx(run)
        row["export_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            _, row["check"] = quantize_run(run, offline=True)
        except UserError as e:
            row["refused"] = str(e)
        row["quantize_seconds"] = time.perf_counter() - t0
        row["bytes"] = {"fp32": (run / "model.onnx").stat().st_size}
        if (run / "model.int8.onnx").is_file() and "refused" not in row:
            row["bytes"]["int8"] = (run / "model.int8.onnx").stat().st_size
        labels = ds.test_labels.numpy()
        row["accuracy"] = {name: float((rt.logits_u8(ds.test_images).numpy().argmax(1) == labels).mean())
                           for name, rt in open_runtimes(run).items()}
        row["test_images"] = int(len(labels))
        (run / RESULTS).write_text(json.dumps(row, indent=1, default=lambda x: float(np.asarray(x))))


def median_seconds(fn, x, repeats: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timing(folder: Path, models: list[str]) -> None:
    """Latency (batch 1) and throughput (batch 256) of each runtime, on seed 0 of each model."""
    import torch

    for run in runs_of(folder, models):
        if not run.name.endswith("-s0") or not (run / RESULTS).is_file():
            continue
        row = json.loads((run / RESULTS).read_text())
        row["latency_ms"], row["images_per_second"] = {}, {}
        for name, rt in open_runtimes(run).items():
            g = torch.Generator().manual_seed(0)
            one, batch = torch.randn(1, 1, 28, 28, generator=g), torch.randn(256, 1, 28, 28, generator=g)
            row["latency_ms"][name] = 1e3 * median_seconds(rt.logits, one, repeats=300)
            row["images_per_second"][name] = 256 / median_seconds(rt.logits, batch, repeats=20, warmup=3)
        row["timing_machine"] = machine_line()
        print(f"timing {run.name}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in row["latency_ms"].items()), flush=True)
        (run / RESULTS).write_text(json.dumps(row, indent=1))


def cpu_features() -> str:
    """The CPU's int8 and bf16 matrix features, from /proc/cpuinfo's flags."""
    flags = cpu().flags
    if not flags:
        return "flags unknown"
    names = ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    have = [n for n in names if n in flags]
    return "has " + ", ".join(have) if have else "has no VNNI, AVX512_BF16 or AMX"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.2f} ± {sd:.2f}"


def table(folder: Path, models: list[str]) -> None:
    rows = [json.loads((r / RESULTS).read_text()) for r in runs_of(folder, models) if (r / RESULTS).is_file()]
    if not rows:
        print("nothing measured yet")
        return
    print(f"{rows[0]['test_images']:,} test images; changes in accuracy points against torch fp32 of the same run, "
          "mean ± std over the seeds\n")
    print("| model | seeds | torch fp32 | int8 change | bf16 change | onnxruntime fp32 change | int8 agreement "
          "(check) | fp32 / int8 file |")
    print("|---|---|---|---|---|---|---|---|")
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        if not mine:
            continue
        base = [100 * r["accuracy"]["torch-fp32"] for r in mine]

        def change(name: str, mine: list[dict] = mine) -> str:
            return _mean_std([100 * r["accuracy"][name] - 100 * r["accuracy"]["torch-fp32"] for r in mine
                              if name in r["accuracy"]])

        refused = [r["refused"] for r in mine if "refused" in r]
        agree = [100 * r["check"]["agreement"] for r in mine if "check" in r]
        sizes = mine[0]["bytes"]
        size = f"{sizes['fp32'] / 1e3:,.0f} / " + (f"{sizes['int8'] / 1e3:,.0f} KB" if "int8" in sizes else "-")
        int8 = change("onnxruntime-int8") + (f" ({len(refused)} refused)" if refused else "")
        agreement = f"{min(agree):.1f}% (lowest)" if agree else "-"
        print(f"| {model} | {len(mine)} | {statistics.mean(base):.2f}% | {int8} | {change('torch-bf16')} | "
              f"{change('onnxruntime-fp32')} | {agreement} | {size} |")
    for r in rows:
        if "refused" in r:
            print(f"\n{r['run']}: {r['refused']}")
    timed = [r for r in rows if "latency_ms" in r]
    if timed:
        names = [f"{rt}-{p}" for rt, p in RUNTIMES]
        print("\nlatency: median ms of one call on 1 image; throughput: images/s in calls of 256 (seed 0 of each)\n")
        print("| model | " + " | ".join(f"{n} ms" for n in names) + " | " + " | ".join(f"{n} img/s" for n in names)
              + " |")
        print("|---|" + "---|" * 2 * len(names))
        for r in timed:
            lat = [f"{r['latency_ms'][n]:.3f}" if n in r["latency_ms"] else "-" for n in names]
            thr = [f"{r['images_per_second'][n]:,.0f}" if n in r["images_per_second"] else "-" for n in names]
            print(f"| {r['model']} | " + " | ".join(lat) + " | " + " | ".join(thr) + " |")
        print(f"\n{timed[0]['timing_machine']}; {cpu_features()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path, help="where the runs are (and missing ones are trained)")
    p.add_argument("--part", default="train,accuracy,timing,table", help="comma-separated: train, accuracy, "
                   "timing, table (default: all)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=1)
    a = p.parse_args()
    parts = set(a.part.split(","))
    a.folder.mkdir(parents=True, exist_ok=True)
    if "train" in parts:
        train(a.folder, a.models, a.seeds, a.dataset, a.epochs)
    if "accuracy" in parts:
        accuracy(a.folder, a.models)
    if "timing" in parts:
        timing(a.folder, a.models)
    if "table" in parts:
        table(a.folder, a.models)


if __name__ == "__main__":
    main()
