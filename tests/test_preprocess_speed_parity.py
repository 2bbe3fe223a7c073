"""The picture -> 28x28 view path gives the views it gave before it was made faster.

tests/data/preprocess_views.npz holds the views of the generated pictures below (every convention), the
`inverted` and `blank` flags, recorded with the preprocessing as it was before its speed-up (commit
"preprocess: record the views ..."); the code now must give every view within MAX_GREY_LEVELS of those.
To record it again after a deliberate change of the recipe: `python tests/test_preprocess_speed_parity.py`.
"""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mnistlab.deploy.preprocess import ink_from_grey, prepare_picture, view_of
from mnistlab.deploy.serve.inference import decode

DATA = Path(__file__).parent / "data" / "preprocess_views.npz"
DATASETS = ("mnist", "fashion-mnist", "digits")
MAX_GREY_LEVELS = 2  # of 255: the float32 arithmetic may round a pixel differently, never more


def _scribble(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, fill: int, width: int) -> None:
    """A few strokes and a blob somewhere in the middle of a w x h canvas."""
    x0, y0 = rng.uniform(0.15, 0.35) * w, rng.uniform(0.15, 0.35) * h
    x1, y1 = rng.uniform(0.6, 0.85) * w, rng.uniform(0.6, 0.85) * h
    points = [(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))) for _ in range(5)]
    draw.line(points, fill=fill, width=width, joint="curve")
    cx, cy, r = float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1)), float(rng.uniform(0.03, 0.08) * w)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)


def _paper(h: int, w: int, rng: np.random.Generator, dark: bool = False) -> np.ndarray:
    """Uneven paper (H, W) in [0, 1]: a light gradient, vignetting and a little noise (or a dark screen)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    level = 0.85 + 0.08 * (xx - 0.5) - 0.06 * (yy - 0.5) - 0.25 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    level = level + rng.normal(0, 0.01, (h, w))
    return np.clip(0.2 - 0.5 * (level - 0.85) if dark else level, 0, 1)


def _bytes(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@cache
def pictures() -> list[tuple[str, bytes | np.ndarray]]:
    """(name, PNG/JPEG bytes or a float (H, W) picture): drawings as the page sends them, photos of paper."""
    rng = np.random.default_rng(24)
    out: list[tuple[str, bytes | np.ndarray]] = []
    for i in range(6):  # 280x280 drawings, dark on white (the page's canvas), in grey and in RGB
        im = Image.new("L" if i % 2 else "RGB", (280, 280), "white")
        _scribble(ImageDraw.Draw(im), rng, 280, 280, fill=0, width=int(rng.integers(8, 24)))
        out.append((f"drawing{i}.png", _bytes(im, "PNG")))
    for i in range(3):  # a transparent canvas: the ink in the alpha channel
        im = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
        _scribble(ImageDraw.Draw(im), rng, 280, 280, fill=(30, 30, 200, 255), width=14)
        out.append((f"alpha{i}.png", _bytes(im, "PNG")))
    for i, (h, w) in enumerate([(1200, 1600), (480, 640), (900, 600), (300, 300)]):  # photos of uneven paper
        paper = _paper(h, w, rng, dark=i == 3)
        ink = Image.new("L", (w, h), 0)
        _scribble(ImageDraw.Draw(ink), rng, w, h, fill=255, width=max(3, w // 40))
        ink_level = 0.9 if i == 3 else -0.6
        grey = np.clip(paper + ink_level * np.asarray(ink, dtype=np.float64) / 255 * paper, 0, 1)
        im = Image.fromarray(np.rint(grey * 255).astype(np.uint8))
        out.append((f"photo{i}.jpg", _bytes(im.convert("RGB"), "JPEG")))
        out.append((f"photo{i}.png", _bytes(im, "PNG")))
    # a stroke through the border, a large item reaching the band, a small picture, a blank sheet
    grey = _paper(400, 400, rng)
    grey[190:200, :] *= 0.3
    grey[100:300, 150:250] *= 0.4
    out.append(("stroke_through_border", grey.astype(np.float32)))
    grey = _paper(500, 500, rng)
    grey[20:480, 40:460] *= 0.35
    out.append(("large_item", grey.astype(np.float32)))
    small = Image.new("L", (24, 24), 255)
    ImageDraw.Draw(small).line([(5, 5), (18, 18)], fill=0, width=3)
    out.append(("small.png", _bytes(small, "PNG")))
    out.append(("blank", _paper(300, 400, rng).astype(np.float32)))
    return out


def views(picture: bytes | np.ndarray) -> tuple[np.ndarray, bool, np.ndarray]:
    """(views (3, 28, 28) uint8 by DATASETS, inverted, blank (3,)) the way the server (bytes) or
    prepare_picture (an array) makes them."""
    ink, inverted = decode(picture) if isinstance(picture, bytes) else ink_from_grey(picture)
    prepared = [view_of(ink, inverted, d) for d in DATASETS]
    return np.stack([p.image for p in prepared]), inverted, np.array([p.blank for p in prepared])


def record() -> None:
    names, images, inverted, blank = [], [], [], []
    for name, picture in pictures():
        v, inv, b = views(picture)
        names.append(name)
        images.append(v)
        inverted.append(inv)
        blank.append(b)
    DATA.parent.mkdir(exist_ok=True)
    np.savez_compressed(DATA, names=np.array(names), views=np.stack(images), inverted=np.array(inverted),
                        blank=np.stack(blank))


@pytest.fixture(scope="module")
def recorded() -> dict[str, np.ndarray]:
    with np.load(DATA, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_the_recorded_set_is_the_generated_set(recorded):
    assert [str(n) for n in recorded["names"]] == [name for name, _ in pictures()]
    # the set exercises both polarities, blank and non-blank views, so agreement below means something
    assert recorded["inverted"].any() and not recorded["inverted"].all()
    assert recorded["blank"].any() and not recorded["blank"].all()


@pytest.mark.parametrize("index", range(len(pictures())), ids=[name for name, _ in pictures()])
def test_views_match_those_recorded_before_the_speed_up(recorded, index):
    name, picture = pictures()[index]
    v, inverted, blank = views(picture)
    assert inverted == bool(recorded["inverted"][index]), name
    assert (blank == recorded["blank"][index]).all(), name
    diff = np.abs(v.astype(int) - recorded["views"][index].astype(int))
    worst = np.argwhere(diff == diff.max())[0]
    assert diff.max() <= MAX_GREY_LEVELS, f"{name}: {diff.max()} grey levels apart at {worst}"


def test_prepare_picture_of_an_array_gives_the_recorded_view(recorded):
    index = [str(n) for n in recorded["names"]].index("large_item")
    grey = dict(pictures())["large_item"]
    view = prepare_picture(grey, "fashion-mnist").image
    assert np.abs(view.astype(int) - recorded["views"][index][1].astype(int)).max() <= MAX_GREY_LEVELS


if __name__ == "__main__":
    record()
    print(f"wrote {DATA} ({DATA.stat().st_size:,} bytes)")
