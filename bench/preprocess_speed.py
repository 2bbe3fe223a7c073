"""How long a picture takes to become the model's 28x28 view, stage by stage (ms per picture, one thread).

    python bench/preprocess_speed.py [--repeats 200]

Two pictures: a 280x280 PNG drawing as `mnistlab serve`'s page and bench/serve_load.py send it (a Fashion-MNIST
test image, dark on white, resized bilinearly; a synthetic item where the dataset is not on this machine), and
a 1600x1200 JPEG photo of a drawing on unevenly lit paper. The stages are those of
mnistlab.deploy.serve.inference.decode and preprocess.view_of:

- decode: Pillow reads the bytes to grey levels (a JPEG in draft mode, as decode() does), float32 in [0, 1];
- background: preprocess._background, the paper's fitted surface (a photo's; a drawing program's canvas is read
  against its exact paper and fits none: "-" there);
- ink: the rest of ink_from_grey (the residual, its polarity, the ink as a share of the room; a canvas: all of it);
- view: to_model_input, the ink box, its area resize and the paste into 28x28 (Fashion-MNIST's recipe);
- after decoding: ink_from_grey + to_model_input, all the preparation that is this project's code;
- end to end: decode() + view_of(), what a served request costs before the model.

Each figure is the median of --repeats timed calls, after a warm-up call.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def drawing_png() -> bytes:
    """The picture bench/serve_load.py posts: the first Fashion-MNIST test image, dark on white, 280x280."""
    try:
        from mnistlab.data.dataset import load_dataset

        image = load_dataset("fashion-mnist").test_images[0].numpy().astype(np.uint8)
    except Exception:  # not on this machine: a filled shape with grey levels in its place
        image = np.zeros((28, 28), dtype=np.uint8)
        image[4:26, 8:20] = np.linspace(120, 255, 12, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(255 - image).resize((280, 280), Image.Resampling.BILINEAR).save(buf, "PNG")
    return buf.getvalue()


def photo_jpeg(w: int = 1600, h: int = 1200) -> bytes:
    """A drawing photographed on paper lit unevenly (a gradient, vignetting, sensor noise), as a JPEG."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    paper = 0.85 + 0.08 * (xx - 0.5) - 0.25 * ((xx - 0.5) ** 2 + (yy - 0.4) ** 2) + rng.normal(0, 0.01, (h, w))
    ink = Image.new("L", (w, h), 0)
    ImageDraw.Draw(ink).line([(500, 300), (1100, 350), (700, 900), (1000, 950)], fill=255, width=40, joint="curve")
    grey = np.clip(paper * (1 - 0.6 * np.asarray(ink, dtype=np.float64) / 255), 0, 1)
    buf = io.BytesIO()
    Image.fromarray(np.rint(grey * 255).astype(np.uint8)).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def ms(fn, repeats: int) -> float:
    """The median milliseconds of one call of fn()."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def grey_of(data: bytes) -> np.ndarray:
    """decode()'s reading of the bytes, without the ink: grey levels (H, W) float32 in [0, 1]."""
    from mnistlab.deploy.serve.inference import DRAFT_SIDE

    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft("L", (DRAFT_SIDE, DRAFT_SIDE))
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def stages(name: str, data: bytes, repeats: int) -> None:
    from mnistlab.deploy import preprocess
    from mnistlab.deploy.serve.inference import decode

    grey = grey_of(data)
    ink, inverted = preprocess.ink_from_grey(grey)
    fitted = preprocess._canvas_paper(grey) is None  # a canvas fits no surface: nothing to take away
    background = ms(lambda: preprocess._background(grey), repeats) if fitted else None
    rows = {
        "decode": ms(lambda: grey_of(data), repeats),
        "background": background,
        "ink (ink_from_grey less the background)": ms(lambda: preprocess.ink_from_grey(grey), repeats)
        - (background or 0.0),
        "view (to_model_input, fashion)": ms(lambda: preprocess.to_model_input(ink, "fashion"), repeats),
        "after decoding: ink_from_grey + to_model_input": ms(
            lambda: preprocess.to_model_input(preprocess.ink_from_grey(grey)[0], "fashion"), repeats),
        "end to end: decode() + view_of()": ms(lambda: preprocess.view_of(*decode(data), "fashion-mnist"), repeats),
    }
    del inverted
    for stage, t in rows.items():
        shown = "-" if t is None else f"{t:.2f}"
        print(f"| {name} ({grey.shape[1]}x{grey.shape[0]} decoded) | {stage} | {shown} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from common import machine_line

    from mnistlab.deploy.serve.server import one_thread_each

    one_thread_each()  # as the server does
    print(machine_line())
    print("| picture | stage | ms |")
    print("|---|---|---:|")
    stages("280x280 PNG drawing", drawing_png(), args.repeats)
    stages("1600x1200 JPEG photo", photo_jpeg(), max(20, args.repeats // 4))


if __name__ == "__main__":
    main()
