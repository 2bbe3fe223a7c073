"""Batches served from tensors already on the device, and batched augmentation.

No DataLoader, no per-sample Python: a batch is an index slice of a seeded per-epoch permutation,
gathered from the uint8 image tensor (shifted and mirrored windows in the same gather), converted
and normalised in one op, and warped with one `grid_sample` for the whole batch when asked
(after KellerJordan's airbench loader).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The order of the training images in `epoch`: a function of (seed, epoch) alone.

    Being a pure function is what makes resuming exact: a resumed run recomputes the same order
    instead of needing the generator's state from the moment it stopped.
    """
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)  # torch takes seeds below 2**64
    return torch.randperm(n, generator=g).to(device)


def to_input(images_u8: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(B, H, W) uint8 -> (B, 1, H, W) float32, normalised to zero mean and unit variance."""
    x = images_u8.unsqueeze(1).to(torch.float32)
    return (x - 255.0 * mean) * (1.0 / (255.0 * std))


def shifted_crops(padded: torch.Tensor, idx: torch.Tensor, max_shift: int = 2, hflip: bool = False) -> torch.Tensor:
    """Images `idx`, each moved by a random whole number of pixels in [-max_shift, max_shift] in each
    direction (and mirrored with probability 1/2 if `hflip`): (B,) -> (B, H, W), same dtype as `padded`.

    `padded` (N, H + 2m, W + 2m) holds the images with m = max_shift black pixels added on every
    side, once per run, so a shifted image is an H x W window of it and black fills what moves into
    view. One gather picks every window, mirrored or not, before the images are even converted to
    float: about a third of the time of the same shifts through grid_sample (1.6 vs 4.6-5.4 ms for
    256 images on 2 cores, with the conversion). Draws from torch's global RNG, like augment_batch.
    """
    b, (h, w) = len(idx), padded.shape[-2:]
    h, w = h - 2 * max_shift, w - 2 * max_shift
    dev = padded.device
    top, left = torch.randint(0, 2 * max_shift + 1, (2, b, 1), device=dev)  # window corners, (B, 1) each
    rows = top + torch.arange(h, device=dev)  # (B, H)
    cols = left + torch.arange(w, device=dev)  # (B, W)
    if hflip:  # read the window's columns right to left
        flip = torch.rand(b, 1, device=dev) < 0.5
        cols = torch.where(flip, cols.flip(1), cols)
    return padded[idx[:, None, None], rows[:, :, None], cols[:, None, :]]


def augment_batch(
    x: torch.Tensor, mode: str, background: float, max_shift: int = 2, hflip: bool = False
) -> torch.Tensor:
    """Randomly warp (affine) and/or mirror each image of x (B, C, H, W): one grid_sample for the batch.

    `background` is the normalised value of a black pixel, used to fill what moves into view.
    Draws from torch's global RNG on x's device, which the training loop seeds per step. ("shift"
    trains through `shifted_crops`, a gather that needs no resampling.)
    """
    if mode not in ("none", "affine"):
        raise ValueError(f"augment_batch does 'none' or 'affine', not {mode!r}")
    if mode == "none" and not hflip:
        return x
    if mode == "none":  # flips alone: a select between x and its mirror image, no resampling needed
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x)
    b, _, h, w = x.shape
    dev = x.device
    # translation in pixels, then in grid_sample's [-1, 1] units (2 / size per pixel)
    shift = torch.randint(-max_shift, max_shift + 1, (b, 2), device=dev).to(x.dtype)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 2] = shift[:, 0] * (2.0 / w)
    theta[:, 1, 2] = shift[:, 1] * (2.0 / h)
    angle = (torch.rand(b, device=dev) * 2 - 1) * math.radians(12)
    scale = 1 + (torch.rand(b, device=dev) * 2 - 1) * 0.1
    shear = (torch.rand(b, device=dev) * 2 - 1) * math.radians(8)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # rotation @ shear, divided by scale (theta maps output to input coordinates)
    theta[:, 0, 0] = cos / scale
    theta[:, 0, 1] = (cos * torch.tan(shear) - sin) / scale
    theta[:, 1, 0] = sin / scale
    theta[:, 1, 1] = (sin * torch.tan(shear) + cos) / scale
    if hflip:  # negating the x row of theta mirrors the image about its vertical axis
        flip = torch.rand(b, device=dev) < 0.5
        theta[flip, 0, :2] = -theta[flip, 0, :2]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample pads with zeros; shift so that zero is the background, then shift back
    out = F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + background


def random_erase(
    x: torch.Tensor, p: float, background: float, area: tuple[float, float] = (0.02, 0.25),
    log_aspect: float = math.log(3.0),
) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020), batched: with probability p, blank one random rectangle of each
    image of x (B, C, H, W) to `background`.

    The rectangle covers a fraction of the image drawn from `area`, with an aspect ratio between
    1/3 and 3 (log-uniform). A model that cannot count on any one region being visible has to use
    several: a regulariser for models that fit the training set faster than they generalise (the
    ViT). One mask for the batch, built from broadcast comparisons: no per-image Python.
    """
    if p <= 0:
        return x
    b, _, h, w = x.shape
    dev = x.device
    frac = torch.empty(b, device=dev).uniform_(*area)
    aspect = torch.exp(torch.empty(b, device=dev).uniform_(-log_aspect, log_aspect))
    eh = (torch.sqrt(frac * aspect) * h).round().clamp(1, h)  # (B,) rectangle height in pixels
    ew = (torch.sqrt(frac / aspect) * w).round().clamp(1, w)
    top = (torch.rand(b, device=dev) * (h - eh + 1)).floor()  # top-left corner, so the rectangle fits
    left = (torch.rand(b, device=dev) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=dev, dtype=top.dtype)[None, :, None]  # (1, H, 1)
    cols = torch.arange(w, device=dev, dtype=top.dtype)[None, None, :]  # (1, 1, W)
    inside = ((rows >= top[:, None, None]) & (rows < (top + eh)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + ew)[:, None, None]))  # (B, H, W)
    erase = inside & (torch.rand(b, device=dev) < p)[:, None, None]
    return x.masked_fill(erase[:, None], background)  # (B, 1, H, W) mask broadcasts over channels
