"""Attention from scratch: Query, Key, Value, the scaled dot product, softmax, heads.

Every position looks at every other (the notes): token i asks with its query q_i, every token j
answers with its key k_j, the match q_i . k_j / sqrt(d) becomes a weight by softmax over j, and
token i receives the weighted mean of the values v_j. Dividing by sqrt(d) keeps the scores' spread
independent of the head size d, so softmax does not saturate into a one-hot. Heads split the
model dimension so that each head can match on something different. Nothing here knows about
order: permuting the tokens permutes the output (positions must be added, as the ViT does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mnistlab.labs import Check

TITLE = "QKV attention from scratch = torch's (SDPA and nn.MultiheadAttention); heatmap of the weights"


def softmax(s: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(s - s.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def scaled_dot_product_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                                 causal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """q, k, v (..., T, d) -> (output (..., T, d), weights (..., T, T)); causal: token i sees j <= i only."""
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])  # (..., T, T): q_i . k_j / sqrt(d)
    if causal:
        t = scores.shape[-1]
        scores = np.where(np.tril(np.ones((t, t), dtype=bool)), scores, -np.inf)
    weights = softmax(scores)  # each row sums to 1
    return weights @ v, weights


def multi_head_attention(x: np.ndarray, w_qkv: np.ndarray, b_qkv: np.ndarray, w_out: np.ndarray,
                         b_out: np.ndarray, heads: int) -> tuple[np.ndarray, np.ndarray]:
    """x (B, T, D) -> (B, T, D) and weights (B, heads, T, T); weights in torch's nn.MultiheadAttention layout."""
    b, t, d = x.shape
    qkv = x @ w_qkv.T + b_qkv  # (B, T, 3D)
    q, k, v = (a.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, axis=-1))
    out, weights = scaled_dot_product_attention(q, k, v)  # (B, H, T, d/H), (B, H, T, T)
    out = out.transpose(0, 2, 1, 3).reshape(b, t, d)  # heads side by side again
    return out @ w_out.T + b_out, weights


def patches(img: np.ndarray, size: int = 7) -> np.ndarray:
    """(H, W) -> (H/size * W/size, size*size): the image as a sequence of patch tokens, row by row."""
    h, w = img.shape
    return img.reshape(h // size, size, w // size, size).transpose(0, 2, 1, 3).reshape(-1, size * size)


def run(out: Path | None = None) -> list[Check]:
    import torch
    import torch.nn.functional as TF

    rng = np.random.default_rng(0)
    checks = []
    q, k, v = (rng.standard_normal((2, 4, 9, 16)) for _ in range(3))
    errs = []
    for causal in (False, True):
        ours, _ = scaled_dot_product_attention(q, k, v, causal)
        theirs = TF.scaled_dot_product_attention(*(torch.from_numpy(a) for a in (q, k, v)), is_causal=causal)
        errs.append(np.abs(ours - theirs.numpy()).max())
    checks.append(Check("scaled dot-product attention equals torch's F.scaled_dot_product_attention",
                        max(errs) < 1e-12, f"max |diff| {errs[0]:.1e} (full), {errs[1]:.1e} (causal), float64"))

    d, heads = 32, 4
    mha = torch.nn.MultiheadAttention(d, heads, batch_first=True, dtype=torch.float64)
    x = rng.standard_normal((3, 10, d))
    params = [p.detach().numpy() for p in (mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight,
                                          mha.out_proj.bias)]
    ours, w_ours = multi_head_attention(x, *params, heads=heads)
    theirs, w_theirs = mha(*(torch.from_numpy(x),) * 3, average_attn_weights=False)
    err, werr = np.abs(ours - theirs.detach().numpy()).max(), np.abs(w_ours - w_theirs.detach().numpy()).max()
    checks.append(Check("multi-head attention (QKV projections, 4 heads, output projection) equals "
                        "torch.nn.MultiheadAttention with the same weights", max(err, werr) < 1e-12,
                        f"outputs max |diff| {err:.1e}, weights {werr:.1e}"))
    rows = np.abs(w_ours.sum(-1) - 1).max()
    checks.append(Check("each token's weights are a distribution (sum to 1)", rows < 1e-12,
                        f"max |sum - 1| {rows:.1e}"))
    perm = rng.permutation(10)
    permuted, _ = multi_head_attention(x[:, perm], *params, heads=heads)
    err = np.abs(permuted - ours[:, perm]).max()
    checks.append(Check("without positions attention ignores order: permuting tokens permutes the output",
                        err < 1e-12, f"max |attn(Px) - P attn(x)| {err:.1e}"))
    peak = {}
    for scaled in (True, False):
        qq, kk = rng.standard_normal((2, 64, 256, 512))  # head size 512
        s = qq @ np.swapaxes(kk, -1, -2) / (np.sqrt(512) if scaled else 1.0)
        peak[scaled] = softmax(s).max(-1).mean()
    checks.append(Check("dividing by sqrt(d) keeps softmax from saturating (d = 512, random q and k)",
                        peak[True] < 0.2 < 0.9 < peak[False],
                        f"mean largest weight per row: {peak[True]:.3f} scaled, {peak[False]:.3f} unscaled"))
    if out is not None:
        draw(out)
    return checks


def draw(out: Path) -> None:
    from mnistlab.labs.fft import sample_image
    from mnistlab.plots import pyplot, save_figure

    img, name = sample_image()
    tokens = patches(img)  # (16, 49)
    tokens = (tokens - tokens.mean()) / tokens.std()  # standardised pixels, so that dot products are O(d)
    # identity projections: q = k = v = the patch itself, so a patch attends to patches that look like it
    _, w = scaled_dot_product_attention(tokens[None], tokens[None], tokens[None])
    w = w[0]
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    axes[0].imshow(img, cmap="gray")
    for c in range(1, 4):
        axes[0].axhline(c * 7 - 0.5, color="tab:orange", lw=0.8)
        axes[0].axvline(c * 7 - 0.5, color="tab:orange", lw=0.8)
    for i in range(16):
        axes[0].text((i % 4) * 7 + 0.5, (i // 4) * 7 + 1.5, str(i), color="tab:orange", fontsize=9)
    axes[0].set_title(f"{name}: 16 tokens of 7x7", fontsize=9)
    im = axes[1].imshow(w, cmap="viridis")
    axes[1].set_xlabel("key token j")
    axes[1].set_ylabel("query token i")
    axes[1].set_xticks(range(16))
    axes[1].set_yticks(range(16))
    axes[1].set_title("softmax(q_i . k_j / sqrt(49)), q = k = v = patch")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    query = 13  # the bottom edge of the sole (its top row) over background
    axes[2].imshow(img, cmap="gray")
    overlay = np.kron(w[query].reshape(4, 4), np.ones((7, 7)))
    axes[2].imshow(overlay, cmap="magma", alpha=0.6)
    axes[2].add_patch(plt.Rectangle(((query % 4) * 7 - 0.5, (query // 4) * 7 - 0.5), 7, 7, fill=False,
                                    ec="cyan", lw=2))
    axes[2].set_title(f"where token {query} (cyan) looks: its row of weights")
    for ax in (axes[0], axes[2]):
        ax.axis("off")
    save_figure(fig, out)
