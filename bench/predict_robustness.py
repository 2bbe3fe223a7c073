"""How `mnistlab predict` holds up on pictures as people make them, and how honest its "unsure" is.

    python bench/predict_robustness.py            # digits and Fashion-MNIST models, seeds 0 1 2 (~3 min on 2 cores)

For each seed it trains `mnistlab train --dataset digits` and `--dataset fashion-mnist --recipe fast`
(each in its own run folder), then measures on the test split (reported, never used to choose):
1. accuracy on the 28x28 test images, and on the same images re-rendered as a person's picture
   (280x280, dark ink on white, the item's box at a random 40-90% of the canvas, at a random place;
   every other picture JPEG at quality 90, the rest PNG), through the full predict path;
2. with the threshold fitted on validation (95% of correct validation images accepted), the fraction
   accepted ("ok") of in-distribution pictures, of the other dataset's items shown to the model, and
   of random scribbles;
3. the expected calibration error on the test split before and after temperature scaling.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import machine_line
from PIL import Image, ImageDraw

from mnistlab.deploy.preprocess import render_as_picture

N = 1000  # test images re-rendered per model


def scribble(rng: np.random.Generator) -> Image.Image:
    """A random pen scribble: 2-6 strokes of random points, dark on white."""
    canvas = Image.new("L", (280, 280), 255)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 7))):
        pts = [tuple(int(v) for v in rng.integers(20, 260, 2)) for _ in range(int(rng.integers(2, 6)))]
        draw.line(pts, fill=0, width=int(rng.integers(12, 28)), joint="curve")
    return canvas


def save_all(pictures: list[Image.Image], folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pic in enumerate(pictures):
        path = folder / (f"{i}.jpg" if i % 2 else f"{i}.png")
        pic.save(path, quality=90) if i % 2 else pic.save(path)
        paths.append(str(path))
    return paths


def train(args: list[str], run: Path) -> None:
    subprocess.run([sys.executable, "-m", "mnistlab", "train", *args, "--run-dir", str(run)], check=True,
                   capture_output=True)


def measure(run: Path, other: str, tmp: Path, seed: int) -> dict[str, float]:
    from mnistlab.calibration import expected_calibration_error
    from mnistlab.data.dataset import load_dataset
    from mnistlab.deploy.predict import Predictor

    p = Predictor(run)
    ds = load_dataset(p.dataset)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(ds.test_labels))[:N]
    images, labels = ds.test_images[idx], ds.test_labels[idx]
    logits = p.logits(images)
    acc_28 = (logits.argmax(1) == labels).double().mean().item()
    results, _ = p.predict_files(save_all([render_as_picture(im.numpy(), rng) for im in images], tmp / "in"))
    acc_pic = float(np.mean([r.index == int(y) for r, y in zip(results, labels.tolist(), strict=True)]))
    accepted_in = float(np.mean([r.status == "ok" for r in results]))
    ods = load_dataset(other)
    oidx = rng.permutation(len(ods.test_labels))[:N]
    ood, _ = p.predict_files(save_all([render_as_picture(ods.test_images[i].numpy(), rng) for i in oidx], tmp / "ood"))
    scr, _ = p.predict_files(save_all([scribble(rng) for _ in range(N)], tmp / "scribble"))
    all_logits = p.logits(ds.test_images)
    return dict(acc_28=acc_28, acc_pic=acc_pic, accepted_in=accepted_in,
                accepted_ood=float(np.mean([r.status == "ok" for r in ood])),
                accepted_scribble=float(np.mean([r.status == "ok" for r in scr])),
                ece_before=expected_calibration_error(all_logits.softmax(1), ds.test_labels),
                ece_after=expected_calibration_error((all_logits / p.temperature).softmax(1), ds.test_labels),
                temperature=p.temperature)


def main() -> None:
    torch.set_num_threads(2)
    print(machine_line(), flush=True)
    setups = [("digits", ["--dataset", "digits"], "fashion-mnist"),
              ("fashion-mnist", ["--dataset", "fashion-mnist", "--recipe", "fast"], "digits")]
    rows: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args, other in setups:
            for seed in (0, 1, 2):
                run = Path(tmp) / f"{name}-{seed}"
                train([*args, "--seed", str(seed)], run)
                m = measure(run, other, Path(tmp) / f"pics-{name}-{seed}", seed)
                rows.setdefault(name, []).append(m)
                print(f"  {name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()), file=sys.stderr,
                      flush=True)

    def ms(values: list[float], pct: bool = True) -> str:
        f = 100 if pct else 1
        return f"{statistics.mean(values) * f:.2f} +- {statistics.stdev(values) * f:.2f}"

    print("\n| model | test 28x28 | re-rendered pictures | drop (points) | accepted: in-dist | other dataset | "
          "scribbles | ECE before | ECE after | T |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, ms_rows in rows.items():
        col = {k: [r[k] for r in ms_rows] for k in ms_rows[0]}
        drop = [a - b for a, b in zip(col["acc_28"], col["acc_pic"], strict=True)]
        print(f"| {name} | {ms(col['acc_28'])}% | {ms(col['acc_pic'])}% | {ms(drop)} | {ms(col['accepted_in'])}% "
              f"| {ms(col['accepted_ood'])}% | {ms(col['accepted_scribble'])}% | {ms(col['ece_before'])}% "
              f"| {ms(col['ece_after'])}% | {ms(col['temperature'], pct=False)} |")


if __name__ == "__main__":
    main()
