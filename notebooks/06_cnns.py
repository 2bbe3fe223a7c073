# %% [markdown]
# # Chapter 6: Convolutional networks
#
# A convolution slides a small grid of weights (the **kernel**, or filter) over a picture and, at
# every position, takes the sum of the pixels under it weighted by the kernel. The same few weights
# are used everywhere, so a pattern is found wherever it sits in the picture. This chapter:
#
# 1. writes a convolution as a sum of shifted copies of the picture, and checks PyTorch's `conv2d`
#    against it (PyTorch does not flip the kernel: it computes a cross-correlation);
# 2. shows the **convolution theorem**: in frequency, convolution is a plain multiplication,
#    `FFT(x * k) = FFT(x) FFT(k)`, with the FFT written from scratch in `mnistlab/labs/fft.py`;
# 3. trains a small CNN for a few seconds and looks at what its first layer learned: its filters,
#    and the feature maps they make of one digit, which are exactly the convolutions of part 1.

# %%
import tempfile

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import mnistlab
from mnistlab.data import load_dataset
from mnistlab.data.batches import to_input
from mnistlab.labs.fft import conv2d_direct, conv2d_fft, fft2
from mnistlab.models import create_model

ds = load_dataset("digits")
img = ds.test_images[0].numpy().astype(np.float64) / 255.0  # (28, 28) in [0, 1]
print(ds.summary())
print("test image 0: a", ds.classes[int(ds.test_labels[0])], img.shape)

# %% [markdown]
# ## Convolution: a sum of shifted copies
#
# With a kernel `k` of size 3x3, the (full) convolution is `out[p, q] = sum_{a, b} k[a, b] x[p - a, q - b]`:
# for each of the 9 kernel weights, a copy of the picture shifted by `(a, b)` and scaled by that
# weight, all added up. `conv2d_direct` from the fft lab is exactly that double loop over the kernel.
# The output is 2 pixels larger each way (30x30): the kernel hangs over the edges.
#
# The kernel here is a **Sobel filter**: +1, +2, +1 on the left, -1, -2, -1 on the right. It answers
# "how much brighter is the left than the right?", so it lights up on vertical strokes.
#
# PyTorch's `F.conv2d` (what a CNN layer runs) does not flip the kernel: it computes
# `y[i, j] = sum_{a, b} w[a, b] x[i + a - 1, j + b - 1]`, a cross-correlation. It equals the
# convolution with the kernel turned by 180 degrees, cropped to the picture's size. For a network that
# learns its kernels the difference does not matter (it would learn the turned kernel), but it is worth
# knowing when you compare with a textbook.

# %%
sobel = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])  # (3, 3)
direct = conv2d_direct(img, sobel)  # (30, 30): full convolution
torch_out = F.conv2d(torch.from_numpy(img)[None, None], torch.from_numpy(sobel[::-1, ::-1].copy())[None, None],
                     padding=1)[0, 0].numpy()  # (28, 28): cross-correlation with the turned kernel
print("direct", direct.shape, "| torch conv2d", torch_out.shape,
      "| largest difference", np.abs(direct[1:-1, 1:-1] - torch_out).max())
assert np.abs(direct[1:-1, 1:-1] - torch_out).max() < 1e-12, "torch's conv2d = convolution with the turned kernel"

# %% [markdown]
# ## In frequency, convolution is multiplication
#
# The Fourier transform writes a picture as a sum of waves (chapter 10 builds the FFT step by step).
# The convolution theorem says: transform the picture and the kernel, **multiply them entry by entry**,
# transform back, and you have the convolution. `conv2d_fft` does exactly that, after padding both
# to 32x32 (a power of two, and large enough that the waves do not wrap around onto the picture).
#
# Two things to read off the bottom row of the figure:
# - the kernel's spectrum is a **filter**: at each frequency it says how much of that wave passes;
# - the Sobel kernel's weights sum to zero, so its spectrum is 0 at frequency zero (the mean
#   brightness): an edge detector does not see flat regions, only changes. A blur (a Gaussian kernel,
#   all weights positive) does the opposite: it keeps frequency zero and damps the fast waves.

# %%
via_fft = conv2d_fft(img, sobel)  # ifft2(fft2(padded x) * fft2(padded k)), cropped to (30, 30)
size = 32
spec_img = fft2(np.pad(img, ((0, size - 28), (0, size - 28))))  # (32, 32) complex
spec_k = fft2(np.pad(sobel, ((0, size - 3), (0, size - 3))))
spec_out = fft2(np.pad(direct, ((0, size - 30), (0, size - 30))))
yy, xx = np.mgrid[-3:4, -3:4]
gauss = np.exp(-(xx**2 + yy**2) / (2 * 1.5**2))
gauss /= gauss.sum()  # (7, 7) blur, weights sum to 1
spec_g = fft2(np.pad(gauss, ((0, size - 7), (0, size - 7))))

err = np.abs(direct - via_fft).max()
err_g = np.abs(conv2d_direct(img, gauss) - conv2d_fft(img, gauss)).max()
print(f"|direct - via FFT|: Sobel {err:.1e}, Gaussian {err_g:.1e}")
print(f"FFT of the output = product of the FFTs: largest difference {np.abs(spec_out - spec_img * spec_k).max():.1e}")
print(f"Sobel at frequency 0: {abs(spec_k[0, 0]):.1e} (weights sum {sobel.sum()}); "
      f"Gaussian at 0: {abs(spec_g[0, 0]):.3f}, at the highest frequency: {abs(spec_g[16, 16]):.1e}")
assert err < 1e-12 and err_g < 1e-12, "convolution theorem: the FFT route gives the direct convolution"
assert np.abs(spec_out - spec_img * spec_k).max() < 1e-9, "FFT(x * k) = FFT(x) FFT(k)"
assert abs(spec_k[0, 0]) < 1e-12, "an edge detector passes nothing at frequency zero"
assert abs(abs(spec_g[0, 0]) - 1) < 1e-12 and abs(spec_g[16, 16]) < 0.01, "a blur keeps the mean, damps fast waves"


def spectrum(s: np.ndarray) -> np.ndarray:
    """log |s| with frequency zero moved to the centre, for display."""
    return np.log10(np.abs(np.fft.fftshift(s)) + 1e-6)


fig, axes = plt.subplots(2, 3, figsize=(8, 5.4))
panels = [(img, "picture x (28x28)", "gray"), (sobel, "Sobel kernel k (3x3)", "RdBu_r"),
          (direct, "x * k: vertical edges (30x30)", "RdBu_r"),
          (spectrum(spec_img), "log |FFT(x)|", "viridis"),
          (spectrum(spec_k), "log |FFT(k)|: 0 at the centre", "viridis"),
          (spectrum(spec_img * spec_k), "log |FFT(x) FFT(k)| = log |FFT(x * k)|", "viridis")]
for ax, (a, title, cmap) in zip(axes.flat, panels, strict=True):
    lim = np.abs(a).max()
    ax.imshow(a, cmap=cmap, **(dict(vmin=-lim, vmax=lim) if cmap == "RdBu_r" else {}))
    ax.set_title(title, fontsize=9)
    ax.axis("off")
fig.suptitle("top: convolve in space; bottom: multiply in frequency (centre = frequency zero)", fontsize=10)
plt.tight_layout()
plt.show()

# %% [markdown]
# Why, then, do CNNs not use the FFT? Their kernels are tiny (3x3 or 5x5): the direct sum costs 9
# or 25 multiplications per pixel, fewer than the three transforms the FFT route needs for a 28x28
# picture. Counting real multiplications (a radix-2 FFT of n points does (n/2) log2 n complex
# multiplications, each 4 real ones):

# %%
direct_mults = {k: 28 * 28 * k * k for k in (3, 5)}
fft_mults = 4 * (3 * size * size * int(np.log2(size)) + size * size)  # 3 transforms of 32x32, then the product
print(f"direct: {direct_mults[3]:,} (3x3), {direct_mults[5]:,} (5x5); FFT route: {fft_mults:,}")
assert max(direct_mults.values()) < fft_mults, "for small kernels the direct sum is cheaper"

# %% [markdown]
# The FFT wins for large kernels, whose direct cost grows with the kernel's area (long audio
# filters, big blurs).
#
# ## What a CNN learns
#
# Now let a network choose its own kernels. We train LeNet-5 (LeCun et al. 1998), the classic CNN,
# whose first layer has six 5x5 filters: large enough to see a shape in. Five epochs on digits take
# seconds. The default `cnn` has 32 filters of 3x3 in its first layer (`mnistlab train --dataset
# digits` trains it); the steps below apply to it unchanged.

# %%
run = mnistlab.train(dataset="digits", model="lenet5", epochs=5, run_dir=tempfile.mkdtemp() + "/lenet5",
                     quiet=True)
model = run.load().model  # eval mode
print(f"mnistlab train --dataset digits --model lenet5 --epochs 5: test accuracy {run.results['test_accuracy']:.4f}")
conv1 = model.features[0]  # Conv2d(1, 6, 5, padding=2)
trained = conv1.weight.detach()[:, 0]  # (6, 5, 5)
torch.manual_seed(run.record.config()["seed"])  # the same seed the run built its model from
initial = create_model("lenet5").features[0].weight.detach()[:, 0]  # (6, 5, 5): where training started
change = ((trained - initial).norm() / initial.norm()).item()
print(f"first layer: {tuple(conv1.weight.shape)} weights; moved {change:.0%} of their size from the start")
assert run.results["test_accuracy"] > 0.9, run.results
assert change > 0.1, f"training changed the filters: {change}"

fig, axes = plt.subplots(2, 6, figsize=(8, 3))
for i in range(6):
    for row, (w, name) in enumerate(((initial, "random start"), (trained, "after training"))):
        lim = w[i].abs().max().item()
        axes[row, i].imshow(w[i], cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[row, i].set_title(f"filter {i}: {name}" if i == 0 else f"filter {i}", fontsize=8)
        axes[row, i].axis("off")
fig.suptitle("LeNet-5's six 5x5 first-layer filters (red +, blue -)", fontsize=10)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Feature maps
#
# Each filter, slid over a digit, gives a **feature map**: where in the picture that filter's pattern
# is. Below, the six maps of the test digit after the first layer (convolution, bias, tanh).
#
# Nothing new happens inside the layer: each map is the convolution of part 1. We check it by
# recomputing the maps with the FFT route, from the learned weights, in float64, and comparing with
# what the network computed.

# %%
x = to_input(ds.test_images[:1], ds.mean, ds.std)  # (1, 1, 28, 28): the digit as the network sees it
with torch.no_grad():
    maps = model.features[1](conv1(x))[0]  # (6, 28, 28): conv, then tanh
x64 = x[0, 0].double().numpy()
by_fft = np.stack([np.tanh(conv2d_fft(x64, trained[i].double().numpy()[::-1, ::-1])[2:-2, 2:-2]
                           + conv1.bias[i].item()) for i in range(6)])  # (6, 28, 28)
gap = np.abs(by_fft - maps.double().numpy()).max()
print(f"feature maps {tuple(maps.shape)}; network vs FFT convolution of the learned filters: largest gap {gap:.1e}")
assert gap < 1e-5, f"each feature map is the FFT convolution of the digit with a learned filter: {gap}"
black = ((0.0 - ds.mean) / ds.std)  # a black pixel after normalisation
print(f"a black pixel, normalised: {black:.3f}; the padding PyTorch adds: 0.0")
assert black < -0.5, black

fig, axes = plt.subplots(1, 7, figsize=(9, 1.9))
axes[0].imshow(ds.test_images[0], cmap="gray")
axes[0].set_title(f"input: a {ds.classes[int(ds.test_labels[0])]}", fontsize=8)
for i in range(6):
    axes[i + 1].imshow(maps[i], cmap="RdBu_r", vmin=-1, vmax=1)
    axes[i + 1].set_title(f"map of filter {i}", fontsize=8)
for ax in axes:
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# Look at the frame around each map. The convolution pads the picture with zeros, but after
# normalisation a black pixel is about -0.56 (printed above), so the padding is *brighter* than the
# background and every filter sees an edge at the border: something the next layers have to learn
# to disregard. Padding with the background value instead would leave no frame.
#
# The next layers do the same on these maps instead of on pixels: a filter of layer 2 looks at all
# six maps at once, so it finds patterns of patterns (a corner is two edges meeting), over a larger
# part of the picture after each pooling.
#
# ## Where next
#
# - Chapter 7 reads a digit as a sequence, row by row, with an RNN and an LSTM.
# - `mnistlab lab fft` runs the fft lab (the FFT from scratch against numpy, N log N against N^2, the
#   convolution theorem on a picture); `mnistlab models` lists the CNNs (`cnn`, `lenet5`).
