"""Masked image modelling for the zoo's ViT: hide most patches of an image, predict their pixels
(BERT's masked language modelling, on images). No labels anywhere: the image is its own target.

Two ways to do it, both here so that they can be measured against each other (pretrain.py's
docstring says which won, by how much, and so which `mnistlab pretrain` uses by default):

- MAE (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners"): the encoder sees only
  the visible patches (4 of 16 at 75% masking, so it does about a quarter of the work per image);
  a small decoder gets the encoded visible tokens back in their places, one shared learned mask
  token in every hidden place, and predicts the hidden patches' pixels.
- SimMIM (Xie et al. 2021, "SimMIM: A Simple Framework for Masked Image Modeling"): the encoder
  sees every position, the hidden patches' embeddings replaced by a learned mask token; one linear
  layer maps each encoded token to its patch's pixels.

Both compute the same loss, so that the comparison is about where the masking happens and what
decodes: mean squared error on the hidden patches only (predicting what is visible teaches
nothing), against the patch's pixels normalised per patch to zero mean and unit variance (MAE's
norm_pix_loss: the model must get a patch's shape right, not just its brightness). The encoder is
the zoo's `vit`, unchanged but for its classification head, which is the fine-tuning's to learn;
a pre-trained encoder's weights therefore load into `create_model("vit", ...)` as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mnistlab.models.vit import Block, ViT

NORM_PIX_EPS = 1e-6  # MAE's: a blank patch's target stays all zeros instead of dividing by 0


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*p*p): patches in row-major order, the order of ViT's PatchEmbed tokens."""
    b, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    return x.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * patch * patch)


def unpatchify(patches: torch.Tensor, patch: int, channels: int = 1) -> torch.Tensor:
    """(B, N, C*p*p) -> (B, C, H, W), the inverse of patchify for a square grid of N patches."""
    b, n, _ = patches.shape
    g = round(n**0.5)
    return patches.reshape(b, g, g, channels, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(
        b, channels, g * patch, g * patch)


def hidden_count(n: int, ratio: float) -> int:
    """How many of n patches a mask ratio hides: round(ratio * n), at least 1 and at most n - 1
    (with nothing hidden there is no loss; with nothing visible, nothing to predict from)."""
    return min(max(round(ratio * n), 1), n - 1)


def random_mask(batch: int, n: int, ratio: float, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N) bool, True where a patch is hidden: exactly hidden_count(n, ratio) per image, each image its own
    uniformly random choice (MAE's per-sample shuffle). Draws from `generator`, or torch's global RNG."""
    noise = torch.rand(batch, n, generator=generator, device="cpu" if generator is not None else device)
    ranks = noise.argsort(1).argsort(1)  # (B, N): each patch's place in a random order of the image's patches
    return (ranks < hidden_count(n, ratio)).to(device)


def visible_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, N) mask -> (B, n_visible) indices of the visible patches, in row-major order."""
    n_visible = int((~mask[0]).sum())
    return mask.to(torch.int8).argsort(dim=1, stable=True)[:, :n_visible]  # False (0) sorts first, in place order


def hide(x: torch.Tensor, mask: torch.Tensor, patch: int, fill: float = float("nan")) -> torch.Tensor:
    """x (B, C, H, W) with its hidden patches set to `fill` (NaN: a figure draws them in a colour of their own)."""
    patches = patchify(x, patch)
    return unpatchify(patches.masked_fill(mask[..., None], fill), patch, x.shape[1])


class MaskedImageModel(nn.Module):
    """What MAE and SimMIM share: the encoder (a zoo ViT without its head), the target and the loss."""

    def __init__(self, encoder: ViT, norm_pix_loss: bool = True):
        super().__init__()
        encoder.head = nn.Identity()  # the classifier is the fine-tuning's; nothing to learn it from here
        self.encoder = encoder
        self.patch = encoder.patch_embed.kernel_size[0]
        self.in_chans = encoder.patch_embed.in_channels
        self.dim = encoder.pos_embed.shape[-1]
        self.n_patches = encoder.pos_embed.shape[1] - (encoder.cls_token is not None)
        self.norm_pix_loss = norm_pix_loss

    def _with_positions(self, t: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, D) plus their position embeddings; the class token (if any) prepended, as ViT.tokens."""
        enc = self.encoder
        t = t + enc.pos_embed[:, -self.n_patches:]
        if enc.cls_token is not None:
            cls = enc.cls_token + enc.pos_embed[:, :1]
            t = torch.cat([cls.expand(t.shape[0], -1, -1), t], dim=1)
        return t

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted pixels of every patch, (B, N, C*p*p), in the target's units; only hidden ones are scored."""
        raise NotImplementedError

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """What the model is asked to predict: x's patches (B, N, C*p*p), normalised per patch if norm_pix_loss."""
        t = patchify(x, self.patch)
        if not self.norm_pix_loss:
            return t
        mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
        return (t - mean) / (var + NORM_PIX_EPS).sqrt()

    def loss(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean squared error over the hidden patches' pixels, the prediction (B, N, C*p*p))."""
        pred = self(x, mask)
        per_patch = ((pred - self.target(x)) ** 2).mean(-1)  # (B, N)
        return (per_patch * mask).sum() / mask.sum(), pred

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) with its hidden patches replaced by the prediction, in x's units: what a figure shows.

        A per-patch normalised prediction has no brightness of its own: it is given the true patch's mean and
        variance back (as the MAE paper's figures do), so only its shape is the model's."""
        pred, patches = self(x, mask), patchify(x, self.patch)
        if self.norm_pix_loss:
            mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
            pred = pred * (var + NORM_PIX_EPS).sqrt() + mean
        return unpatchify(torch.where(mask[..., None], pred, patches), self.patch, self.in_chans)


class MAE(MaskedImageModel):
    """The encoder sees the visible patches only; a small transformer decoder fills in the rest."""

    def __init__(self, encoder: ViT, norm_pix_loss: bool = True, decoder_dim: int = 64, decoder_depth: int = 1,
                 decoder_heads: int = 4):
        super().__init__(encoder, norm_pix_loss)
        self.decoder_embed = nn.Linear(self.dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_dim) * 0.02)
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, self.n_patches, decoder_dim) * 0.02)
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, 2.0, 0.0)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.in_chans * self.patch**2)

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The visible patches through the encoder: (B, n_visible, D), in row-major order (class token dropped)."""
        enc = self.encoder
        t = enc.patch_embed(x) + enc.pos_embed[:, -self.n_patches:]  # (B, N, D)
        keep = visible_index(mask)  # (B, n_visible)
        t = t.gather(1, keep[..., None].expand(-1, -1, t.shape[-1]))  # (B, n_visible, D): hidden patches dropped
        if enc.cls_token is not None:
            cls = enc.cls_token + enc.pos_embed[:, :1]
            t = torch.cat([cls.expand(t.shape[0], -1, -1), t], dim=1)
        z = enc.norm(enc.blocks(t))
        return z[:, 1:] if enc.cls_token is not None else z

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.decoder_embed(self.encode(x, mask))  # (B, n_visible, Dd)
        b, n = mask.shape
        keep = visible_index(mask)
        # every place a mask token, then the encoded visible tokens written back into their own places
        full = self.mask_token.expand(b, n, -1).scatter(1, keep[..., None].expand(-1, -1, z.shape[-1]), z)
        full = full + self.decoder_pos_embed  # (B, N, Dd): the decoder must know which place it fills
        return self.decoder_pred(self.decoder_norm(self.decoder_blocks(full)))


class SimMIM(MaskedImageModel):
    """The encoder sees every place, hidden patches as a learned mask token; a linear layer predicts pixels."""

    def __init__(self, encoder: ViT, norm_pix_loss: bool = True):
        super().__init__(encoder, norm_pix_loss)
        self.mask_token = nn.Parameter(torch.randn(1, 1, self.dim) * 0.02)
        self.pred = nn.Linear(self.dim, self.in_chans * self.patch**2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        t = torch.where(mask[..., None], self.mask_token, enc.patch_embed(x))  # (B, N, D): hidden -> mask token
        z = enc.norm(enc.blocks(self._with_positions(t)))
        return self.pred(z[:, 1:] if enc.cls_token is not None else z)


METHODS = {"mae": MAE, "simmim": SimMIM}


def create_masked_model(method: str, encoder: ViT, norm_pix_loss: bool = True, decoder_dim: int = 64,
                        decoder_depth: int = 1, decoder_heads: int = 4) -> MaskedImageModel:
    """MAE or SimMIM around `encoder`; the decoder options apply to MAE (SimMIM's decoder is one linear layer)."""
    if method == "mae":
        return MAE(encoder, norm_pix_loss, decoder_dim, decoder_depth, decoder_heads)
    if method == "simmim":
        return SimMIM(encoder, norm_pix_loss)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
