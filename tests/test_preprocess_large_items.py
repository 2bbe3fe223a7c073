"""A large item that reaches the picture's outer band is not mistaken for the paper's shading.

The background surface is fitted to the outer band; a garment drawn at 90% of the canvas, or pushed against
an edge, puts its own dark pixels in that band. A fit that starts from least squares is dragged towards them
and paints a dark bowl into the background, so the paper around the item reads as ink (measured on
Fashion-MNIST test images re-rendered as pictures: 15 of 300 views off by more than 10 grey levels on
average, the worst by 123).
"""

from __future__ import annotations

import numpy as np
import pytest

from mnistlab.deploy.preprocess import ink_from_grey, to_model_input


def garment_picture(corner: str) -> tuple[np.ndarray, np.ndarray]:
    """(grey picture (280, 280) in [0, 1], item mask): a dark textured item over 85% of the canvas, against
    one corner, on white paper."""
    rng = np.random.default_rng(0)
    grey = np.ones((280, 280), dtype=np.float32)
    mask = np.zeros((280, 280), dtype=bool)
    side = 238
    top, left = {"top-left": (0, 0), "bottom-right": (280 - side, 280 - side), "centre": (21, 21)}[corner]
    mask[top : top + side, left : left + side] = True
    grey[mask] = 0.15 + 0.1 * rng.random(mask.sum()).astype(np.float32)  # a dark, textured cloth
    return grey, mask


@pytest.mark.parametrize("corner", ["top-left", "bottom-right", "centre"])
def test_paper_around_a_large_dark_item_is_not_ink(corner):
    grey, mask = garment_picture(corner)
    ink, inverted = ink_from_grey(grey)
    assert inverted  # dark on light
    assert float(ink[~mask].max()) < 0.05  # the paper stays paper, even where the item fills the band
    assert float(ink[mask].min()) > 0.6  # and the item is ink all over


def test_a_large_item_fills_the_fashion_view_like_the_flat_paper_path():
    grey, mask = garment_picture("top-left")
    ink, _ = ink_from_grey(grey)
    image, blank = to_model_input(ink, "fashion")
    assert not blank
    # a square item fills the 28x28 field edge to edge: nothing dark stays inside it
    assert int(image.min()) >= 150, image.min()
