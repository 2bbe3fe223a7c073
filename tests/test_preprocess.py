"""A person's picture -> the 28x28 view (deploy/preprocess.py): uneven paper, every picture mode, the
size guards, and the edges of the ink box, each pinned where a small change to the code would show."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mnistlab.deploy import preprocess
from mnistlab.deploy.preprocess import (
    UnreadableImage,
    _ink_box,
    _resize,
    convention_for,
    load_ink,
    prepare,
    render_as_picture,
    to_model_input,
)

SIZE = 280


def four_ink(size: int = SIZE) -> np.ndarray:
    """A '4' drawn with a 14 px pen, off-centre: float32 (H, W), 1 where the ink is."""
    canvas = Image.new("L", (size, size), 0)
    pen = ImageDraw.Draw(canvas)
    pen.line([(100, 50), (80, 150), (190, 150)], fill=255, width=14)
    pen.line([(160, 70), (160, 235)], fill=255, width=14)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def true_box(ink: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero((ink > 0.5).any(1)), np.flatnonzero((ink > 0.5).any(0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def surface(kind: str, size: int = SIZE) -> np.ndarray:
    """A paper's brightness (H, W) in [0, 1]: how light falls across a photographed sheet."""
    y, x = np.indices((size, size), dtype=np.float32) / (size - 1)  # 0..1 down and across
    r2 = ((x - 0.5) ** 2 + (y - 0.5) ** 2) / 0.5  # 0 at the centre, 1 in the corners
    return {
        "flat": np.full((size, size), 0.95, np.float32),
        "left-to-right": 0.5 + 0.4 * x,
        "bottom-to-top": 0.9 - 0.4 * y,
        "diagonal": 0.45 + 0.25 * x + 0.25 * y,
        "vignetting": 0.92 - 0.5 * r2,
    }[kind]


def photograph(tmp_path, paper: np.ndarray, ink: np.ndarray, ink_level: float, name: str = "photo.png"):
    """Ink of one grey level laid on the paper, saved as an 8-bit PNG: its path."""
    return save_grey(tmp_path, paper * (1 - ink) + ink_level * ink, name)


def save_grey(tmp_path, grey: np.ndarray, name: str = "photo.png"):
    path = tmp_path / name
    Image.fromarray(np.clip(np.rint(grey * 255), 0, 255).astype(np.uint8)).save(path)
    return path


def centre_of_mass(image: np.ndarray) -> np.ndarray:
    ys, xs = np.indices(image.shape)
    mass = image.astype(float)
    return np.array([(ys * mass).sum(), (xs * mass).sum()]) / mass.sum()


def same_view(view: np.ndarray, clean: np.ndarray) -> bool:
    """The clean picture's view, up to the one-pixel rounding of where the centre of mass is pasted: the same
    centre within a pixel, and a correlation above 0.9 at the best shift of at most one pixel."""
    best = max(np.corrcoef(np.roll(view, (dy, dx), (0, 1)).ravel().astype(float), clean.ravel().astype(float))[0, 1]
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    return best > 0.9 and np.abs(centre_of_mass(view) - centre_of_mass(clean)).max() <= 1.0


@pytest.fixture(autouse=True)
def restore_pillow_limit(monkeypatch):
    """load_ink sets Pillow's own bomb limit; a test that lowers it must not leave it low for the next."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


# ---- uneven paper (photos) --------------------------------------------------------------------------

UNEVEN = ["left-to-right", "bottom-to-top", "diagonal", "vignetting"]


@pytest.mark.parametrize("kind", UNEVEN)
def test_dark_ink_on_uneven_paper_is_boxed_where_the_digit_is(tmp_path, kind):
    ink = four_ink()
    found, inverted = load_ink(photograph(tmp_path, surface(kind), ink, ink_level=0.08))
    box = _ink_box(found)
    assert inverted and box is not None
    assert np.abs(np.subtract(box[0], true_box(ink))).max() <= 3, (box[0], true_box(ink))


@pytest.mark.parametrize("kind", UNEVEN)
def test_uneven_paper_gives_the_clean_pictures_view(tmp_path, kind):
    ink = four_ink()
    clean = prepare(photograph(tmp_path, surface("flat"), ink, 0.08, "clean.png"), "mnist").image
    view = prepare(photograph(tmp_path, surface(kind), ink, 0.08), "mnist")
    assert not view.blank and view.inverted
    assert same_view(view.image, clean)


@pytest.mark.parametrize("kind", ["left-to-right", "vignetting"])
def test_light_ink_on_an_unevenly_lit_screen_is_boxed_where_the_digit_is(tmp_path, kind):
    ink = four_ink()
    screen = 1.0 - surface(kind)  # dark, brighter towards one side or the centre
    found, inverted = load_ink(photograph(tmp_path, screen, ink, ink_level=0.97))
    box = _ink_box(found)
    assert not inverted and box is not None
    assert np.abs(np.subtract(box[0], true_box(ink))).max() <= 3


@pytest.mark.parametrize("kind", ["grey", "diagonal"])
def test_faint_ink_on_grey_paper_is_found(tmp_path, kind):
    """Pencil on grey paper: 0.12 darker than a sheet that is itself darker than mid-grey in places."""
    ink = four_ink()
    paper = np.full((SIZE, SIZE), 0.45, np.float32) if kind == "grey" else surface(kind) - 0.1
    path = save_grey(tmp_path, paper - 0.12 * ink)
    found, inverted = load_ink(path)
    box = _ink_box(found)
    assert inverted and box is not None
    assert np.abs(np.subtract(box[0], true_box(ink))).max() <= 3
    clean = prepare(photograph(tmp_path, surface("flat"), ink, 0.08, "clean.png"), "mnist").image
    assert same_view(prepare(path, "mnist").image, clean)


@pytest.mark.parametrize("kind", UNEVEN)
def test_uneven_paper_with_nothing_drawn_is_blank(tmp_path, kind):
    view = prepare(photograph(tmp_path, surface(kind), np.zeros((SIZE, SIZE), np.float32), 0.0), "mnist")
    assert view.blank and not view.image.any()


def test_a_stroke_through_the_border_does_not_bend_the_background(tmp_path):
    """The band the paper is fitted to holds some ink here: those pixels are outliers, not paper."""
    ink = four_ink()
    ink[:, 150:170] = 1.0  # the upright runs off the top and bottom of the picture
    found, _ = load_ink(photograph(tmp_path, surface("left-to-right"), ink, 0.08))
    box = _ink_box(found)
    assert box is not None and np.abs(np.subtract(box[0], true_box(ink))).max() <= 3


def test_a_landscape_photo_on_uneven_paper_is_boxed_where_the_digit_is(tmp_path):
    ink = np.zeros((200, 420), np.float32)
    ink[:, 100:380] = four_ink(280)[40:240]  # the '4', on a sheet twice as wide as tall
    paper = np.tile(np.linspace(0.9, 0.5, 420, dtype=np.float32), (200, 1))  # lit from the left
    found, inverted = load_ink(photograph(tmp_path, paper, ink, 0.08))
    box = _ink_box(found)
    assert inverted and box is not None and np.abs(np.subtract(box[0], true_box(ink))).max() <= 3


@pytest.mark.parametrize("side, flat", [(31, True), (32, False)])
def test_pictures_under_32_pixels_take_the_borders_level_and_larger_ones_a_surface(tmp_path, side, flat):
    """A 28x28 dataset image has no room for a fitted surface; from 32 px a gradient is paper, not ink."""
    paper = np.tile(np.linspace(0.95, 0.6, side, dtype=np.float32), (side, 1))
    ink = np.zeros((side, side), np.float32)
    ink[10:20, 14:17] = 1.0
    box = _ink_box(load_ink(photograph(tmp_path, paper, ink, 0.05))[0])
    assert box is not None and (box[0][3] - box[0][2] > 6) == flat  # the darker side's paper counts as ink


def test_a_sheet_of_faintly_textured_paper_is_blank(tmp_path):
    noise = 0.98 + 0.02 * np.random.default_rng(0).random((200, 200), dtype=np.float32)
    assert prepare(save_grey(tmp_path, noise), "mnist").blank


@pytest.mark.parametrize("level, inverted", [(1.0, True), (0.0, False)])
def test_a_blank_pictures_polarity_is_its_borders(tmp_path, level, inverted):
    view = prepare(save_grey(tmp_path, np.full((40, 60), level, np.float32)), "mnist")
    assert view.blank and view.inverted == inverted


# ---- every picture mode and file guard ---------------------------------------------------------------

def stroke(size: int = 64) -> np.ndarray:
    """A plus sign off-centre: float32 (H, W), 1 where the ink is."""
    ink = np.zeros((size, size), np.float32)
    ink[10:40, 20:26] = 1.0
    ink[22:28, 8:40] = 1.0
    return ink


def view_of(tmp_path, image: Image.Image, name: str = "pic.png", fmt: str | None = None):
    image.save(tmp_path / name, format=fmt)
    return prepare(tmp_path / name, "mnist")


@pytest.fixture
def reference(tmp_path) -> np.ndarray:
    """The view of the plus sign drawn dark on white, as an 8-bit grey PNG."""
    return view_of(tmp_path, Image.fromarray(np.uint8(255 - 255 * stroke())), "reference.png").image


def transparent(colour: int) -> np.ndarray:
    """(H, W, 2) grey+alpha: one colour everywhere, the ink only in the alpha."""
    la = np.zeros((64, 64, 2), np.uint8)
    la[..., 0] = colour
    la[..., 1] = np.uint8(255 * stroke())
    return la


@pytest.mark.parametrize("mode", ["LA", "RGBA"])  # PNG, JPEG and BMP carry no "PA": Pillow reads them as "P"
@pytest.mark.parametrize("colour", [0, 255])
def test_ink_in_the_alpha_channel_is_the_ink_whatever_its_colour(tmp_path, reference, mode, colour):
    view = view_of(tmp_path, Image.fromarray(transparent(colour), "LA").convert(mode))
    assert not view.blank and not view.inverted
    assert np.abs(view.image.astype(int) - reference).max() <= 1


def test_a_palette_picture_with_a_transparent_index_reads_its_alpha(tmp_path, reference):
    picture = Image.fromarray(np.uint8(stroke()), "P")  # index 1 where the ink is, 0 elsewhere
    picture.putpalette([90, 90, 90] * 2)  # both indices the same grey: only the transparency tells them apart
    picture.info["transparency"] = 0
    view = view_of(tmp_path, picture)
    assert not view.blank and not view.inverted and np.abs(view.image.astype(int) - reference).max() <= 1


@pytest.mark.parametrize("mode", ["P", "RGB", "RGBA", "L"])
def test_an_opaque_picture_is_read_by_its_grey_levels(tmp_path, reference, mode):
    picture = Image.fromarray(np.uint8(255 - 255 * stroke())).convert(mode)  # RGBA: alpha 255 everywhere
    view = view_of(tmp_path, picture)
    assert view.inverted and np.abs(view.image.astype(int) - reference).max() <= 1


@pytest.mark.parametrize("alpha_range, alpha_is_ink", [(20, False), (21, True)])
def test_an_alpha_that_barely_varies_is_not_the_ink(tmp_path, alpha_range, alpha_is_ink):
    """Alpha varying by more than BLANK_INK (0.08 = 20.4/255) is the ink; less, and the colours are read."""
    rgba = np.empty((64, 64, 4), np.uint8)
    rgba[..., :3] = np.uint8(255 - 255 * stroke())[..., None]  # a dark stroke on white...
    rgba[..., 3] = np.uint8(255 - alpha_range * (1 - stroke()))  # ...nearly opaque, a shade less off the stroke
    view = view_of(tmp_path, Image.fromarray(rgba, "RGBA"))
    assert view.inverted != alpha_is_ink and not view.blank


@pytest.mark.parametrize("fmt, name", [("JPEG", "pic.jpg"), ("BMP", "pic.bmp")])
def test_jpeg_and_bmp_pictures_are_read(tmp_path, reference, fmt, name):
    view = view_of(tmp_path, Image.fromarray(np.uint8(255 - 255 * stroke())), name, fmt)
    assert view.inverted and same_view(view.image, reference)


@pytest.mark.parametrize("content", [b"GIF89a" + bytes(30), b"not a picture", b""])
def test_files_that_are_not_png_jpeg_or_bmp_are_unreadable(tmp_path, content):
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(UnreadableImage, match=r"x.png: not a readable PNG, JPEG or BMP image \("):
        load_ink(tmp_path / "x.png")


def test_a_png_cut_short_is_unreadable(tmp_path):
    Image.fromarray(np.uint8(255 * stroke())).save(tmp_path / "x.png")
    data = (tmp_path / "x.png").read_bytes()
    (tmp_path / "x.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImage, match="not a readable PNG"):
        load_ink(tmp_path / "x.png")


def test_a_picture_of_exactly_the_pixel_limit_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 40 * 40)
    view = view_of(tmp_path, Image.fromarray(np.uint8(255 * stroke(40))))
    assert not view.blank


def test_a_picture_over_the_limit_but_under_twice_it_is_refused_by_our_check(tmp_path, monkeypatch):
    """Pillow only warns below twice its limit: the size check of our own must catch these."""
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 40 * 40)
    Image.new("L", (41, 40), 255).save(tmp_path / "big.png")
    with pytest.warns(Image.DecompressionBombWarning), \
            pytest.raises(UnreadableImage, match=r"big.png: 41x40 is too large \(at most 1,600 pixels\)$"):
        load_ink(tmp_path / "big.png")


def test_a_picture_over_twice_the_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 40 * 40)
    Image.new("L", (81, 40), 255).save(tmp_path / "bomb.png")
    with pytest.raises(UnreadableImage, match=r"too large \(at most 1,600 pixels; refused before decoding\)$"):
        load_ink(tmp_path / "bomb.png")


# ---- the ink box and the 28x28 field -----------------------------------------------------------------

def test_the_ink_box_is_the_inks_exact_edges_and_the_background_its_borders_level():
    ink = np.full((30, 40), 0.3, np.float32)
    ink[5:10, 7:13] = 1.0
    assert _ink_box(ink) == ((5, 10, 7, 13), pytest.approx(0.3))


@pytest.mark.parametrize("level, in_box", [(0.11, True), (0.09, False), (preprocess.BOX_LEVEL, False)])
def test_a_fringe_joins_the_box_above_a_tenth_of_the_way_to_the_peak(level, in_box):
    ink = np.full((30, 40), 0.3)
    ink[5:10, 7:13] = 1.0
    ink[5:10, 13] = 0.3 + level * (1.0 - 0.3)  # an anti-aliased column at the right edge
    assert _ink_box(ink)[0][3] == (14 if in_box else 13)


@pytest.mark.parametrize("pixels, blank", [(3, True), (4, False)])
def test_fewer_than_four_pixels_of_ink_are_a_speck(pixels, blank):
    ink = np.zeros((30, 30))
    ink[12, 10 : 10 + pixels] = 1.0
    ink[20, 20:23] = 0.5  # fainter marks, at half the peak and no more, do not make the speck a drawing
    assert (_ink_box(ink) is None) == blank


@pytest.mark.parametrize("background, peak, blank", [(0.0, preprocess.BLANK_INK, False), (0.0, 0.079, True),
                                                     (0.3, 0.35, True), (0.3, 0.39, False)])
def test_ink_must_rise_blank_ink_above_the_background(background, peak, blank):
    ink = np.full((30, 30), background)  # float64: BLANK_INK itself, not its float32 neighbour below
    ink[10:20, 10:20] = peak
    image, is_blank = to_model_input(ink, "mnist")
    assert is_blank == blank and image.any() != blank and image.shape == (28, 28)


def test_the_view_is_full_scale_and_background_free_whatever_the_inks_level():
    ink = np.full((60, 60), 0.2, np.float32)
    ink[10:50, 10:50] = 0.5  # a hollow square of half-strength ink on a grey background
    ink[20:40, 20:40] = 0.2
    image, blank = to_model_input(ink, "digits")
    assert not blank and image.max() == 255 and image[13, 13] == 0 and image[2, 2] == 0
    assert image.dtype == np.uint8 and image.shape == (28, 28)


@pytest.mark.parametrize("convention, side", [("mnist", 20), ("digits", 20), ("fashion", 28)])
def test_a_wide_thin_stroke_keeps_its_longer_side_and_at_least_one_row(convention, side):
    ink = np.zeros((50, 300), np.float32)
    ink[25, 20:280] = 1.0  # one pixel tall: scaled by 20/260 it would round to no rows at all
    image, blank = to_model_input(ink, convention)
    rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
    assert not blank and len(rows) == 1 and cols[-1] - cols[0] + 1 == side
    assert abs(rows[0] - 13.5) <= 0.5 and abs((cols[0] + cols[-1]) / 2 - 13.5) <= 0.5


def test_mnist_centres_the_mass_and_digits_and_fashion_the_box():
    ink = np.zeros((50, 50), np.float32)
    ink[5:45, 5:9] = 1.0  # an upright on the left and a faint foot: the mass sits left of the box's centre
    ink[41:45, 5:45] = 0.25
    views = {c: to_model_input(ink, c)[0] for c in ("mnist", "digits", "fashion")}
    assert np.abs(centre_of_mass(views["mnist"]) - 13.5).max() <= 0.6  # pasted by whole pixels
    for convention, (first, last) in (("digits", (4, 23)), ("fashion", (0, 27))):
        rows, cols = np.flatnonzero(views[convention].any(1)), np.flatnonzero(views[convention].any(0))
        assert (rows[0], rows[-1]) == (cols[0], cols[-1]) == (first, last), convention
        assert views[convention][last, first:last + 1].all(), convention  # the foot, not cut off


@pytest.mark.parametrize("flip", [(0,), (1,)], ids=["bar-at-the-bottom", "bar-on-the-right"])
def test_a_mass_lopsided_the_other_way_is_clipped_at_the_fields_start(flip):
    ink = np.zeros((40, 40), np.float32)
    ink[36:40, 0:40] = 1.0
    ink[0:36, 19] = 0.15
    ink = ink if flip == (0,) else ink.T
    image, blank = to_model_input(ink, "mnist")
    lines = np.flatnonzero(image.any(1 if flip == (0,) else 0))
    assert not blank and lines[0] == 0 and 14 <= lines[-1] <= 16


def test_a_lopsided_mass_is_pasted_clipped_at_the_fields_edge():
    ink = np.zeros((40, 40), np.float32)
    ink[0:4, 0:40] = 1.0  # a heavy bar on top of a hairline stem: the mass sits near the top of the box
    ink[4:40, 19] = 0.15
    image, blank = to_model_input(ink, "mnist")
    rows = np.flatnonzero(image.any(1))
    assert not blank and rows[-1] == 27  # the stem runs off the bottom, cut, not wrapped or refused
    assert 11 <= rows[0] <= 13 and image[rows[0]].max() == 255


def test_resize_averages_the_area_each_output_pixel_covers():
    checker = (np.indices((4, 4)).sum(0) % 2).astype(np.float32)
    assert np.allclose(_resize(checker, 2, 2), 0.5, atol=1e-3)
    assert _resize(np.full((4, 4), 3.0, np.float32), 2, 2).max() == pytest.approx(1.0)  # clipped to full scale
    assert np.abs(_resize(np.full((4, 4), 0.5, np.float32), 2, 2) - 0.5).max() < 1e-5


def test_each_dataset_uses_its_own_recipe():
    assert [convention_for(d) for d in ("mnist", "kmnist", "fashion-mnist", "digits", "custom")] == [
        "mnist", "mnist", "fashion", "digits", "mnist"]


def test_render_as_picture_scales_the_items_own_box():
    item = np.zeros((28, 28), np.uint8)
    item[3, 10:16] = 1  # a faint top row: part of the item's box, though nearly white once drawn
    item[4:24, 10:16] = 255
    rng = np.random.default_rng(3)
    side = int(280 * rng.uniform(0.4, 0.9))  # what render_as_picture draws first from the same generator
    dark = np.asarray(render_as_picture(item, np.random.default_rng(3))) < 128
    rows, cols = np.flatnonzero(dark.any(1)), np.flatnonzero(dark.any(0))
    assert abs((cols[-1] - cols[0] + 1) - 6 * side / 21) <= 1.5  # 21 rows by 6 columns, scaled to `side`
    assert abs((rows[-1] - rows[0] + 1) - 20 * side / 21) <= 1.5


def test_render_as_picture_draws_the_item_dark_on_white_at_40_to_90_percent():
    item = np.zeros((28, 28), np.uint8)
    item[4:24, 10:16] = 255
    for seed in range(5):
        picture = np.asarray(render_as_picture(item, np.random.default_rng(seed)))
        assert picture.shape == (280, 280) and picture[0, 0] == 255 and picture.min() == 0
        dark = picture < 128
        rows, cols = np.flatnonzero(dark.any(1)), np.flatnonzero(dark.any(0))
        assert 0.4 * 280 - 2 <= rows[-1] - rows[0] + 1 <= 0.9 * 280 + 2 and cols[-1] - cols[0] < rows[-1] - rows[0]


# ---- the pieces of the background estimate, each against a known answer -----------------------------------

def test_colours_are_read_by_their_luminance(tmp_path):
    """Green on red: the same mean of R, G and B, but green is the lighter to an eye (and to Pillow's "L")."""
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = 255
    rgb[stroke() > 0] = (0, 255, 0)
    for picture in (Image.fromarray(rgb), Image.fromarray(rgb).convert("P"), Image.fromarray(rgb).convert("RGBA")):
        view = view_of(tmp_path, picture)
        assert not view.blank and not view.inverted, picture.mode


def test_a_real_gif_is_refused_as_a_format_we_do_not_decode(tmp_path):
    Image.fromarray(np.uint8(255 * stroke())).save(tmp_path / "x.gif")
    with pytest.raises(UnreadableImage, match="not a readable PNG, JPEG or BMP image"):
        load_ink(tmp_path / "x.gif")


@pytest.mark.parametrize("shape, grid", [((280, 140), (64, 32)), ((140, 280), (32, 64)), ((64, 64), (64, 64)),
                                         ((20, 6), (20, 6)), ((2000, 10), (64, 1))])
def test_the_background_is_fitted_on_at_most_64_pixels_a_side_never_upscaled(shape, grid):
    assert preprocess._grid_shape(shape) == grid


def test_a_curved_background_is_recovered_exactly_at_full_resolution():
    y, x = np.indices((120, 200), dtype=np.float32)
    y, x = (y + 0.5) / 120 * 2 - 1, (x + 0.5) / 200 * 2 - 1  # pixel centres in [-1, 1]
    paper = 0.6 + 0.1 * x - 0.15 * y - 0.2 * x * x + 0.1 * x * y + 0.05 * y * y
    assert np.abs(preprocess._background(paper) - paper).max() < 2e-3


def test_the_background_is_fitted_to_the_outer_band_alone():
    """An item that fills most of the picture is no part of the paper, however much of the picture it takes."""
    paper = np.full((200, 200), 0.9, np.float32)
    paper[30:170, 30:170] = 0.1
    assert np.abs(preprocess._background(paper) - 0.9).max() < 0.01


def test_strokes_across_the_band_are_rejected_as_outliers():
    y, x = np.indices((200, 200), dtype=np.float32) / 199
    paper = 0.5 + 0.4 * x
    grey = paper.copy()
    grey[:, 60:75] = 0.05  # two thick strokes cross the band top to bottom
    grey[:, 120:135] = 0.05
    assert np.abs(preprocess._background(grey) - paper).max() < 0.02


def test_the_border_level_is_the_median_of_the_four_edges():
    a = np.full((6, 6), 0.5)
    a[0], a[-1] = 1.0, 1.0  # top and bottom rows light, the side columns dark between them
    a[1:-1, 0], a[1:-1, -1] = 0.0, 0.0
    assert preprocess._border_level(a) == 1.0
    assert preprocess._border_level(a.T) == 1.0


# ---- which way the ink goes -------------------------------------------------------------------------------

def marks(paper: float, dark: float, light: float) -> np.ndarray:
    """A float picture (H, W): a sheet of `paper` with one mark `dark` below it and one `light` above."""
    grey = np.full((100, 100), paper)
    grey[20:40, 20:40] -= dark
    grey[60:80, 60:80] += light
    return grey


@pytest.mark.parametrize("paper, dark, light, inverted", [
    (0.4, 0.30, 0.27, False),  # neither stands out by 0.04: the border decides (darker than mid-grey: light ink)
    (0.6, 0.27, 0.30, True),  # ditto, lighter than mid-grey: dark ink
    (0.5, 0.30, 0.28, False),  # a border of exactly mid-grey reads as a dark screen
    (0.4, 0.35, 0.30, True),  # the darker mark stands out: dark ink, whatever the border
    (0.6, 0.20, 0.30, False),
])
def test_the_ink_is_the_side_that_departs_furthest_and_the_border_breaks_ties(paper, dark, light, inverted):
    assert preprocess.ink_from_grey(marks(paper, dark, light))[1] == inverted


@pytest.mark.parametrize("paper, light", [(0.4, 0.1), (0.85, 0.09)])
def test_faint_light_ink_on_a_grey_screen_is_found(paper, light):
    """0.1 above a 0.4 screen is a sixth of the way to white: ink, not blank (nor on a light one, by the floor)."""
    ink, inverted = preprocess.ink_from_grey(marks(paper, 0.0, light))
    assert not inverted and _ink_box(ink)[0] == (60, 80, 60, 80)


def test_very_faint_pencil_on_grey_paper_is_ink_and_near_black_paper_noise_is_not():
    ink, inverted = preprocess.ink_from_grey(marks(0.45, 0.06, 0.0))
    assert inverted and _ink_box(ink)[0] == (20, 40, 20, 40)
    noise = 0.05 + 0.03 * np.random.default_rng(1).random((100, 100))  # a nearly black sheet's grain
    assert to_model_input(preprocess.ink_from_grey(noise)[0], "mnist")[1]


# ---- a digital canvas's paper is taken as it is -----------------------------------------------------------

def canvas(paper: float, item: float, box: tuple[int, int, int, int], side: int = 280) -> np.ndarray:
    """A digital canvas (side, side) of one exact grey `paper` with a rectangle of grey `item` (top, bottom, left,
    right), soft-edged by one pixel of the mean of the two, as a drawing program anti-aliases."""
    grey = np.full((side, side), paper, dtype=np.float32)
    top, bottom, left, right = box
    grey[max(top - 1, 0) : bottom + 1, max(left - 1, 0) : right + 1] = (paper + item) / 2
    grey[top:bottom, left:right] = item
    return grey


@pytest.mark.parametrize("box", [(100, 180, 90, 200),  # in the middle
                                 (0, 280, 60, 220),  # a tall item touching the top and the bottom edge
                                 (20, 260, 20, 260)])  # a large item over much of the band, corners clear
def test_a_digital_canvas_is_read_against_its_exact_paper(box):
    """The paper of a drawing program is one exact grey: no surface is fitted (soft stroke edges in the band would
    tilt it, a large item would be taken for the paper), and the ink is the flat paper's, exactly."""
    grey = canvas(1.0, 0.3, box)
    assert preprocess._canvas_paper(grey) == 1.0
    ink, inverted = preprocess.ink_from_grey(grey)
    assert inverted
    np.testing.assert_array_equal(ink, np.float32(1.0) - grey)  # paper 0, the item 0.7, its edge 0.35
    light = canvas(0.0, 0.8, box)  # the served page's canvas: light ink on black
    ink, inverted = preprocess.ink_from_grey(light)
    assert preprocess._canvas_paper(light) == 0.0 and not inverted
    np.testing.assert_array_equal(ink, light)


def test_a_photo_or_a_canvas_mostly_covered_is_fitted():
    grey = canvas(1.0, 0.3, (100, 180, 90, 200))
    noisy = grey + np.random.default_rng(0).normal(0, 0.004, grey.shape).astype(np.float32)  # a camera's noise
    assert preprocess._canvas_paper(np.clip(noisy, 0, 1)) is None
    yy, xx = np.mgrid[0:280, 0:280] / 279 - 0.5
    lens = np.minimum(1.0, 1.15 - 0.6 * (yy**2 + xx**2)).astype(np.float32)  # overexposed: most of it one white,
    vignetted = np.minimum(grey, lens)  # but the lens darkens the corners
    assert (vignetted == 1.0).mean() > 0.5 and preprocess._canvas_paper(vignetted) is None
    assert preprocess._canvas_paper(canvas(1.0, 0.3, (0, 280, 10, 270))) is None  # the corners are the item's
    covered = canvas(1.0, 0.3, (3, 277, 3, 277))  # less than half the band is paper
    assert covered[0, 0] == 1.0 and preprocess._canvas_paper(covered) is None


@pytest.mark.parametrize("paper, inverted", [(1.0, True), (0.0, False), (0.8, True), (0.3, False), (0.6, False)])
def test_flat_ink_skips_the_clip_only_where_nothing_can_leave_0_to_1(paper, inverted):
    grey = np.random.default_rng(1).random((50, 60)).astype(np.float32)
    room = max(paper if inverted else 1.0 - paper, preprocess.MIN_ROOM)
    expected = np.clip(((paper - grey) if inverted else (grey - paper)) / np.float32(room), 0.0, 1.0)
    np.testing.assert_array_equal(preprocess._flat_ink(grey, paper, inverted), expected)


def _pillow_box(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow's own BOX resize of a float32 array, the reference preprocess._area_mean reproduces."""
    image = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")
    return np.asarray(image.resize((width, height), resample=Image.Resampling.BOX), dtype=np.float32)


# (input side, output sides): every side 1..100, then larger ones up to 4096, each to sizes it is made at (the
# 64 px background grid, the 28 and 20 px views, odd ratios) and, for the small ones, enlarged (a tiny crop)
BOX_SIZES = [(n, sorted({1, 2, 3, 7, 20, 28, 63, 64, n, n + 1, 2 * n + 3})) for n in range(1, 101)] + [
    (n, [1, 3, 20, 21, 28, 48, 64]) for n in (127, 255, 256, 280, 333, 511, 600, 1000, 1023, 1200, 1600, 2047, 4096)]


def test_area_mean_equals_pillows_box_resize_for_every_size_and_ratio():
    """The matrix-product resample gives Pillow's BOX values to float rounding: integer and non-integer ratios,
    shrinking and enlarging, rows and columns (a 2-D call resamples both)."""
    rng = np.random.default_rng(0)
    for n, outs in BOX_SIZES:
        for m in outs:
            rows = rng.random((n, 3), dtype=np.float32)  # resampled along its n rows
            cols = rng.random((2, n), dtype=np.float32)  # and along its n columns
            assert np.abs(preprocess._area_mean(rows, m, 3) - _pillow_box(rows, m, 3)).max() <= 1e-6, (n, m)
            assert np.abs(preprocess._area_mean(cols, 2, m) - _pillow_box(cols, 2, m)).max() <= 1e-6, (n, m)
    photo = rng.random((1200, 1600), dtype=np.float32)
    assert np.abs(preprocess._area_mean(photo, 48, 64) - _pillow_box(photo, 48, 64)).max() <= 1e-6


def test_the_fits_normal_matrix_from_monomial_sums_is_the_terms_gram_matrix():
    index, design_t, moments_t, pairs = preprocess._band(64, 48)
    weight = (np.random.default_rng(1).random(len(index)) > 0.3).astype(np.float64)  # a subset of the band
    assert np.allclose((moments_t @ weight)[pairs], (design_t * weight) @ design_t.T, rtol=1e-12, atol=1e-9)


def test_the_surfaces_reach_bounds_it_and_a_flat_paper_is_one_number():
    rng = np.random.default_rng(2)
    for _ in range(50):
        coef = rng.normal(0, 0.3, 6)
        rows, cols = preprocess._surface_factors(coef, 37, 53)
        assert np.abs(rows @ cols - coef[0]).max() <= preprocess._reach(coef) + 1e-6
    grey = np.full((100, 120), 0.9, np.float32)
    grey[40:60, 50:70] = 0.3
    ink, inverted = preprocess.ink_from_grey(grey)
    # dark on a flat paper of 0.9: the square is (0.9 - 0.3) / 0.9 of the way to black, the rest is paper
    assert inverted and ink[50, 60] == pytest.approx(0.6 / 0.9, abs=1e-5) and ink[5, 5] == pytest.approx(0.0, abs=1e-5)


def test_the_view_of_ink_on_a_grey_background_is_the_area_mean_of_the_ink_above_it():
    """to_model_input takes the background from the 28x28 means, not from every pixel: the same view as
    Pillow's resize of max(crop - background, 0), scaled to its peak."""
    rng = np.random.default_rng(3)
    ink = np.full((90, 70), 0.2, np.float32)
    ink[10:80, 15:50] = 0.2 + 0.8 * rng.random((70, 35), dtype=np.float32)
    (top, bottom, left, right), background = _ink_box(ink)
    crop = np.maximum(ink[top:bottom, left:right] - background, 0.0)
    h, w = crop.shape
    nh, nw = max(1, round(h * 28 / max(h, w))), max(1, round(w * 28 / max(h, w)))
    small = _pillow_box(crop, nh, nw) / crop.max()
    y0, x0 = round(13.5 - (nh - 1) / 2), round(13.5 - (nw - 1) / 2)
    expected = np.zeros((28, 28), np.float32)
    expected[y0 : y0 + nh, x0 : x0 + nw] = small
    view, blank = to_model_input(ink, "fashion")
    assert not blank
    assert np.abs(view.astype(int) - np.rint(expected * 255).astype(int)).max() <= 1
