"""The FFT from scratch: divide, reuse, and the convolution theorem on a real image.

The DFT X_k = sum_n x_n e^{-2 pi i k n / N} costs N^2 multiplications. Split x into its even and
odd samples (Cooley & Tukey 1965): both halves' DFTs (size N/2) are reused twice, for X_k and
X_{k+N/2}, with one twiddle factor between them: X_k = E_k + w^k O_k, X_{k+N/2} = E_k - w^k O_k.
Halving log2 N times gives N log N: the same divide-and-reuse as backpropagation's dynamic
programming. The convolution theorem then turns convolution into a pointwise product:
FFT(x * k) = FFT(x) FFT(k), once both are zero-padded to the full output size.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from mnistlab.labs import Check

TITLE = "radix-2 FFT from scratch = numpy.fft; N log N vs N^2 timing; convolution theorem on an image"


def fft(x: np.ndarray) -> np.ndarray:
    """Radix-2 decimation-in-time FFT along the last axis (its length a power of two)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"radix-2 FFT needs a power-of-two length, got {n}")
    if n == 1:
        return x.astype(np.complex128)
    even, odd = fft(x[..., 0::2]), fft(x[..., 1::2])  # two half-size DFTs, each used twice below
    twiddle = np.exp(-2j * np.pi * np.arange(n // 2) / n) * odd
    return np.concatenate([even + twiddle, even - twiddle], axis=-1)


def ifft(x: np.ndarray) -> np.ndarray:
    """Inverse FFT: conjugate, forward transform, conjugate, divide by N."""
    return np.conj(fft(np.conj(x))) / x.shape[-1]


def fft2(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(fft(np.swapaxes(fft(x), -1, -2)), -1, -2)  # rows, then columns


def ifft2(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(ifft(np.swapaxes(ifft(x), -1, -2)), -1, -2)


def naive_dft(x: np.ndarray) -> np.ndarray:
    """The definition, one output at a time: N outputs of N terms each, O(N^2)."""
    n = len(x)
    k = np.arange(n)
    return np.array([np.sum(x * np.exp(-2j * np.pi * j * k / n)) for j in range(n)])


def conv2d_direct(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Full 2-D convolution (flipped kernel, output (H+kh-1, W+kw-1)) by its definition: a sum of shifted copies."""
    h, w = img.shape
    kh, kw = kernel.shape
    out = np.zeros((h + kh - 1, w + kw - 1))
    for i in range(kh):
        for j in range(kw):
            out[i : i + h, j : j + w] += kernel[i, j] * img
    return out


def conv2d_fft(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The same convolution through the convolution theorem, with the from-scratch FFT."""
    oh, ow = img.shape[0] + kernel.shape[0] - 1, img.shape[1] + kernel.shape[1] - 1
    size = 1 << max(oh - 1, ow - 1).bit_length()  # next power of two: no wrap-around, radix-2 works
    pad = lambda a: np.pad(a, ((0, size - a.shape[0]), (0, size - a.shape[1])))  # noqa: E731
    return ifft2(fft2(pad(img)) * fft2(pad(kernel))).real[:oh, :ow]


def best_time(fn, *args, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def sample_image() -> tuple[np.ndarray, str]:
    """A Fashion-MNIST image when it is on this machine, else one of the bundled digits."""
    from mnistlab.data.dataset import load_dataset
    from mnistlab.errors import UserError

    try:
        ds = load_dataset("fashion-mnist", offline=True)
    except UserError:
        ds = load_dataset("digits")
    label = ds.classes[int(ds.test_labels[0])]
    return ds.test_images[0].numpy().astype(np.float64) / 255.0, f"{ds.name} test image 0 ({label})"


def run(out: Path | None = None) -> list[Check]:
    rng = np.random.default_rng(0)
    checks = []
    errs = {}
    for n in (1, 2, 8, 64, 1024, 4096):
        x = rng.standard_normal(n) + 1j * rng.standard_normal(n)
        errs[n] = np.abs(fft(x) - np.fft.fft(x)).max() / max(1.0, np.abs(np.fft.fft(x)).max())
    checks.append(Check("fft(x) equals numpy.fft.fft(x)", max(errs.values()) < 1e-12,
                        "relative max error " + ", ".join(f"N={n}: {e:.1e}" for n, e in errs.items())))
    x = rng.standard_normal(256)
    err = np.abs(ifft(fft(x)) - x).max()
    checks.append(Check("ifft(fft(x)) = x", err < 1e-12, f"max |error| {err:.1e}"))

    sizes = [2**p for p in range(5, 12)]  # 32 .. 2048
    t_fft = [best_time(fft, rng.standard_normal(n)) for n in sizes]
    t_dft = [best_time(naive_dft, rng.standard_normal(n), repeats=1 if n > 512 else 3) for n in sizes]
    # growth exponents from the last four sizes, where fixed per-call costs no longer dominate
    slope_fft = np.polyfit(np.log(sizes[-4:]), np.log(t_fft[-4:]), 1)[0]
    slope_dft = np.polyfit(np.log(sizes[-4:]), np.log(t_dft[-4:]), 1)[0]
    checks.append(Check("the naive DFT grows like N^2, the FFT like N log N", slope_dft > 1.6 and slope_fft < 1.4,
                        f"log-log slopes over N = {sizes[-4]}..{sizes[-1]}: DFT {slope_dft:.2f}, FFT {slope_fft:.2f}; "
                        f"at N = {sizes[-1]}: DFT {t_dft[-1] * 1e3:.0f} ms, FFT {t_fft[-1] * 1e3:.1f} ms "
                        f"({t_dft[-1] / t_fft[-1]:.0f}x)"))

    img, name = sample_image()
    yy, xx = np.mgrid[-3:4, -3:4]
    kernel = np.exp(-(xx**2 + yy**2) / (2 * 1.5**2))
    kernel /= kernel.sum()  # a 7x7 Gaussian blur
    edge = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])  # Sobel: vertical edges
    direct, via_fft = conv2d_direct(img, kernel), conv2d_fft(img, kernel)
    err = np.abs(direct - via_fft).max()
    e_direct, e_fft = conv2d_direct(img, edge), conv2d_fft(img, edge)
    err_edge = np.abs(e_direct - e_fft).max()
    checks.append(Check("convolution theorem: FFT convolution equals direct convolution on an image",
                        max(err, err_edge) < 1e-12,
                        f"{name}, 7x7 Gaussian: max |diff| {err:.1e}; 3x3 Sobel: {err_edge:.1e}"))
    if out is not None:
        draw(out, sizes, t_fft, t_dft, img, name, kernel, direct, via_fft, e_fft)
    return checks


def draw(out, sizes, t_fft, t_dft, img, name, kernel, direct, via_fft, e_fft) -> None:
    from mnistlab.plots import pyplot, save_figure

    plt = pyplot()
    fig = plt.figure(figsize=(16, 7))
    ax = fig.add_subplot(1, 5, (1, 2))
    ax.loglog(sizes, np.array(t_dft) * 1e3, "o-", label="naive DFT (definition)")
    ax.loglog(sizes, np.array(t_fft) * 1e3, "o-", label="radix-2 FFT (from scratch)")
    n = np.array(sizes, dtype=float)
    ax.loglog(n, t_dft[-1] * 1e3 * (n / n[-1]) ** 2, "--", color="0.6", label="~ N^2")
    ax.loglog(n, t_fft[-1] * 1e3 * (n * np.log2(n)) / (n[-1] * np.log2(n[-1])), ":", color="0.3", label="~ N log N")
    ax.set_xlabel("N")
    ax.set_ylabel("milliseconds (best of 3; DFT above N = 512: one run)")
    ax.set_title("divide and reuse: N log N against N^2")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    panels = [(img, name), (kernel, "7x7 Gaussian kernel"), (direct, "direct convolution"),
              (via_fft, "via FFT: ifft2(fft2(x) fft2(k))"), (np.abs(direct - via_fft), "|direct - FFT|"),
              (e_fft, "Sobel kernel via FFT (vertical edges)")]
    for i, (a, title) in enumerate(panels):
        sub = fig.add_subplot(2, 5, [3, 4, 5, 8, 9, 10][i])
        lim = np.abs(a).max()
        im = sub.imshow(a, cmap="RdBu_r", vmin=-lim, vmax=lim) if i == 5 else sub.imshow(a, cmap="gray")
        sub.set_title(title, fontsize=9)
        sub.axis("off")
        if i == 4:
            fig.colorbar(im, ax=sub, fraction=0.046)
    fig.suptitle("The FFT from scratch and the convolution theorem")
    save_figure(fig, out)
