# %% [markdown]
# # Chapter 5: The complete training loop in one screen
#
# `mnistlab train` does a lot around its loop: run folders, checkpoints, resume, progress bars,
# torchrun, TensorBoard. None of that changes a single weight. This chapter proves it: it runs a
# real command,
#
# ```
# mnistlab train --dataset digits --model mlp --epochs 5
# ```
#
# then trains the same network again with a loop written in plain PyTorch, about sixty lines, with
# no part of mnistlab's engine in it, and checks that the two give **the same test accuracy and the
# very same final weights, bit for bit**. If the engine hid a trick (a secret warm-up, a smarter
# sampler, a cleverer loss), the two would differ.
#
# Bit for bit is a strong demand: floating-point arithmetic rounds after every operation, so the
# same mathematics written in a different order gives different last bits, and after hundreds of
# steps those differences grow. Getting it exact forces us to name every detail the engine uses,
# which is the lesson of this chapter.

# %%
import math
import tempfile
import time

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

import mnistlab
from mnistlab.data import load_dataset

# %% [markdown]
# ## The command
#
# `mnistlab.train(**flags)` is `mnistlab train` with its flags as keywords: the same parser, the
# same defaults, the same code. We write the run folder into a temporary directory. The run saves
# the configuration it resolved (`config.json`): the flags we gave, plus the defaults for the `mlp`
# model and the adjustments for the small `digits` set (more epochs, smaller batches). We print the
# values that matter to the loop: they are all the loop below needs to know. (Without `--epochs 5`
# the run takes the digits default of 15 epochs; 5 keep this page quick.)

# %%
start = time.perf_counter()
run = mnistlab.train(dataset="digits", model="mlp", epochs=5, run_dir=tempfile.mkdtemp() + "/mlp", quiet=True)
engine_seconds = time.perf_counter() - start
cfg = run.record.config()  # config.json: every value the run used, defaults included
engine_epochs = run.record.metrics()  # metrics.jsonl: one record per epoch
print(f"mnistlab train --dataset digits --model mlp --epochs 5: {engine_seconds:.1f} s")
print({k: cfg[k] for k in ("seed", "epochs", "batch_size", "optimizer", "lr", "schedule", "warmup", "weight_decay",
                           "label_smoothing", "augment", "grad_clip", "precision")})
print(f"test accuracy {run.results['test_accuracy']:.4f} on {len(load_dataset('digits').test_labels)} test images")

# None of the features that would need more lines is on: no augmentation, no clipping, no label smoothing, fp32
assert cfg["optimizer"] == "adamw" and cfg["schedule"] == "onecycle" and cfg["precision"] == "fp32", cfg
assert cfg["augment"] == "none" and cfg["grad_clip"] is None and cfg["label_smoothing"] == 0.0, cfg

# %% [markdown]
# ## The data
#
# The arrays come from mnistlab's loader, the same function the command called: the 1,797 digits
# split into train, validation (a fixed tenth of train, chosen by a seed of its own) and test. The
# point of this chapter is the loop, not the loading; chapter 0 looked at these tensors.

# %%
ds = load_dataset("digits")
print(ds.summary())
print("train", tuple(ds.train_images.shape), ds.train_images.dtype, "| labels", tuple(ds.train_labels.shape))
assert ds.train_images.shape == (1294, 28, 28) and ds.test_images.shape == (360, 28, 28), ds.summary()

# %% [markdown]
# ## The loop
#
# Everything that decides the weights is in the next cell, in the order it happens:
#
# 1. **The model.** The registry's `mlp` is Flatten, Linear(784, 256), ReLU, Linear(256, 128), ReLU,
#    Linear(128, 10). `torch.manual_seed(seed)` right before creating the layers makes the random
#    initial weights the same: the same layers created in the same order draw the same numbers.
# 2. **The optimizer.** AdamW, with weight decay on the weight matrices only (decaying a bias does
#    not make the network simpler, it only moves it), and `fused=True`, as the engine asks for.
# 3. **The schedule.** One-cycle: the learning rate climbs linearly from lr/25 to lr over the first
#    20% of the steps (the warm-up), then falls linearly to lr/10,000.
# 4. **The order.** Each epoch shuffles the training images with a generator seeded by
#    `(seed, epoch)` only: a pure function, so a resumed run recomputes the same order.
# 5. **The step.** Normalise the batch, forward, cross-entropy, zero the gradients, backward, step.
#
# At the end of each epoch the loop measures validation accuracy (in `eval` mode, without
# gradients), as the engine does for its epoch line; that changes no weight.

# %%
def accuracy(model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, normalise) -> tuple[int, float]:
    """(number correct, fraction correct) of `model` on uint8 images (N, 28, 28)."""
    model.eval()
    with torch.no_grad():
        correct = (model(normalise(images_u8)).argmax(1) == labels).sum().item()
    model.train()
    return correct, correct / len(labels)


def train_plain(ds, seed=0, epochs=5, batch_size=64, lr=2e-3, weight_decay=0.05, warmup=0.2, fused=True):
    """`mnistlab train --dataset digits --model mlp --epochs 5` in plain PyTorch: the model, epoch records, test."""
    # 1. the model, from the seed
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    # 2. AdamW: weight decay on matrices (ndim 2), none on biases (ndim 1)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([dict(params=[p for p in params if p.ndim >= 2], weight_decay=weight_decay),
                                   dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)],
                                  lr=lr, betas=(0.9, 0.999), fused=fused)
    n = len(ds.train_labels)
    steps_per_epoch = math.ceil(n / batch_size)  # 21: twenty batches of 64 and a last one of 14
    total = steps_per_epoch * epochs
    warm = max(1, round(warmup * total))

    # 3. one-cycle: linear warm-up from lr/25 to lr, then linear decay to lr/1e4
    def lr_at(step: int) -> float:
        if step < warm:
            return lr / 25 + (lr - lr / 25) * (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)  # 0 -> 1
        return lr * (1 - progress) + (lr / 1e4) * progress

    def normalise(u8: torch.Tensor) -> torch.Tensor:  # (B, 28, 28) uint8 -> (B, 1, 28, 28) float32
        return (u8.unsqueeze(1).to(torch.float32) - 255.0 * ds.mean) * (1.0 / (255.0 * ds.std))

    records, lrs, step = [], [], 0
    for epoch in range(epochs):
        # 4. this epoch's order: a function of (seed, epoch) alone
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        loss_sum, correct = 0.0, 0
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]  # (B,)
            x, y = normalise(ds.train_images[idx]), ds.train_labels[idx]  # (B, 1, 28, 28), (B,)
            # 5. the step
            lrs.append(lr_at(step))
            for group in optimizer.param_groups:
                group["lr"] = lrs[-1]
            logits = model(x)  # (B, 10)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(idx)  # the epoch line's mean training loss and accuracy
            correct += (logits.argmax(1) == y).sum().item()
        val_correct, val_acc = accuracy(model, ds.val_images, ds.val_labels, normalise)
        records.append(dict(epoch=epoch + 1, train_loss=loss_sum / n, train_accuracy=correct / n,
                            val_accuracy=val_acc))
    test_correct, test_acc = accuracy(model, ds.test_images, ds.test_labels, normalise)
    return model, records, dict(test_correct=test_correct, test_accuracy=test_acc, lrs=lrs)


# %% [markdown]
# ## Run it, and compare
#
# The engine's final weights are in its run folder; `run.load().model` reads them back. We compare
# four things: the test accuracy, the number of correct test images, every epoch line of
# `metrics.jsonl` (training loss, training accuracy, validation accuracy), and every weight, with
# `torch.equal` (equal in every bit, no tolerance).

# %%
start = time.perf_counter()
plain_model, plain_epochs, plain = train_plain(ds, seed=cfg["seed"], epochs=cfg["epochs"],
                                               batch_size=cfg["batch_size"], lr=cfg["lr"],
                                               weight_decay=cfg["weight_decay"], warmup=cfg["warmup"])
plain_seconds = time.perf_counter() - start
engine_model = run.load().model
n_test = len(ds.test_labels)
engine_correct = round(run.results["test_accuracy"] * n_test)
print(f"plain loop: {plain_seconds:.1f} s; the engine's {engine_seconds:.1f} s include first-time imports (which the "
      "plain loop finds loaded), its run folder, checkpoints and final evaluation: not a race")
print(f"test accuracy  engine {run.results['test_accuracy']:.6f} ({engine_correct}/{n_test})   "
      f"plain loop {plain['test_accuracy']:.6f} ({plain['test_correct']}/{n_test})")
for mine, theirs in zip(plain_epochs[-3:], engine_epochs[-3:], strict=True):
    print(f"epoch {mine['epoch']:2d}  train loss {mine['train_loss']:.8f} vs {theirs['train_loss']:.8f}   "
          f"val acc {mine['val_accuracy']:.4f} vs {theirs['val_accuracy']:.4f}")
weight_pairs = list(zip(plain_model.parameters(), engine_model.parameters(), strict=True))
largest_gap = max((a - b).abs().max().item() for a, b in weight_pairs)
print(f"{len(weight_pairs)} weight tensors, {sum(a.numel() for a, _ in weight_pairs):,} numbers; "
      f"largest difference {largest_gap}")

assert plain["test_accuracy"] == run.results["test_accuracy"], (plain["test_accuracy"], run.results)
assert plain["test_correct"] == engine_correct, (plain["test_correct"], engine_correct)
assert len(plain_epochs) == len(engine_epochs) == cfg["epochs"], (len(plain_epochs), len(engine_epochs))
for mine, theirs in zip(plain_epochs, engine_epochs, strict=True):
    for key in ("train_loss", "train_accuracy", "val_accuracy"):
        assert mine[key] == theirs[key], (mine["epoch"], key, mine[key], theirs[key])
assert all(a.shape == b.shape and torch.equal(a, b) for a, b in weight_pairs), "the final weights differ"
assert len(plain["lrs"]) == 105 and sum(a.numel() for a, _ in weight_pairs) == 235_146, "the numbers the prose gives"

# %% [markdown]
# Equal, to the last bit: 5 epochs, 105 steps, 235,146 weights. The engine's extra machinery
# (the run folder, checkpoints each epoch, the progress it reports) reads the training; it never
# changes it.
#
# The figure shows the two things the loop computes besides gradients: the learning rate of each
# step (the one-cycle shape), and the mean training loss of each epoch, the plain loop's as dots
# over the engine's line.

# %%
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3))
ax0.plot(plain["lrs"])
ax0.set_xlabel("step")
ax0.set_ylabel("learning rate")
ax0.set_title("one-cycle: warm-up, then linear decay")
epochs_axis = [r["epoch"] for r in engine_epochs]
ax1.plot(epochs_axis, [r["train_loss"] for r in engine_epochs], label="mnistlab train (metrics.jsonl)")
ax1.plot(epochs_axis, [r["train_loss"] for r in plain_epochs], "o", ms=4, label="plain loop")
ax1.set_yscale("log")
ax1.set_xlabel("epoch")
ax1.set_ylabel("mean training loss")
ax1.set_title("the same numbers, epoch by epoch")
ax1.legend()
plt.tight_layout()
plt.show()

lrs, warm_steps = plain["lrs"], max(1, round(cfg["warmup"] * len(plain["lrs"])))  # 21 of 105 steps
print(f"lr: step 0 {lrs[0]:.2e}, step {warm_steps - 1} {lrs[warm_steps - 1]:.2e}, last step {lrs[-1]:.2e}")
assert lrs[0] < cfg["lr"] / 10, "the warm-up starts low (lr / 25 plus one step of the climb)"
assert abs(lrs[warm_steps - 1] - cfg["lr"]) < 1e-12 and max(lrs) < cfg["lr"] * (1 + 1e-12), "peak at warm-up's end"
assert lrs[-1] < cfg["lr"] / 50, "and falls to under 2% of the peak by the last step (lr / 1e4 one step later)"

# %% [markdown]
# ## What exactness needed
#
# Each of these details was needed, and each is a lesson about what "the same training" means:
#
# - **The seed right before the model.** `torch.manual_seed(seed)` sets the global random generator;
#   any random number drawn between the seed and the layers (another model, a random tensor) would
#   shift every initial weight.
# - **The order of the batches**, a generator seeded by `seed * 1_000_003 + epoch`, not the global
#   generator: the order does not depend on how many random numbers were drawn before. This is also
#   what makes `mnistlab train --resume` exact.
# - **The same arithmetic, in the same order.** The engine normalises as
#   `(x - 255 mean) * (1 / (255 std))`. The textbook `(x / 255 - mean) / std` is the same
#   mathematics but rounds differently; the loss would then differ in its last bits, and after 105
#   steps so would the weights.
# - **The same kernels.** `fused=True` asks AdamW for one fused kernel that updates every weight;
#   without it PyTorch uses a version that computes the same formula with other intermediate
#   roundings. The cell below shows what that costs.
# - **The same machine settings.** Both ran in this process with the same number of CPU threads: a
#   matrix product split over another number of threads can add its terms in another order.
#   (`mnistlab train --threads N` sets it; `--deterministic` asks a GPU for deterministic kernels.)
#
# What the MLP did not need: its training draws no random numbers after the initial weights (no
# dropout, no augmentation). For a model that does, the engine reseeds before every step with
# `torch.manual_seed(step_seed(seed, step))` (mnistlab/loop.py), so a step's dropout masks are a
# function of `(seed, step)`; a loop reproducing such a run would need that line too. The default
# CNN would also need its memory layout (`channels_last`, a faster layout for convolutions on CPU,
# under which the kernels may add in another order) and its label smoothing: more lines, same idea.
#
# Three of these details, checked on their own: the registry's `mlp` and the loop's layers start
# from the same weights; one random number drawn between the seed and the layers changes them all;
# the textbook normalisation gives other float32 values.

# %%
from mnistlab.models import create_model  # noqa: E402  (only to compare: the loop above does not use it)


def first_weights(extra_draw: bool) -> torch.Tensor:
    torch.manual_seed(cfg["seed"])
    if extra_draw:
        torch.rand(1)  # one random number drawn before the layers
    return nn.Linear(784, 256).weight


torch.manual_seed(cfg["seed"])
registry_mlp = create_model("mlp", num_classes=10)
assert torch.equal(registry_mlp.body[1].weight, first_weights(False)), "registry mlp and loop: same start"
assert not torch.equal(first_weights(True), first_weights(False)), "one draw in between: another start"
u8 = ds.train_images[:64]  # (B, 28, 28)
engine_way = (u8.unsqueeze(1).float() - 255.0 * ds.mean) * (1.0 / (255.0 * ds.std))
textbook_way = (u8.unsqueeze(1).float() / 255.0 - ds.mean) / ds.std
differ = (engine_way != textbook_way).float().mean().item()
print(f"normalisation: {differ:.1%} of the pixel values differ in their last bits, "
      f"by at most {(engine_way - textbook_way).abs().max().item():.1e}")
assert 0 < differ and torch.allclose(engine_way, textbook_way, atol=1e-5), "same mathematics, other rounding"

# %%
foreach_model, foreach_epochs, foreach = train_plain(ds, seed=cfg["seed"], epochs=cfg["epochs"],
                                                     batch_size=cfg["batch_size"], lr=cfg["lr"],
                                                     weight_decay=cfg["weight_decay"], warmup=cfg["warmup"],
                                                     fused=False)
gaps = [(a - b).abs().max().item() for a, b in zip(foreach_model.parameters(), engine_model.parameters(),
                                                   strict=True)]
print(f"fused=False: largest weight difference {max(gaps):.2e}; test accuracy {foreach['test_accuracy']:.6f} "
      f"({foreach['test_correct']}/{n_test}) vs {run.results['test_accuracy']:.6f}")
assert 0 < max(gaps) < 1e-4, f"without the fused kernel the weights differ, slightly: {max(gaps)}"

# %% [markdown]
# Without the fused kernel the largest weight differs by about one part in ten million (printed
# above): the same training, not the same bits. Here the test accuracy happens to agree; with
# other seeds or more steps such differences can move a prediction or two. With exactly the same
# computation there is no "can".
#
# ## Where next
#
# - Chapter 6 opens the convolutional network: convolution as multiplication in frequency, and the
#   filters a CNN learns.
# - `mnistlab train --help` lists every flag this loop left at its default; docs/training.md says
#   what each does. mnistlab/training.py (`TorchEngine.train_step`) and mnistlab/loop.py are the
#   engine's versions of the cell above, with the machinery around them.
