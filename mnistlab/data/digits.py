"""scikit-learn's bundled 8x8 digits, made to look like MNIST: the dataset that needs no download.

Method (documented so the numbers are reproducible): the 0..16 intensities are scaled to 0..255,
the 8x8 image is upsampled to 20x20 with bilinear interpolation (align_corners=False, no
antialiasing: it is an upsampling), and padded by 4 pixels on every side to 28x28. That mirrors
how MNIST itself was made: digits fitted in a 20x20 box inside a 28x28 frame. The split is a
fixed stratified 80/20 (sklearn.model_selection.train_test_split, random_state=0): 1,437 train,
360 test.
"""

from __future__ import annotations

import numpy as np

DIGITS_SPLIT_SEED = 0


def upsample_digits(images8: np.ndarray) -> np.ndarray:
    """(N, 8, 8) floats in 0..16 -> (N, 28, 28) uint8, by the method in the module docstring."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(images8, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)  # (N, 1, 20, 20)
    x = F.pad(x, (4, 4, 4, 4))  # (N, 1, 28, 28)
    return x.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()


def load_digits_28() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (train_images, train_labels, test_images, test_labels) as uint8/int64 arrays."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = upsample_digits(bunch.images)
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    return x_train, y_train, x_test, y_test
