# %% [markdown]
# # Chapter 8: Attention and the Vision Transformer
#
# A convolution looks at a fixed neighbourhood; a recurrent network reads one step after another.
# **Attention** lets every position look at every other position at once, and decide by itself
# where to look. Here, in order:
#
# 1. attention written out by hand, `softmax(Q K^T / sqrt(d)) V`, checked against PyTorch's own
#    `scaled_dot_product_attention`;
# 2. why the division by `sqrt(d)`: without it the softmax saturates (measured by its entropy);
# 3. attention has no idea of order: positions must be added;
# 4. the Vision Transformer (ViT) from mnistlab's zoo: a digit cut into 16 patches, a short training
#    on the bundled digits, and where its class token looks.

# %%
import math
import tempfile

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import mnistlab
from mnistlab.data import load_dataset
from mnistlab.data.batches import to_input
from mnistlab.labs import attention as lab  # the numpy version of the same formulas

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny tensors: a second thread only waits for the first

# %% [markdown]
# ## Query, key, value by hand
#
# Each of the `T` tokens is a vector of `D` numbers. Three linear maps turn every token into
# a **query** (what am I looking for?), a **key** (what do I offer?) and a **value** (what I hand
# over when chosen). Token `i` compares its query with every key, `q_i . k_j`, turns the `T`
# scores into weights with a softmax (positive, summing to 1), and receives the weighted mean of
# the values. In matrix form, for the whole sequence at once:
#
#     Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V

# %%
B, T, D, d = 2, 5, 16, 8  # batch, tokens, model width, query/key/value width
x = torch.randn(B, T, D)  # (B, T, D): two sequences of five tokens
W_q, W_k, W_v = (torch.randn(D, d) / math.sqrt(D) for _ in range(3))  # (D, d) each

Q, K, V = x @ W_q, x @ W_k, x @ W_v  # (B, T, d) each
scores = Q @ K.transpose(-2, -1) / math.sqrt(d)  # (B, T, T): scores[b, i, j] = q_i . k_j / sqrt(d)
weights = torch.softmax(scores, dim=-1)  # (B, T, T): row i is where token i looks
out = weights @ V  # (B, T, d): token i gets sum_j weights[i, j] v_j

theirs = F.scaled_dot_product_attention(Q, K, V)  # PyTorch's fused version, (B, T, d)
ours_np, _ = lab.scaled_dot_product_attention(Q.double().numpy(), K.double().numpy(), V.double().numpy())

print("out", tuple(out.shape), "| weights", tuple(weights.shape))
print(f"max |by hand - torch SDPA| = {(out - theirs).abs().max():.1e}")
err_np = (out.double() - torch.from_numpy(ours_np)).abs().max()
print(f"max |by hand - mnistlab.labs.attention (numpy, float64)| = {err_np:.1e}")
print("token 0's weights in sequence 0:", np.round(weights[0, 0].numpy(), 3))
assert torch.allclose(out, theirs, atol=1e-6), "softmax(QK^T/sqrt(d))V is what scaled_dot_product_attention computes"
assert np.allclose(out.double().numpy(), ours_np, atol=1e-6), "the lab's numpy attention gives the same numbers"
assert torch.allclose(weights.sum(-1), torch.ones(B, T)), "each row of weights sums to 1"
assert (weights > 0).all(), "softmax weights are positive: every token sees every other a little"

# %% [markdown]
# ## Why divide by sqrt(d)?
#
# If the entries of `q` and `k` have variance 1, their dot product is a sum of `d` such products:
# its variance is `d`. With a head width of 512, scores spread over tens of units, and a softmax
# of numbers that far apart is practically one-hot: every token looks at a single other token,
# and the gradient through the other weights vanishes. Dividing by `sqrt(d)` brings the variance
# back to 1 for every `d`.
#
# The **entropy** of a row of weights, `-sum_j w_j log w_j`, measures how spread it is: `log T`
# when the weights are uniform, 0 when one weight is 1. Below, random queries and keys, 64 tokens.

# %%
T_long = 64
widths = [4, 16, 64, 256, 1024]
gen = torch.Generator().manual_seed(1)


def entropy(w: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of weights (..., T) -> (...)."""
    return -(w * torch.log(w.clamp_min(1e-30))).sum(-1)


rows = []
for width in widths:
    q = torch.randn(256, T_long, width, generator=gen)  # (256, 64, d): 256 independent sequences
    k = torch.randn(256, T_long, width, generator=gen)
    s = q @ k.transpose(-2, -1)  # (256, 64, 64) raw scores, variance ~ d
    h_raw = entropy(torch.softmax(s, -1)).mean().item()
    h_scaled = entropy(torch.softmax(s / math.sqrt(width), -1)).mean().item()
    top_raw = torch.softmax(s, -1).amax(-1).mean().item()  # the largest weight of a row, on average
    rows.append((width, s.std().item(), h_scaled, h_raw, top_raw))
    print(f"d={width:5d}: score std {s.std():6.2f} | entropy scaled {h_scaled:.2f} nats, unscaled {h_raw:.2f} "
          f"(uniform: log 64 = {math.log(T_long):.2f}) | largest unscaled weight {top_raw:.2f}")

stds = np.array([r[1] for r in rows])
h_scaled, h_raw = np.array([r[2] for r in rows]), np.array([r[3] for r in rows])
assert np.allclose(stds, np.sqrt(widths), rtol=0.05), ("the raw score's spread grows like sqrt(d)", stds)
assert h_scaled.max() - h_scaled.min() < 0.1, ("scaled, the entropy is the same for every d", h_scaled)
assert h_raw[-1] < 0.3 < 3.0 < h_scaled[-1], ("unscaled at d=1024 the softmax is nearly one-hot", h_raw[-1])
assert rows[-1][4] > 0.85, ("unscaled, one weight takes nearly everything", rows[-1][4])

fig, ax = plt.subplots(figsize=(7, 3))
ax.semilogx(widths, h_scaled, "o-", label="softmax(q.k / sqrt(d))")
ax.semilogx(widths, h_raw, "s-", label="softmax(q.k), unscaled")
ax.axhline(math.log(T_long), color="0.5", ls="--", lw=1, label="uniform weights (log 64)")
ax.set_xlabel("head width d")
ax.set_ylabel("entropy per row (nats)")
ax.set_title("without the sqrt(d), the softmax saturates as d grows")
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
plt.tight_layout()

# %% [markdown]
# ## Attention does not know the order
#
# Nothing in the formula says which token came first: shuffle the tokens and the outputs are
# shuffled the same way, with the same values. A sentence or an image has an order, so a
# Transformer **adds a position embedding** to each token before the first attention layer.

# %%
perm = torch.randperm(T)
shuffled = F.scaled_dot_product_attention(Q[:, perm], K[:, perm], V[:, perm])  # (B, T, d)
err = (shuffled - out[:, perm]).abs().max().item()
print(f"max |attention(shuffled tokens) - shuffled attention| = {err:.1e}")
assert err < 1e-6, "permuting the tokens permutes the output, nothing more"

# %% [markdown]
# ## A digit as 16 tokens
#
# The ViT (Dosovitskiy et al. 2021) reads an image as a sentence of patches: a 28x28 digit cut into
# 7x7 squares gives 4 x 4 = 16 tokens of 49 pixels each, read row by row. One linear map turns each
# patch into a `D`-vector, a learned position embedding is added, and a **class token** (CLS), one
# extra learned vector, is put in front: after the attention blocks, the classifier reads only that
# token, so it must learn to gather from the patches whatever tells the digit.

# %%
ds = load_dataset("digits")  # sklearn's 8x8 digits drawn at 28x28, offline
img = ds.test_images[3].numpy().astype(float)  # (28, 28)
tokens = lab.patches(img, 7)  # (16, 49): patch p is rows 7*(p//4).., columns 7*(p%4)..
print("image", img.shape, "-> tokens", tokens.shape, "| label", ds.classes[int(ds.test_labels[3])])
assert tokens.shape == (16, 49)
assert np.array_equal(tokens[5].reshape(7, 7), img[7:14, 7:14]), "token 5 is the second patch of the second row"

fig, axes = plt.subplots(1, 2, figsize=(8, 3), gridspec_kw=dict(width_ratios=[1, 2.6]))
axes[0].imshow(img, cmap="gray_r")
for c in range(1, 4):
    axes[0].axhline(7 * c - 0.5, color="tab:orange", lw=0.8)
    axes[0].axvline(7 * c - 0.5, color="tab:orange", lw=0.8)
axes[0].set_title("a digit, cut into 7x7 patches", fontsize=9)
axes[0].axis("off")
axes[1].imshow(tokens, cmap="gray_r", aspect="auto")
axes[1].set_xlabel("the patch's 49 pixels")
axes[1].set_ylabel("token (patch) index")
axes[1].set_title("the same digit as 16 tokens of 49 numbers", fontsize=9)
plt.tight_layout()

# %% [markdown]
# ## Train a small ViT on the digits
#
# The zoo's ViT (`mnistlab models` lists it) pools its tokens by their mean by default; here we ask
# for a class token (`pool="cls"`) so that there is one token whose attention tells where the
# model looks. It is shrunk (width 32, 2 blocks, 4 heads) so it trains in seconds; the same call
# is `mnistlab train --dataset digits --model vit --model-arg pool=cls --model-arg dim=32 ...`.

# %%
run = mnistlab.train(dataset="digits", model="vit", model_arg={"pool": "cls", "dim": 32, "depth": 2, "heads": 4},
                     epochs=8, lr=3e-3, threads=1, seed=0, run_dir=tempfile.mkdtemp() + "/vit", quiet=True)
acc = run.results["test_accuracy"]
print(f"test accuracy {acc:.1%} after {run.results['epochs']} epochs ({run.results['train_seconds']:.1f} s training)")
assert acc > 0.8, ("a few seconds of training already read most digits", acc)

vit = mnistlab.load(run.path).model  # the torch module, in eval mode
print(type(vit).__name__, "| blocks:", len(vit.blocks), "| heads:", vit.blocks[0].attn.heads)

# %% [markdown]
# ## Where the class token looks
#
# The zoo's ViT writes its attention out (Q, K, V projections, the scaled dot product, the softmax),
# and `attention_maps(x)` hands back each block's weights, `(B, heads, T, T)` with `T = 1 + 16`.
# First a check that those weights are the formula above: catch the input of the first attention
# layer with a forward hook, apply the layer's own `qkv` weights by hand, and compare.

# %%
x = to_input(ds.test_images[:8], ds.mean, ds.std)  # (8, 1, 28, 28), normalised as in training
maps = vit.attention_maps(x)  # list of (8, heads, 17, 17), one per block

caught = {}
attn0 = vit.blocks[0].attn
hook = attn0.register_forward_hook(lambda module, inputs, output: caught.update(x=inputs[0]))
with torch.no_grad():
    vit(x)
hook.remove()
with torch.no_grad():
    t = caught["x"]  # (8, 17, D): the tokens entering the first attention layer (after LayerNorm)
    b, n, dim = t.shape
    q, k, v = attn0.qkv(t).reshape(b, n, 3, attn0.heads, dim // attn0.heads).permute(2, 0, 3, 1, 4)  # (8, h, 17, D/h)
    by_hand = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # (8, h, 17, 17)
err = (by_hand - maps[0]).abs().max().item()
print("attention maps:", [tuple(m.shape) for m in maps], f"| max |by hand - the model's| = {err:.1e}")
assert err < 1e-5, "the ViT's attention is softmax(QK^T / sqrt(d)) computed from its own weights"

cls_to_patches = maps[-1][:, :, 0, 1:]  # (8, heads, 16): the CLS row of the last block, over the patches
print("CLS weights on the patches sum to", np.round(cls_to_patches.sum(-1)[0].numpy(), 3),
      "per head (the rest goes to the CLS token itself)")
assert (cls_to_patches.sum(-1) <= 1 + 1e-6).all()

# %% [markdown]
# Below, for four test digits: the picture, and the last block's CLS attention over the 16 patches
# (averaged over the heads), drawn on the picture. Early in training the pattern is rough; it is
# what this model, after a few seconds, reads to decide. `mnistlab lab attention` draws the same
# formula on a Fashion-MNIST image.

# %%
fig, axes = plt.subplots(2, 4, figsize=(8, 4.4))
with torch.no_grad():
    guesses = vit(x).argmax(1)
for col in range(4):
    picture = ds.test_images[col].numpy()
    heat = cls_to_patches[col].mean(0).reshape(4, 4).numpy()  # (4, 4) mean over heads
    axes[0, col].imshow(picture, cmap="gray_r")
    axes[0, col].set_title(f"label {ds.classes[int(ds.test_labels[col])]}, says {ds.classes[int(guesses[col])]}",
                           fontsize=9)
    axes[1, col].imshow(np.kron(heat, np.ones((7, 7))), cmap="magma", vmin=0)  # each patch in its weight's colour
    axes[1, col].contour(picture, levels=[100], colors="cyan", linewidths=0.8)  # the digit's outline on top
    axes[1, col].set_title(f"CLS attention, max {heat.max():.2f}", fontsize=9)
for ax in axes.flat:
    ax.axis("off")
fig.suptitle("top: test digits; bottom: where the class token looks (last block, mean of 4 heads; bright = more)",
             fontsize=10)
plt.tight_layout()

# %% [markdown]
# ## Where next
#
# Chapter 9 hides most of the patches and asks the ViT to fill them in: BERT's pre-training, on
# images. The full-size ViT: `mnistlab train --dataset fashion-mnist --model vit`; the attention lab:
# `mnistlab lab attention -o attention.png`; the model: `mnistlab/models/vit.py`.
