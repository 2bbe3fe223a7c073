"""What a masked-prediction objective learns: BERT's pre-training, on images (MAE, He et al. 2021).

BERT hides 15% of the words of a sentence and learns to predict them from the rest; to do it, it
must learn what words mean in context, and that knowledge transfers to tasks with few labels. An
image is far more redundant than a sentence (a missing patch of a digit can be guessed from its
neighbours by smooth interpolation), so the masked autoencoder hides most of it, 75%, and makes
the encoder look only at what is left. Here a small MAE (the zoo's ViT as encoder, 4 of 16 patches
visible) is pre-trained for a few seconds on the digits' training images, no labels, and then:

- the masking is what it says: an exact number of patches hidden per image, a different choice for
  each image; and the encoder cannot peek (changing hidden pixels changes nothing it computes);
- the reconstruction loss falls well below that of the best guess that knows no image (the patch's
  own mean: loss 1 in per-patch normalised units);
- reconstructions at 25/50/75/90% hidden: the model does best at the ratio it was trained at; with
  more visible it does worse, though the task is easier: its encoder only ever saw 4 tokens;
- a linear probe, with 10 labels per class, on the encoder's features: its accuracy rises with
  pre-training steps. The features were learned from unlabelled images, and they carry the class.
"""

from __future__ import annotations

from pathlib import Path

from mnistlab.labs import Check

TITLE = "masked patch modelling (MAE) on digits: reconstructions at 25-90% hidden; a linear probe improves"

RATIOS = (0.25, 0.5, 0.75, 0.9)
TRAIN_RATIO = 0.75
STEPS, BATCH, PROBE_EVERY, LABELS_PER_CLASS = 400, 128, 100, 10


def run(out: Path | None = None) -> list[Check]:
    import torch

    from mnistlab.data.batches import to_input
    from mnistlab.data.dataset import load_dataset
    from mnistlab.data.subset import stratified_subset
    from mnistlab.evaluate import linear_probe
    from mnistlab.models import create_model
    from mnistlab.models.mae import create_masked_model, hidden_count, patchify, random_mask, unpatchify

    rng_state = torch.get_rng_state()
    torch.manual_seed(0)
    ds = load_dataset("digits")
    x_train = to_input(ds.train_images, ds.mean, ds.std)  # (1294, 1, 28, 28): the images, never their labels
    # the probe's held-out images: validation and test (nothing is chosen on them here)
    x_held = to_input(torch.cat([ds.val_images, ds.test_images]), ds.mean, ds.std)
    y_held = torch.cat([ds.val_labels, ds.test_labels])
    few = stratified_subset(ds.train_labels, LABELS_PER_CLASS, 0, ds.num_classes)  # the probe's 100 labels
    mae = create_masked_model("mae", create_model("vit", num_classes=1))
    enc, n, p = mae.encoder, mae.n_patches, mae.patch
    checks = []

    x = x_held[:64]
    tokens = torch.nn.functional.linear(patchify(x, p), enc.patch_embed.weight.flatten(1), enc.patch_embed.bias)
    exact = torch.equal(unpatchify(patchify(x, p), p), x) and torch.allclose(tokens, enc.patch_embed(x), atol=1e-6)
    checks.append(Check("patchify cuts the image into the ViT's tokens, in its order, and unpatchify undoes it",
                        exact, f"{n} patches of {p}x{p}; round trip exact, tokens equal PatchEmbed's"))

    counts = {r: random_mask(256, n, r).sum(1) for r in RATIOS}
    mask = random_mask(256, n, TRAIN_RATIO)
    distinct = len({tuple(m.tolist()) for m in mask})
    ok = all(bool((c == hidden_count(n, r)).all()) for r, c in counts.items()) and distinct > 200
    checks.append(Check("each image hides exactly round(ratio x 16) patches, its own random choice", ok,
                        ", ".join(f"{r:.0%}: {int(c.min())}-{int(c.max())} hidden" for r, c in counts.items())
                        + f"; {distinct} different masks among 256 images at 75%"))

    mask = random_mask(len(x), n, TRAIN_RATIO)
    poked_hidden = unpatchify(patchify(x, p).masked_fill(mask[..., None], 9.0), p)
    poked_visible = unpatchify(patchify(x, p).masked_fill(~mask[..., None], 9.0), p)
    with torch.no_grad():
        same = torch.equal(mae.encode(x, mask), mae.encode(poked_hidden, mask))
        moved = not torch.equal(mae.encode(x, mask), mae.encode(poked_visible, mask))
    checks.append(Check("the encoder cannot peek: hidden pixels change nothing it computes, visible ones do",
                        same and moved, f"hidden patches set to 9: output {'identical' if same else 'CHANGED'}; "
                                        f"visible ones: {'changed' if moved else 'UNCHANGED'}"))

    def features(images: torch.Tensor) -> torch.Tensor:
        enc.eval()
        with torch.no_grad():
            f = enc.forward_features(images)  # (B, D): the mean of the patch tokens, as fine-tuning uses
        enc.train()
        return f

    def probe() -> float:
        return linear_probe(features(x_train[few]), ds.train_labels[few], features(x_held), y_held)

    gen = torch.Generator().manual_seed(1)
    val_mask = random_mask(len(x_held), n, TRAIN_RATIO, generator=gen)

    def held_loss() -> float:
        mae.eval()
        with torch.no_grad():
            loss = float(mae.loss(x_held, val_mask)[0])
        mae.train()
        return loss

    opt = torch.optim.AdamW(mae.parameters(), lr=1.5e-3, weight_decay=0.05)
    probes, losses = [(0, probe())], [held_loss()]
    order = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = 1.5e-3 * min(1.0, (step + 1) / 20)  # a short warm-up; then constant
        idx = torch.randint(0, len(x_train), (BATCH,), generator=order)
        loss, _ = mae.loss(x_train[idx], random_mask(BATCH, n, TRAIN_RATIO))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % PROBE_EVERY == 0:
            probes.append((step + 1, probe()))
            losses.append(held_loss())
    checks.append(Check("pre-training learns to fill in: held-out loss far below the no-image guess (1.0)",
                        losses[-1] < 0.5 * losses[0] and losses[-1] < 0.5,
                        f"MSE on the hidden patches (normalised per patch): {losses[0]:.3f} at step 0, "
                        f"{losses[-1]:.3f} after {STEPS} steps"))

    mae.eval()
    recon_gen = torch.Generator().manual_seed(2)
    errors, panels = {}, {}
    with torch.no_grad():
        for r in RATIOS:
            m = random_mask(len(x_held), n, r, generator=recon_gen)
            rec = mae.reconstruct(x_held, m)
            per_patch = ((patchify(rec, p) - patchify(x_held, p)) ** 2).mean(-1)  # (B, N), in normalised pixels
            errors[r] = float((per_patch * m).sum() / m.sum())
            panels[r] = (m, rec)
    best = min(errors, key=errors.get)
    checks.append(Check("an MAE is best at the ratio it was trained at, worse with more visible patches",
                        best == TRAIN_RATIO and errors[0.25] > errors[TRAIN_RATIO],
                        "pixel MSE on hidden patches: " + ", ".join(f"{r:.0%} {e:.3f}" for r, e in errors.items())
                        + f" (trained at {TRAIN_RATIO:.0%}: its encoder only ever saw {n - hidden_count(n, 0.75)} "
                          "tokens)"))

    gain = probes[-1][1] - probes[0][1]
    checks.append(Check(f"a linear probe on the features ({LABELS_PER_CLASS} labels per class) improves with "
                        "pre-training", gain >= 0.03,
                        " -> ".join(f"{a:.1%}" for _, a in probes) + " at steps "
                        + ", ".join(str(s) for s, _ in probes) + f" ({gain * 100:+.1f} points; "
                        f"{len(y_held)} held-out digits)"))
    torch.set_rng_state(rng_state)
    if out is not None:
        draw(out, x_held[:8], panels, probes, losses, (ds.mean, ds.std))
    return checks


def draw(out: Path, x, panels: dict, probes: list[tuple[int, float]], losses: list[float],
         stats: tuple[float, float]) -> None:
    from mnistlab.models.mae import hide
    from mnistlab.plots import draw_image_rows, pyplot, save_figure

    plt = pyplot()
    mean, std = stats
    black, white = -mean / std, (1 - mean) / std
    rows = [("original", x)]
    for r, (m, rec) in panels.items():
        rows += [(f"{r:.0%} hidden", hide(x, m[:8], 7)), ("filled in", rec[:8])]
    fig = plt.figure(figsize=(13, 9))
    grid = fig.add_gridspec(2, 2, width_ratios=[1.1, 1])
    ax = fig.add_subplot(grid[:, 0])
    draw_image_rows(ax, [(label, images[:, 0].numpy()) for label, images in rows], black, white)
    ax.set_title("held-out digits: hidden patches (blue), and the MAE's filling-in", fontsize=10)
    ax1, ax2 = fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, 1])
    steps = [s for s, _ in probes]
    ax1.plot(steps, [100 * a for _, a in probes], marker="o")
    ax1.set_xlabel("pre-training steps (no labels)")
    ax1.set_ylabel("linear probe accuracy (%)")
    ax1.set_title(f"a linear classifier on the frozen features, {LABELS_PER_CLASS} labels per class", fontsize=10)
    ax1.grid(True, alpha=0.3)
    ax2.plot(steps, losses, marker="o", color="tab:orange")
    ax2.axhline(1.0, color="0.5", ls="--", lw=1, label="the patch's own mean (no image needed)")
    ax2.set_xlabel("pre-training steps")
    ax2.set_ylabel("MSE on hidden patches")
    ax2.set_title("reconstruction loss, held-out digits, 75% hidden", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(True, alpha=0.3)
    fig.suptitle("Masked patch modelling: hide most of the image, predict it, and the features learn the digits")
    save_figure(fig, out)
