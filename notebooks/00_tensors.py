# %% [markdown]
# # Chapter 0: Tensors, and a picture as a vector
#
# Everything a network sees is a tensor: an array of numbers with a shape. This chapter takes the
# pictures of handwritten digits that the whole path uses, and looks at them three ways:
#
# 1. a picture is a grid of numbers, and the same numbers laid out in one line are a **vector**;
# 2. a **batch** of pictures has the shape `(B, C, H, W)`: batch, channels, height, width;
# 3. two vectors can be compared by their **dot product** or by their **cosine similarity**, and
#    only the second one is fair to a digit written with a thin pen.
#
# The data is `digits`: scikit-learn's 1,797 bundled 8x8 digits, drawn at MNIST's 28x28 size. It
# needs no download, so everything here runs offline in seconds.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from mnistlab.data import load_dataset
from mnistlab.data.batches import epoch_permutation, to_input
from mnistlab.plots import class_rows_figure

torch.manual_seed(0)
ds = load_dataset("digits")  # the same loader `mnistlab train --dataset digits` uses
print(ds.summary())

# %% [markdown]
# ## A picture is a grid of numbers
#
# One image is a `(28, 28)` tensor of bytes: 0 is paper, 255 is full ink. Reading its 28 rows one
# after the other gives a vector of 28 * 28 = 784 numbers. Nothing is lost: pixel `(r, c)` is entry
# `28 * r + c` of the vector, and reshaping gives the grid back.

# %%
img = ds.train_images[0]  # (28, 28) uint8
vec = img.reshape(-1)  # (784,)
print("image", tuple(img.shape), img.dtype, "-> vector", tuple(vec.shape), "| label", ds.train_labels[0].item())
print("rows 10..17, columns 8..19 of the grid (ink / 26, so one digit per pixel):")
print((img[10:18, 8:20] // 26).numpy())

r, c = 14, 12
assert img.shape == (28, 28) and img.dtype == torch.uint8, (img.shape, img.dtype)
assert vec.shape == (784,), vec.shape
assert vec[28 * r + c] == img[r, c], "pixel (r, c) is entry 28 r + c of the vector"
assert torch.equal(vec.reshape(28, 28), img), "reshaping the vector gives the picture back"

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 2.8), gridspec_kw=dict(width_ratios=[1, 3.2]))
ax0.imshow(img, cmap="gray_r", vmin=0, vmax=255)
ax0.set_title(f"the picture (28, 28): a {ds.train_labels[0].item()}")
ax0.axis("off")
ax1.plot(vec.numpy(), lw=0.8)
for row in range(0, 28, 4):
    ax1.axvline(28 * row, color="0.7", lw=0.6, zorder=0)
ax1.set_xlim(0, 783)
ax1.set_xlabel("position in the vector (28 r + c); grey lines start rows 0, 4, 8, ...")
ax1.set_ylabel("ink (0..255)")
ax1.set_title("the same 784 numbers in one line: each bump is one row crossing the stroke")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## A batch has the shape (B, C, H, W)
#
# Networks take many pictures at once. The training loop of `mnistlab train` draws a batch as a slice
# of a shuffled order of the training set (`epoch_permutation`), then turns bytes into floats with
# zero mean and unit variance (`to_input`). The result has four axes:
#
# - `B`, the batch: which picture;
# - `C`, the channels: 1 for grey, 3 for red, green, blue;
# - `H` and `W`: the rows and columns.
#
# A convolutional network keeps all four. A multi-layer perceptron only wants one vector per
# picture, so it flattens `(B, 1, 28, 28)` to `(B, 784)` first, which is `nn.Flatten()`.

# %%
idx = epoch_permutation(len(ds.train_labels), seed=0, epoch=0)[:64]  # which 64 pictures, (64,)
x = to_input(ds.train_images[idx], ds.mean, ds.std)  # (64, 1, 28, 28) float32
y = ds.train_labels[idx]  # (64,) int64
flat = torch.nn.Flatten()(x)  # (64, 784)
print("batch x", tuple(x.shape), x.dtype, "| labels y", tuple(y.shape), y.dtype, "| flattened", tuple(flat.shape))
assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32, (x.shape, x.dtype)
assert flat.shape == (64, 784) and torch.equal(flat, x.reshape(64, -1)), flat.shape

everything = to_input(ds.train_images, ds.mean, ds.std)  # (1294, 1, 28, 28)
m, s = everything.mean().item(), everything.std().item()
print(f"over the whole training set after to_input: mean {m:+.2e}, std {s:.4f}")
assert abs(m) < 1e-4 and abs(s - 1) < 1e-3, (m, s)

# %% [markdown]
# Eight training pictures of each class. Look at how the thickness of the pen varies: some writers
# press hard, some barely touch the paper. That matters in the next section.

# %%
rng = np.random.default_rng(0)
labels = ds.train_labels.numpy()
rows = [[ds.train_images[i].numpy() for i in rng.choice(np.flatnonzero(labels == k), 8, replace=False)]
        for k in range(10)]
fig = class_rows_figure(rows, [f"class {k}" for k in range(10)], per_class=8,
                        title="digits: 8 training pictures per class")
fig.tight_layout()
display(fig)  # noqa: F821 (the notebook's display)
plt.close(fig)

# %% [markdown]
# ## Dot product against cosine similarity
#
# How alike are two pictures `a` and `b`, seen as vectors (pixels scaled to 0..1)? The **dot
# product** `a . b = sum_i a_i b_i` adds up the ink the two pictures share. It grows with how much
# ink there is at all: a digit written with a bold pen has a bigger dot product with *everything*.
#
# The **cosine similarity** `a . b / (|a| |b|)` divides by both lengths. It measures only the angle
# between the vectors, so the same digit written bolder or fainter (a vector times a number) scores the
# same.
#
# To see the difference, make a picture bolder: each pixel takes the maximum of its 3x3
# neighbourhood (a max-pool with stride 1), which thickens every stroke by one pixel on each side.

# %%
train = ds.train_images.reshape(len(ds.train_images), -1).float() / 255  # (1294, 784), ink in [0, 1]
test = ds.test_images.reshape(len(ds.test_images), -1).float() / 255  # (360, 784)
ytrain, ytest = ds.train_labels, ds.test_labels

thin = test[0]  # (784,)
bold = F.max_pool2d(thin.reshape(1, 1, 28, 28), 3, stride=1, padding=1).reshape(-1)  # thicker strokes, (784,)
dot_thin, dot_bold = train @ thin, train @ bold  # (1294,) each: one dot product per training picture
cos_thin = F.cosine_similarity(train, thin[None], dim=1)  # (1294,)
cos_bold = F.cosine_similarity(train, bold[None], dim=1)
print(f"a test {ytest[0].item()}: ink {thin.sum():.0f}, made bold: ink {bold.sum():.0f}")
print(f"dot product with the training pictures: mean {dot_thin.mean():.1f} (thin) -> {dot_bold.mean():.1f} (bold)")
print(f"bold beats thin on {(dot_bold > dot_thin).float().mean():.1%} of the training pictures by dot product, "
      f"on {(cos_bold > cos_thin).float().mean():.1%} by cosine")
assert bool((dot_bold >= dot_thin).all()), "more ink never lowers a dot product with a picture (all pixels >= 0)"

# cosine ignores scale: twice the ink, the same similarity; the dot product doubles
twice = F.cosine_similarity(train, 2 * thin[None], dim=1)
assert torch.allclose(twice, cos_thin, atol=1e-6), (twice - cos_thin).abs().max()
assert torch.allclose(train @ (2 * thin), 2 * dot_thin), "the dot product scales with the ink"

# %% [markdown]
# Now use each similarity to classify: give each test picture the label of the training picture it is
# most similar to (a nearest-neighbour classifier, no training at all). With the dot product, the
# boldest training pictures are "most similar" to nearly everything.

# %%
dot = test @ train.T  # (360, 1294): every test picture against every training picture
cos = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T  # the same, each vector scaled to length 1
acc_dot = (ytrain[dot.argmax(1)] == ytest).float().mean().item()
acc_cos = (ytrain[cos.argmax(1)] == ytest).float().mean().item()
picked = torch.bincount(dot.argmax(1), minlength=len(train))
top = picked.argmax().item()
print(f"nearest neighbour by dot product: {acc_dot:.1%} of the 360 test pictures right")
print(f"nearest neighbour by cosine:      {acc_cos:.1%}")
print(f"by dot product, one training picture (a {ytrain[top].item()}, ink {train[top].sum():.0f}; "
      f"the mean is {train.sum(1).mean():.0f}) is the nearest of {picked[top].item()} test pictures")
assert acc_cos > 0.95, acc_cos
assert acc_cos - acc_dot > 0.3, (acc_dot, acc_cos)

fig, axes = plt.subplots(1, 4, figsize=(8, 2.4))
near = cos[0].argmax()
panels = [(thin, f"a test picture\n(a {ytest[0].item()})"), (bold, "the same, bold"),
          (train[top], f"nearest of {picked[top].item()} tests\nby dot (a {ytrain[top].item()})"),
          (train[near], f"its nearest\nby cosine (a {ytrain[near].item()})")]
for ax, (pic, title) in zip(axes, panels, strict=True):
    ax.imshow(pic.reshape(28, 28), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Which classes look alike
#
# Average the cosine similarity over every pair of test pictures from class `i` and class `j`: a
# 10 x 10 table. Each class is, on average, closest to itself, and the bright cells off the diagonal
# name the pairs that a pixel-by-pixel comparison confuses.

# %%
unit = F.normalize(test, dim=1)  # (360, 784), every row of length 1
pairs = unit @ unit.T  # (360, 360) cosine similarities
sim = torch.zeros(10, 10)
for i in range(10):
    for j in range(10):
        sim[i, j] = pairs[ytest == i][:, ytest == j].mean()
off = sim.clone().fill_diagonal_(0)
i, j = divmod(off.argmax().item(), 10)
print("mean cosine within a class:", np.round(sim.diag().numpy(), 2))
print(f"the most alike pair of different classes: {i} and {j} ({sim[i, j]:.2f})")
assert torch.equal(sim.argmax(1), torch.arange(10)), "each class is most similar to itself"

fig, ax = plt.subplots(figsize=(4.6, 3.8))
im = ax.imshow(sim, cmap="viridis")
ax.set_xticks(range(10))
ax.set_yticks(range(10))
ax.set_xlabel("class j")
ax.set_ylabel("class i")
ax.set_title("mean cosine similarity, test pictures", fontsize=10)
fig.colorbar(im, ax=ax)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What to remember
#
# - A picture is a `(H, W)` grid; flattened, a vector of `H * W` numbers; a batch is `(B, C, H, W)`.
# - The dot product mixes up "alike" and "a lot of ink". Dividing by the lengths (cosine) removes the
#   scale and leaves the direction. Networks meet the same problem inside, which is one reason for
#   normalisation layers.
#
# ## Where next
#
# Chapter 1 ([01_linear_maps](01_linear_maps.ipynb)): what a matrix does to these vectors. To look at
# the data yourself: `mnistlab data show digits -o grid.png`; the datasets are described in
# [docs/datasets.md](../docs/datasets.md).
