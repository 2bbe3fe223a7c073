"""A person's picture -> the 28x28 image a model of this dataset family expects.

Each dataset was made by a documented recipe, and a model only knows images made that way:

- MNIST (LeCun, Cortes, Burges): the digit's bounding box is scaled so its longer side is 20 px,
  with an area-averaging resample (anti-aliasing: it is what gives MNIST its grey levels), then
  placed in a 28x28 field so that the ink's centre of mass sits at the field's centre. Light ink
  on black. KMNIST's authors describe their preprocessing only as "a format similar to MNIST"
  (Clanuwat et al. 2018); we apply MNIST's recipe to it, an assumption not yet checked against
  KMNIST's own images (they are not on this project's offline machines).
- digits (scikit-learn's 8x8, made MNIST-like by data/digits.py): the whole 8x8 image is upsampled
  into a 20x20 box at the centre, so every digit's box is 20 px tall and centred by the box, not by
  its mass (measured on the validation split: box height 20 +- 0, box centre 13.5).
- Fashion-MNIST (Xiao, Rasul, Vollgraf 2017, section 2): the product is trimmed to its edges, its
  longer side resized to 28 px, the shorter side extended to 28 and the item centred, intensities
  negated (a dark item on white becomes light on black). No 20 px box and no centre of mass.

Whichever way round the picture is (dark ink on paper, light ink on a dark screen, ink in the
alpha channel of a transparent canvas), the ink is found first. A photo's paper is rarely one grey:
light falls across it in a gradient and the lens darkens the corners (vignetting), so the background
is estimated as a smooth surface, a quadratic fitted to the picture's outer band (background in any
sensible photo or drawing, with the strokes that reach it rejected as outliers), and subtracted. A
drawing program's canvas needs none of that: its paper is one exact grey (the corners and most of the
outer band have it, which a camera's noise and lens rarely leave a photo's paper), and it is taken as it
is. A document scanner's whitened page or a screenshot is such a canvas too, and is read as one. The
ink is then whichever way the picture departs furthest from its background: darker or lighter.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

FORMATS = ("PNG", "JPEG", "BMP")
MAX_PIXELS = 25_000_000  # a larger image is refused before decoding (a decompression bomb)
BLANK_INK = 0.08  # a picture whose ink never rises this far (of full scale) above the background is blank
MIN_INK_PIXELS = 4
# The ink's box: pixels above this fraction of the way from background to the peak. Chosen on the digits
# validation split by re-preparing its own 28x28 images: 0.1 keeps their accuracy (99.3%), 0.5 lost 5.6
# points (the anti-aliased fringe belongs to the box the datasets were scaled by).
BOX_LEVEL = 0.1
# The background surface: fitted on a copy at most this many pixels on a side (a smooth surface needs no
# more), to the outer band of this fraction of each side; smaller pictures get one level (their border's).
BACKGROUND_GRID = 64
BACKGROUND_BAND = 0.12
MIN_SURFACE_SIDE = 32
MIN_ROOM = 0.2  # the least contrast (paper to black, or to white) ink is measured against
FLAT = 1e-6  # a surface that departs less than this from its level is flat (a grey level is 1/255)
ROUNDING = 1e-6  # how far the float32 surface may lie from its exact values (a few units in the last place)


class UnreadableImage(ValueError):
    """The file is not an image we decode (PNG, JPEG, BMP), or is damaged."""


@dataclass
class Prepared:
    """The model's view of one picture: (28, 28) uint8, light ink on black; blank if nothing was drawn."""

    image: np.ndarray
    blank: bool
    inverted: bool  # the picture was dark ink on a light background


def load_ink(path: str | Path) -> tuple[np.ndarray, bool]:
    """(ink, inverted): ink as float32 (H, W) in [0, 1], 1 where ink is; inverted if it was dark on light."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path, formats=FORMATS) as im:
            if im.width * im.height > MAX_PIXELS:
                raise UnreadableImage(f"{path}: {im.width}x{im.height} is too large (at most {MAX_PIXELS:,} pixels)")
            im.load()
            return ink_from_image(im)
    except Image.DecompressionBombError:
        raise UnreadableImage(f"{path}: too large (at most {MAX_PIXELS:,} pixels; refused before decoding)") from None
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise UnreadableImage(f"{path}: not a readable PNG, JPEG or BMP image ({e})") from None


def ink_from_image(im: Image.Image) -> tuple[np.ndarray, bool]:
    """(ink, inverted) of a decoded picture: the alpha channel of a transparent canvas, else its grey levels."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        alpha = np.asarray(im.convert("RGBA"), dtype=np.float32)[..., 3] / 255.0  # (H, W)
        if alpha.max() - alpha.min() > BLANK_INK:
            # a transparent canvas: the ink is where the alpha is, whatever its colour
            return alpha, False
    # an opaque picture, or one evenly transparent: its luminance (Pillow's "L"), as an eye sees the colours
    # (an "L" picture is read as it is, not copied by convert first); scaled to [0, 1] in its own array
    grey = np.array(im if im.mode == "L" else im.convert("L"), dtype=np.float32)  # (H, W)
    return ink_from_grey(np.divide(grey, 255.0, out=grey))


def ink_from_grey(grey: np.ndarray) -> tuple[np.ndarray, bool]:
    """(ink, inverted) of a grey picture (H, W) in [0, 1]: the ink is the side (darker or lighter) that departs
    furthest from the background surface, as a share of the way from the paper to black (or white). A digital
    canvas's paper is one exact grey and is taken as it is (_canvas_paper); a photo's is fitted."""
    grey = np.asarray(grey, dtype=np.float32)
    paper = _canvas_paper(grey)
    if paper is not None:  # no surface to fit: the paper is flat, and the level is known exactly
        level = float(paper)
        inverted = _canvas_polarity(level)
        if inverted is None:
            inverted = _polarity(grey, level, None, (level, level))
        return _flat_ink(grey, level, inverted), inverted
    fit = _fit_background(grey)
    # the surface lies within level +- reach at every pixel (|x|, |y| <= 1): bounds known without making it
    level, reach = (_border_level(grey), 0.0) if fit is None else (float(fit[0][0]), _reach(fit[0]))
    lowest, highest = level - reach, level + reach
    flat = reach <= FLAT
    # a flat paper (a small picture's border level, or a surface fitted without slope) is one number: no (H, W)
    # surface to make, and the arithmetic below broadcasts it
    background = level if flat else np.matmul(*_surface_factors(fit[0], *grey.shape))  # float or (H, W)
    inverted = _polarity(grey, background, fit, (lowest, highest))
    # how far each pixel goes from the paper towards full ink, as a share of the room there is: where less
    # light falls the strokes are darker by less (the paper's reflectance times the light), and a stroke
    # must read the same across the sheet (floored: a near-black paper's noise is not ink). In place: at a
    # photo's size each full-resolution copy costs more than the arithmetic.
    if flat:
        return _flat_ink(grey, background, inverted), inverted
    if inverted and lowest > MIN_ROOM + ROUNDING:
        # the floor cannot bind, so the room is the surface itself and (S - grey) / S = 1 - grey / S: made in
        # the surface's own array, two passes and no new (H, W) array
        ink = np.subtract(1.0, np.divide(grey, background, out=background), out=background)
    else:
        ink = np.subtract(background, grey) if inverted else np.subtract(grey, background)  # (H, W)
        room = background if inverted else np.subtract(1.0, background, out=background)
        np.divide(ink, np.maximum(room, MIN_ROOM, out=room), out=ink)
    return np.clip(ink, 0.0, 1.0, out=ink), inverted


def _flat_ink(grey: np.ndarray, level: float, inverted: bool) -> np.ndarray:
    """The ink (same shape as grey, in [0, 1] as grey is) on a flat paper of one grey level: how far each pixel goes
    from the paper towards black (inverted) or white, as a share of the room there is, clipped to [0, 1] (no
    clip where none can bind: dark ink on white paper, light on black). level is a Python float, so the arithmetic
    stays in float32."""
    room = max(level if inverted else 1.0 - level, MIN_ROOM)
    ink = np.subtract(level, grey) if inverted else np.subtract(grey, level)
    if room != 1.0:
        ink /= room
    if level != (1.0 if inverted else 0.0):  # dark ink on white paper (light on black) stays within [0, 1]
        np.clip(ink, 0.0, 1.0, out=ink)
    return ink


def _canvas_paper(a: np.ndarray) -> np.generic | None:
    """The paper's grey (an element of a) if the picture is a digital canvas, else None. A digital canvas's paper
    is one exact grey: its four corner pixels have it, and so do at least half of the outer band the surface would
    be fitted on (BACKGROUND_BAND of each side; an item may cross the band and touch the edges). A photographed
    paper seldom is: noise and the light vary it by a few levels at least, and where it is overexposed to one
    white the lens usually still darkens the corners (a cropped photo may not: then its band is mostly one white,
    and the fit, whose robust start takes that majority, would have found the same paper within 0.02). A canvas's
    paper needs no surface: the fit would only be tilted by the strokes' soft edges in the band (by up to 0.02 of
    full scale), or, where a large item covers much of the band, take the item for the paper."""
    h, w = a.shape
    v = a[0, 0]
    if not (a[0, -1] == v and a[-1, 0] == v and a[-1, -1] == v):
        return None
    band = max(2, round(BACKGROUND_BAND * min(h, w)))
    if 2 * band >= min(h, w):  # a small picture: all of it is band
        return v if 2 * np.count_nonzero(a == v) >= a.size else None
    # the band as four slabs (rows above and below, then columns left and right between them): no mask
    slabs = (a[:band], a[h - band :], a[band : h - band, :band], a[band : h - band, w - band :])
    same = sum(np.count_nonzero(slab == v) for slab in slabs)
    return v if 2 * same >= sum(slab.size for slab in slabs) else None


def _canvas_polarity(level: float) -> bool | None:
    """Whether the ink on a flat paper of this level is darker: on white paper it can only be darker, on black only
    lighter (_polarity would find the same); None for a paper in between, where _polarity must look."""
    return True if level >= 1.0 else False if level <= 0.0 else None


def _reach(coef: np.ndarray) -> float:
    """How far the quadratic a + bx + cy + dx^2 + exy + fy^2 may depart from a on the picture: |x|, |y| <= 1, so
    by at most |b| + |c| + |d| + |e| + |f|."""
    return float(np.abs(coef[1:]).sum())


def _polarity(grey: np.ndarray, background: np.ndarray | float, fit: tuple[np.ndarray, np.ndarray] | None,
              span: tuple[float, float]) -> bool:
    """Whether the ink is darker than the paper: the side whose area means of grey - background (on the
    background's grid: a lone speck is not ink) depart furthest from it; when neither stands out, the border's
    level decides. span: bounds (least, greatest) on the background's values."""
    darker = lighter = None
    if fit is not None:
        # The area means are linear: those of the residual are the grid's grey (already made for the fit) less
        # the surface's, which are the products of its factors' 1-D area means (the box filter is separable),
        # so no full-size image is resampled. Exact but for the clip of the residual to [-1, 1], which moves a
        # mean by at most as far as the surface leaves [0, 1]: decided from these unless a comparison below
        # lies within twice that of its threshold.
        small_grey = fit[1]
        gh, gw = small_grey.shape
        h, w = grey.shape
        # a flat surface's area means are its level; a sloping one's are [1, y, y^2]'s area means . Q . [1, x, x^2]'s
        small_surface = (background if isinstance(background, float)
                         else _powers(h, gh) @ _coefficients(fit[0]) @ _powers(w, gw).T)  # (gh, gw)
        small = small_grey - small_surface
        darker, lighter = -float(small.min()), float(small.max())
        slack = 2 * max(span[1] - 1.0, -span[0], 0.0) + 1e-5
        gap = abs(darker - lighter)
        if abs(gap - BLANK_INK / 2) <= slack or gap <= slack:
            darker = lighter = None
    if darker is None:  # the exact way: the clipped residual's area means
        small = _area_mean(np.clip(grey - background, -1.0, 1.0), *_grid_shape(grey.shape))
        darker, lighter = -float(small.min()), float(small.max())
    if abs(darker - lighter) < BLANK_INK / 2:  # nothing stands out either way: the border's level decides
        return _border_level(grey) > 0.5
    return darker > lighter


def _median(a: np.ndarray) -> float:
    """np.median of a 1-D array, by one partition (np.median's checks cost more than the work at this size)."""
    n = a.size
    k = n // 2
    if n % 2:
        return float(np.partition(a, k)[k])
    part = np.partition(a, (k - 1, k))
    return float((part[k - 1] + part[k]) / 2)


def _grid_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """(height, width) scaled so the longer side is at most BACKGROUND_GRID."""
    h, w = shape
    scale = min(1.0, BACKGROUND_GRID / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


@cache
def _design(gh: int, gw: int) -> np.ndarray:
    """The quadratic's six terms (1, x, y, x^2, xy, y^2) at every pixel centre of a gh x gw grid, (gh * gw, 6)
    float64, row-major; x and y in [-1, 1], so the grid's and the full picture's surfaces agree. Read-only."""
    y, x = [((np.arange(n) + 0.5) / n * 2 - 1) for n in (gh, gw)]
    y, x = np.repeat(y, gw), np.tile(x, gh)
    design = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
    design.flags.writeable = False
    return design


# The quadratic's terms as powers (of x, of y), in _design's order, and the 15 distinct products of two terms:
# the monomials x^i y^j of degree at most 4
TERMS = ((0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2))
MOMENTS = tuple((i, j) for i in range(5) for j in range(5 - i))


@cache
def _band(gh: int, gw: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A gh x gw grid's outer band: its flat indices (n,) row-major, the quadratic's terms there transposed (6, n)
    (contiguous rows: a weighted sum over pixels is one fast product), the 15 monomials of degree <= 4 there
    (15, n), likewise, and where each entry of the 6x6 normal matrix is among those 15 (6, 6): the normal matrix
    of any subset of pixels is (the subset's sums of the 15 monomials)[pairs]. Read-only."""
    band = max(2, round(BACKGROUND_BAND * min(gh, gw)))
    in_band = np.ones((gh, gw), dtype=bool)
    in_band[band:-band, band:-band] = False
    index = np.flatnonzero(in_band)
    design_t = np.ascontiguousarray(_design(gh, gw)[index].T)  # (6, n)
    x, y = design_t[1], design_t[2]
    moments_t = np.stack([x**i * y**j for i, j in MOMENTS])  # (15, n), each monomial's row contiguous
    pairs = np.array([[MOMENTS.index((p[0] + q[0], p[1] + q[1])) for q in TERMS] for p in TERMS])  # (6, 6)
    for a in (index, design_t, moments_t, pairs):
        a.flags.writeable = False
    return index, design_t, moments_t, pairs


def _fit_background(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(the six coefficients of a quadratic surface a + bx + cy + dx^2 + exy + fy^2, the picture's area means
    on the grid it was fitted on (gh, gw)): fitted to the grid's outer band by least squares, refitted on the
    pixels within 3 robust sigmas of the last fit (strokes that reach the band are outliers); None for a
    picture too small for a surface."""
    h, w = grey.shape
    if min(h, w) < MIN_SURFACE_SIDE:
        return None
    gh, gw = _grid_shape(grey.shape)
    small = _area_mean(grey, gh, gw)  # (gh, gw)
    index, design_t, moments_t, pairs = _band(gh, gw)  # (n,), (6, n), (15, n), (6, 6)
    values = small.ravel()[index].astype(np.float64)  # (n,)
    # start from the band's median, not from a least-squares fit that a large item reaching the band would
    # drag towards itself: the paper is the band's majority, the item's pixels lie far from it
    deviation = np.abs(values - _median(values))
    keep = deviation <= max(3 * 1.4826 * _median(deviation), 0.02)
    coef = np.zeros(6)
    for _ in range(5):
        # six unknowns: the normal equations (6x6) of the kept pixels are exact enough here and a fraction
        # of lstsq's cost
        weight = keep.astype(np.float64)  # (n,) 1 where kept
        coef = np.linalg.solve((moments_t @ weight)[pairs], design_t @ (weight * values))
        off = np.abs(values - coef @ design_t)  # (n,) each pixel's distance from the surface, made once
        spread = 1.4826 * _median(off[keep])  # MAD: the noise's sigma, unmoved by ink
        inliers = off <= max(3 * spread, 0.02)
        if np.count_nonzero(inliers) < 2 * len(TERMS):
            break  # too few left to fit six numbers: keep the last surface
        if (inliers == keep).all():
            break  # converged: the next fit would be this one again
        keep = inliers
    return coef, small


def _surface_factors(coef: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The quadratic at every pixel centre as a rank-3 product rows @ cols, (H, 3) and (3, W) float32:
    a + bx + cy + dx^2 + exy + fy^2 = [1, y, y^2] . Q . [1, x, x^2] (one pass over the image to make it, not
    six). rows is cached (read-only); only cols = Q @ [1, x, x^2] (3, W) is made per picture."""
    return _powers(h, h), (_coefficients(coef) @ _powers(w, w).T).astype(np.float32)


def _coefficients(coef: np.ndarray) -> np.ndarray:
    """The quadratic's six coefficients as Q (3, 3) float64, Q[i, j] that of y^i x^j."""
    a, b, c, d, e, f = coef
    return np.array([[a, b, d], [c, e, 0.0], [f, 0.0, 0.0]])


@lru_cache(maxsize=256)  # pictures come in many sizes: at most 256 x (5,000 x 3) float32, about 15 MB
def _powers(n: int, m: int) -> np.ndarray:
    """(m, 3) float32: 1, t and t^2 at n pixel centres (t in [-1, 1], as _design's x and y), area-averaged onto m
    pixels when m < n (the surface's area means on a grid, without resampling a full-size surface). Read-only."""
    t = (np.arange(n, dtype=np.float64) + 0.5) / n * 2 - 1
    powers = _area_mean(np.stack([np.ones_like(t), t, t * t]).astype(np.float32), 3, m).T.copy()
    powers.flags.writeable = False
    return powers


def _background(grey: np.ndarray) -> np.ndarray:
    """The surface ink_from_grey would fit (H, W) for a picture that is not a digital canvas (_canvas_paper): the
    quadratic of _fit_background, or for a small picture its border's median."""
    fit = _fit_background(grey)
    if fit is None:
        return np.full_like(grey, _border_level(grey))
    rows, cols = _surface_factors(fit[0], *grey.shape)
    return rows @ cols


def _resize(ink: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-averaging resample (PIL's BOX filter when shrinking): each output pixel is the mean of the
    input pixels it covers, which is how MNIST's anti-aliased grey levels arise. Clipped to [0, 1] first."""
    return _area_mean(np.clip(ink, 0.0, 1.0), height, width)


def _area_mean(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """_resize of values already in range: no clipping. PIL's BOX filter as two matrix products, rows (height, H)
    @ a (H, W) @ cols (W, width), equal to Pillow's own resize to float32 rounding (tests/test_preprocess.py)."""
    a = np.asarray(a, dtype=np.float32)
    # resample the rows, then the columns as the rows of the transpose (a view: matmul reads it in place)
    return _box_rows(_box_rows(a, height).T, width).T


def _box_rows(a: np.ndarray, n_out: int) -> np.ndarray:
    """PIL's BOX resample of a's rows (N, W) -> (n_out, W) float32, a block of output rows at a time."""
    if n_out == a.shape[0]:
        return a  # BOX at the same size is the identity
    out = np.empty((n_out, a.shape[1]), dtype=np.float32)
    # each block of output rows reads only the input rows under it: (rows, span) @ (span, W), not the whole
    # (n_out, N) matrix, most of which is zeros (a box covers about N / n_out rows)
    for first, last, lo, hi, weights in _box_weights(a.shape[0], n_out):
        np.matmul(weights, a[lo:hi], out=out[first:last])
    return out


BOX_BLOCK = 8  # output rows per matrix product in _box_rows: fewer calls against fewer multiplications by zero


@lru_cache(maxsize=128)  # a few sizes recur (the grid, the page's canvas); each about BOX_BLOCK x n_in float32
def _box_weights(n_in: int, n_out: int) -> list[tuple[int, int, int, int, np.ndarray]]:
    """Pillow's BOX resample from n_in to n_out pixels (its precompute_coeffs, in the same double arithmetic) as
    blocks (first, last, lo, hi, weights (last - first, hi - lo) float32): output pixels first..last-1 are
    weights @ the input pixels lo..hi-1. Each output pixel is the mean of the input pixels whose centres lie in
    its span (when enlarging: the nearest one). Read-only."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)  # the filter widens only when shrinking
    support = 0.5 * stretch
    centre = (np.arange(n_out) + 0.5) * scale  # (n_out,) in input pixels
    lo = np.maximum((centre - support + 0.5).astype(np.int64), 0)  # C's (int) cast truncates, as astype does
    hi = np.minimum((centre + support + 0.5).astype(np.int64), n_in)
    i = np.arange(n_in)
    x = (i[None, :] - centre[:, None] + 0.5) * (1.0 / stretch)  # (n_out, n_in), the filter's argument
    weights = ((x > -0.5) & (x <= 0.5) & (i >= lo[:, None]) & (i < hi[:, None])).astype(np.float64)
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-300)  # each row sums to 1 (a mean)
    weights = weights.astype(np.float32)
    blocks = []
    for first in range(0, n_out, BOX_BLOCK):
        last = min(first + BOX_BLOCK, n_out)
        used = np.flatnonzero(weights[first:last].any(axis=0))
        lo_b, hi_b = int(used[0]), int(used[-1]) + 1
        block = np.ascontiguousarray(weights[first:last, lo_b:hi_b])
        block.flags.writeable = False
        blocks.append((first, last, lo_b, hi_b, block))
    return blocks


def _border_level(a: np.ndarray) -> float:
    """The median of the picture's outermost pixels: its background, in any sensible photo or drawing."""
    return _median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]))


def _ink_box(ink: np.ndarray) -> tuple[tuple[int, int, int, int], float] | None:
    """(bounding box (top, bottom, left, right) of pixels clearly above the background, the background
    level), or None if blank."""
    found = _find_ink(ink)
    return None if found is None else found[:2]


def _find_ink(ink: np.ndarray) -> tuple[tuple[int, int, int, int], float, float] | None:
    """_ink_box's (box, background) and the ink's peak value, or None if blank."""
    background = _border_level(ink)
    row_peaks = ink.max(axis=1)  # (H,): one pass gives the peak and which rows reach the box's level
    peak = float(row_peaks.max())
    if peak - background < BLANK_INK:
        return None
    level = background + BOX_LEVEL * (peak - background)  # below half way, so the box is never empty
    rows = np.flatnonzero(row_peaks > level)
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(ink[top:bottom].max(axis=0) > level)  # (W,) over the box's rows only
    left, right = int(cols[0]), int(cols[-1]) + 1
    # the pixels above half way are above the box's level too, so all inside the box: counted there alone,
    # and only when fewer than MIN_INK_PIXELS rows reach half way (each such row has one at least)
    half = background + 0.5 * (peak - background)
    if ((row_peaks > half).sum() < MIN_INK_PIXELS
            and (ink[top:bottom, left:right] > half).sum() < MIN_INK_PIXELS):
        return None  # a speck, not a drawing
    return (top, bottom, left, right), background, peak


def to_model_input(ink: np.ndarray, convention: str) -> tuple[np.ndarray, bool]:
    """(28x28 uint8, blank) from an ink map (H, W) in [0, 1], by a dataset's own recipe ("mnist", "digits" or
    "fashion")."""
    found = _find_ink(ink)
    if found is None:
        return np.zeros((28, 28), dtype=np.uint8), True
    (top, bottom, left, right), background, peak = found
    # the paper at 0: max(crop - background, 0) = max(crop, background) - background, and the area means are
    # linear, so the background is taken from the 28x28 means below rather than from every pixel; an ink map is
    # >= 0, so a background at 0 needs no pass at all
    crop = ink[top:bottom, left:right]  # (h, w), a view
    if background > 0:
        crop = np.maximum(crop, np.float32(background))
    h, w = crop.shape
    side = 28 if convention == "fashion" else 20
    scale = side / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    # full-scale ink, as the datasets' strokes are: the peak at 1 (scaled after the area means, which are
    # linear, so on nh x nw pixels rather than the crop's)
    # the crop's peak is the ink's, less the background (the peak lies in the box): no pass over the crop
    crop_peak = float(np.float32(peak) - np.float32(background))
    small = (_area_mean(crop, nh, nw) - np.float32(background)) / max(crop_peak, 1e-6)
    field = np.zeros((28, 28), dtype=np.float32)
    if convention == "mnist":
        # paste so that the centre of mass lands at the field's centre (13.5, 13.5), by whole pixels
        ys, xs = np.indices(small.shape)
        mass = max(float(small.sum()), 1e-6)
        cy, cx = float((ys * small).sum()) / mass, float((xs * small).sum()) / mass
        y0, x0 = round(13.5 - cy), round(13.5 - cx)
    else:  # digits and fashion: centred by the box
        y0, x0 = round(13.5 - (nh - 1) / 2), round(13.5 - (nw - 1) / 2)
    # clip the paste to the field (a lopsided centre of mass can push the box past an edge)
    sy, sx = max(0, -y0), max(0, -x0)
    ey, ex = min(nh, 28 - y0), min(nw, 28 - x0)
    field[y0 + sy : y0 + ey, x0 + sx : x0 + ex] = small[sy:ey, sx:ex]
    return np.clip(np.rint(field * 255.0), 0, 255).astype(np.uint8), False


def render_as_picture(image28: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """The reverse direction, for measuring this module: a dataset image (28, 28) uint8 drawn the way a
    person's picture looks: 280x280, dark ink on white, the item's box at a random 40-90% of the canvas,
    at a random place (bench/predict_robustness.py, tests/test_predict.py)."""
    from PIL import Image

    rows, cols = np.flatnonzero((image28 > 0).any(1)), np.flatnonzero((image28 > 0).any(0))
    crop = Image.fromarray(255 - image28[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    side = int(280 * rng.uniform(0.4, 0.9))
    scale = side / max(crop.size)
    crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.BILINEAR)
    canvas = Image.new("L", (280, 280), 255)
    canvas.paste(crop, (int(rng.integers(0, 281 - crop.width)), int(rng.integers(0, 281 - crop.height))))
    return canvas


def convention_for(dataset: str) -> str:
    """Which recipe made a dataset: fashion-mnist and digits have their own; mnist and kmnist MNIST's."""
    return {"fashion-mnist": "fashion", "digits": "digits"}.get(dataset, "mnist")


def view_of(ink: np.ndarray, inverted: bool, dataset: str) -> Prepared:
    """The model's 28x28 view of an ink map (H, W), by `dataset`'s convention: what every reader ends with."""
    image, blank = to_model_input(ink, convention_for(dataset))
    return Prepared(image=image, blank=blank, inverted=inverted)


def prepare(path: str | Path, dataset: str) -> Prepared:
    """Read a picture and make the model's 28x28 view of it, by the dataset's convention."""
    return view_of(*load_ink(path), dataset)


def prepare_picture(picture: str | Path | Image.Image | np.ndarray, dataset: str) -> Prepared:
    """prepare() for a picture already in memory too: a PIL image, or a numpy array (H, W) or (H, W, 3|4) of uint8,
    or (H, W) of floats in [0, 1] (1 is white). A uint8 array is read as the PNG holding it would be."""
    from PIL import Image

    if isinstance(picture, str | Path):
        return prepare(picture, dataset)
    if isinstance(picture, np.ndarray):
        shape = "x".join(map(str, picture.shape))
        colour = picture.ndim == 3 and picture.shape[2] in (3, 4)
        if not ((picture.dtype == np.uint8 and (picture.ndim == 2 or colour))
                or (picture.dtype.kind == "f" and picture.ndim == 2)):
            raise UnreadableImage(f"a {shape} array of {picture.dtype}: a picture is (H, W) or (H, W, 3|4) uint8, "
                                  "or (H, W) floats in [0, 1]")
        if picture.shape[0] * picture.shape[1] > MAX_PIXELS:
            raise UnreadableImage(f"a {shape} array is too large (at most {MAX_PIXELS:,} pixels)")
        if picture.dtype.kind == "f":
            if not (np.isfinite(picture).all() and picture.min() >= 0 and picture.max() <= 1):
                raise UnreadableImage(f"a {shape} float array: its values must lie in [0, 1] (1 is white)")
            ink, inverted = ink_from_grey(picture.astype(np.float32))
        else:
            ink, inverted = ink_from_image(Image.fromarray(picture))
    elif isinstance(picture, Image.Image):
        if picture.width * picture.height > MAX_PIXELS:
            raise UnreadableImage(f"a {picture.width}x{picture.height} image is too large "
                                  f"(at most {MAX_PIXELS:,} pixels)")
        ink, inverted = ink_from_image(picture)
    else:
        raise UnreadableImage(f"a {type(picture).__name__}: give a file path, a PIL image or a numpy array")
    return view_of(ink, inverted, dataset)
