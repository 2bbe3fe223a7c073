"""Batched augmentation: the affine warp really moves the pixels, as a function of the torch seed alone."""

from __future__ import annotations

import pytest
import torch

from mnistlab.data.batches import augment_batch

BACKGROUND = -0.5  # the normalised value of a black pixel
INK = 2.5
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, one thread


def bars(n: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, 1, 28, 28): background with one bright vertical bar off the centre, so any warp shows."""
    x = torch.full((n, 1, 28, 28), BACKGROUND, dtype=dtype)
    x[:, 0, 8:20, 11:15] = INK
    return x


def affine(x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return augment_batch(x, "affine", background=BACKGROUND)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_affine_warps_every_image_and_keeps_shape_and_dtype(dtype):
    x = bars(dtype=dtype)
    out = affine(x, seed=0)
    assert out.shape == x.shape and out.dtype == dtype
    diff = (out - x).abs().flatten(1)  # (B, H*W)
    assert diff.mean() > 0.05, diff.mean()  # measured 0.146: pixels moved, not rounding noise
    assert (diff.amax(1) > 0.5).all()  # every image changed, not just some
    assert len({tuple(img.flatten().tolist()) for img in out}) == len(out)  # each its own warp


def test_affine_moves_the_ink_without_inventing_or_losing_much_of_it():
    x = bars()
    out = affine(x, seed=0)
    # bilinear resampling blends neighbours: values stay within the image's range
    assert out.min() >= BACKGROUND - 1e-5 and out.max() <= INK + 1e-5
    # scale in [0.9, 1.1] changes the bar's area by a factor in [1/1.21, 1/0.81]; rotation and shear keep it
    ratio = (out - BACKGROUND).flatten(1).sum(1) / (x - BACKGROUND).flatten(1).sum(1)
    assert ((0.75 < ratio) & (ratio < 1.3)).all(), ratio


def test_affine_fills_what_moves_into_view_with_background():
    x = torch.full((8, 1, 28, 28), BACKGROUND)
    out = affine(x, seed=0)
    assert torch.allclose(out, x, atol=1e-5)  # a blank image stays blank: no zeros pulled in at the borders
    assert not torch.allclose(affine(bars(8), seed=0), bars(8), atol=1e-2)  # while the same draws do warp ink


def test_affine_is_a_pure_function_of_the_torch_seed():
    x = bars()
    assert torch.equal(affine(x, seed=3), affine(x, seed=3))
    assert not torch.equal(affine(x, seed=3), affine(x, seed=4))


def test_none_returns_the_images_unchanged():
    x = bars()
    torch.manual_seed(0)
    assert torch.equal(augment_batch(x, "none", background=BACKGROUND), x)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="'shift'"):
        augment_batch(bars(2), "shift", background=BACKGROUND)
