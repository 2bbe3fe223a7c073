# %% [markdown]
# # Chapter 7: RNN and LSTM, and the vanishing gradient
#
# A recurrent network reads its input one piece at a time and keeps a **hidden state**, a vector
# that carries what it has read so far. Here the pieces are the rows of a digit: 28 time steps of
# 28 pixels each, top to bottom. After the last row, the hidden state is all the network knows about
# the picture, and a linear layer turns it into class scores.
#
# This chapter writes the RNN's step by hand and checks it against PyTorch, then makes the
# **vanishing gradient** visible: how much of the loss's gradient reaches each time step. For a plain
# RNN at the start of training it shrinks by about half at every step back in time; the LSTM's
# additive memory lets more of it through. The measurement is mnistlab's own (`mnistlab train
# --grad-flow`, mnistlab/gradflow.py).

# %%
import math
import tempfile

import matplotlib.pyplot as plt
import torch

import mnistlab
from mnistlab import gradflow
from mnistlab.data import load_dataset
from mnistlab.data.batches import to_input
from mnistlab.models import create_model

ds = load_dataset("digits")
x = to_input(ds.train_images[:64], ds.mean, ds.std)  # (B, 1, 28, 28), normalised
y = ds.train_labels[:64]  # (B,)

# %% [markdown]
# ## A digit as a sequence of rows
#
# An image batch `(B, 1, 28, 28)` becomes a sequence batch `(B, T, F)`: `T = 28` time steps (the
# rows), each a vector of `F = 28` features (the pixels of that row). For one channel that is just
# dropping the channel axis: row `t` of the picture is time step `t`. The models do it in
# `to_sequence` (`--seq rows`, the default; `--seq pixels` reads 784 steps of one pixel).

# %%
torch.manual_seed(0)  # the seed `mnistlab train` uses before building its model (--seed 0)
rnn = create_model("rnn")  # the registry's RNN: nn.RNN(28 -> 128, tanh) and a Linear(128, 10) head
seq = rnn.to_sequence(x)  # (B, T, F)
print("images", tuple(x.shape), "-> sequences", tuple(seq.shape))
assert seq.shape == (64, 28, 28) and torch.equal(seq, x[:, 0]), "time step t is row t of the picture"

# %% [markdown]
# ## The RNN step by hand
#
# At each step the new hidden state mixes the current row with the previous state:
#
# `h_t = tanh(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)`,  starting from `h_0 = 0`.
#
# The same two weight matrices are used at every step: `W_ih` (128 x 28) reads a row, `W_hh`
# (128 x 128) carries the state forward. Four lines of torch, checked against PyTorch's fused
# `nn.RNN` and against the whole model's output.

# %%
W_ih, W_hh = rnn.rnn.weight_ih_l0, rnn.rnn.weight_hh_l0  # (128, 28), (128, 128)
b = rnn.rnn.bias_ih_l0 + rnn.rnn.bias_hh_l0  # (128,)
with torch.no_grad():
    h, states = torch.zeros(64, 128), []  # h_0: (B, 128)
    for t in range(28):
        h = torch.tanh(seq[:, t] @ W_ih.T + h @ W_hh.T + b)  # (B, 128)
        states.append(h)
    by_hand = torch.stack(states, 1)  # (B, T, 128)
    fused, _ = rnn.rnn(seq)  # (B, T, 128)
    logits = rnn.head(h)  # (B, 10): the class scores read the last state only
    gap, gap_logits = (by_hand - fused).abs().max().item(), (logits - rnn(x)).abs().max().item()
print(f"hand-written RNN vs nn.RNN: largest gap {gap:.1e}; logits vs the model's: {gap_logits:.1e}")
assert gap < 1e-5 and gap_logits < 1e-5, (gap, gap_logits)

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(8, 3), gridspec_kw=dict(width_ratios=[1, 2.4]))
ax0.imshow(ds.train_images[0], cmap="gray")
ax0.set_title(f"a {ds.classes[int(ds.train_labels[0])]}: 28 rows = 28 time steps", fontsize=9)
ax0.set_ylabel("row t")
ax0.set_xticks([])
ax1.imshow(by_hand[0, :, :48].T, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
ax1.set_xlabel("time step t (row read)")
ax1.set_ylabel("unit of h_t (first 48)")
ax1.set_title("the hidden state h_t as the untrained RNN reads it", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The LSTM
#
# The LSTM adds a second state, the **cell** `c_t`, and three gates (numbers between 0 and 1 from
# sigmoids) that decide what to forget, what to write and what to show:
#
# `c_t = f_t * c_{t-1} + i_t * g_t`,   `h_t = o_t * tanh(c_t)`.
#
# The key is the `+`: the old memory is carried forward multiplied only by the forget gate `f_t`,
# not pushed through a matrix and a tanh at every step. mnistlab's LSTM starts with its forget-gate
# bias at 1, so `f_t` starts near sigmoid(1) = 0.73: it starts out remembering. Its cell equations
# are written out in `SequenceClassifier.unrolled` (mnistlab/models/rnn.py); we check them against
# the fused `nn.LSTM`.

# %%
torch.manual_seed(0)
lstm = create_model("lstm")
unrolled_logits, _ = lstm.unrolled(x)  # keeps every h_t's gradient, so it runs with autograd on
gap = (unrolled_logits - lstm(x)).abs().max().item()
print(f"LSTM written out step by step vs nn.LSTM: largest gap {gap:.1e}; "
      f"sigmoid(1) = {torch.sigmoid(torch.tensor(1.0)):.3f}")
assert gap < 1e-5, gap

# %% [markdown]
# ## The vanishing gradient, measured
#
# The loss only sees the last state `h_T`. The gradient reaching an earlier state is a product of
# one Jacobian per step in between: `dL/dh_t = dL/dh_T (dh_T/dh_{T-1}) ... (dh_{t+1}/dh_t)`. For the
# RNN each factor is `diag(1 - h^2) W_hh`: a tanh slope (at most 1) times the recurrent matrix. If
# each factor shrinks the gradient, the product shrinks geometrically, and the first rows of the
# picture barely influence learning: that is the vanishing gradient.
#
# `mnistlab train --grad-flow` records `||dL/dh_t||` for every `t` (computed in float64 on a copy of
# the model, so tiny values do not round to 0) at the first step and at the end of each epoch. We
# train each model for one epoch (21 steps) on digits, with the same seed and data.

# %%
records, accuracy = {}, {}
for name in ("rnn", "lstm"):
    run = mnistlab.train(dataset="digits", model=name, epochs=1, grad_flow=True,
                         run_dir=tempfile.mkdtemp() + f"/{name}", quiet=True)
    records[name] = {r["step"]: r["time_grad_norm"] for r in gradflow.read(run.path)}  # step -> [T] norms
    accuracy[name] = run.results["test_accuracy"]
    print(f"mnistlab train --dataset digits --model {name} --epochs 1 --grad-flow: steps recorded "
          f"{sorted(records[name])}, test accuracy {accuracy[name]:.3f}")
first, last = 0, max(records["rnn"])


def per_step_factor(norms: list[float]) -> float:
    """The average factor by which the gradient shrinks per step back in time: (||g_1|| / ||g_T||)^(1/(T-1))."""
    return (norms[0] / norms[-1]) ** (1 / (len(norms) - 1))


for step in (first, last):
    r, m = records["rnn"][step], records["lstm"][step]
    print(f"step {step:2d}: ||dL/dh_1|| RNN {r[0]:.1e}, LSTM {m[0]:.1e} (RNN/LSTM {r[0] / m[0]:.1e}); "
          f"per-step factor RNN {per_step_factor(r):.2f}, LSTM {per_step_factor(m):.2f}")
typical_gain = (W_hh.norm() / math.sqrt(128)).item()  # how much W_hh scales a random direction, on average
print(f"W_hh scales a random vector by about {typical_gain:.2f} (PyTorch draws it uniformly in +-1/sqrt(128))")

rnn0, lstm0 = records["rnn"][first], records["lstm"][first]
assert len(rnn0) == len(lstm0) == 28, "one gradient norm per time step (row)"
assert rnn0[0] / lstm0[0] < 1e-2, "at the start, the RNN's first row gets under 1% of the LSTM's gradient"
assert per_step_factor(rnn0) < typical_gain < 1, "each RNN step shrinks the gradient by W_hh's gain or more"
assert per_step_factor(rnn0) < per_step_factor(lstm0), "the LSTM loses less per step"
rnn_late = per_step_factor(records["rnn"][last])
print(f"after {last + 1} steps the RNN loses a factor {rnn_late:.2f} per step: over 784 pixel steps "
      f"that would still be {rnn_late ** 783:.0e}")
assert records["rnn"][last][0] > 100 * rnn0[0], "21 steps of training let far more gradient reach the first row"
assert 0.8 < rnn_late < 1 and rnn_late**783 < 1e-10, "near 1 per step, still vanishing over 784 steps"

fig, axes = plt.subplots(1, 2, figsize=(9, 3), sharey=True)
for ax, step in zip(axes, (first, last), strict=True):
    for name in ("rnn", "lstm"):
        ax.semilogy(range(1, 29), records[name][step], "o-", ms=3, label=name.upper())
    ax.set_xlabel("time step t (row of the digit)")
    ax.set_title(f"training step {step}" + (" (start)" if step == first else " (end of epoch 1)"), fontsize=9)
    ax.grid(alpha=0.3, which="both")
axes[0].set_ylabel("||dL/dh_t||")
axes[0].legend()
fig.suptitle("gradient reaching each row: at the start the RNN's fades geometrically toward row 1", fontsize=10)
plt.tight_layout()
plt.show()

# %% [markdown]
# Read the left panel from right to left: going back in time, the RNN's gradient falls by about the
# factor printed above at every row, the LSTM's far less. A straight line on this log scale is a
# geometric decay. Why about 0.58 for the RNN: PyTorch draws `W_hh` uniformly in
# `[-1/sqrt(128), 1/sqrt(128)]`, so it multiplies a typical vector's length by about `1/sqrt(3)`; the
# tanh slope, at most 1, can only shrink it further.
#
# The right panel is after only 21 training steps, and it is a surprise: the RNN's curve is nearly
# flat. Training has grown `W_hh` until the per-step factor is close to 1 (printed above), so over
# 28 rows the gradient no longer vanishes; here the RNN's first row even receives more than the
# LSTM's. On a short sequence the vanishing gradient is a problem of the start, which training can
# climb out of, if the start is not too far down.
#
# Close to 1 is not enough for long sequences: a factor of 0.9 per step is 1e-36 after 784 steps, and
# a factor above 1 explodes instead (which is why mnistlab clips the gradient norm of recurrent
# models by default). Reading the digit pixel by pixel (`--seq pixels`, 784 steps),
# docs/sequence-models.md reports a first-pixel gradient of 3.7e-162 of the last one's for the RNN
# at the start, and 3.9e-51 for the LSTM (the figures there; such a run takes minutes, not seconds).
#
# After one epoch the test accuracies printed above are those of a network still learning; the
# recurrent models' defaults on digits train for 15 epochs.
#
# ## Where next
#
# - Chapter 8 replaces recurrence with attention: every row (or patch) looks at every other one
#   directly, so no gradient has to travel through 28 steps.
# - `mnistlab train --dataset digits --model rnn --grad-flow --run-dir runs/rnn`, then
#   `mnistlab plot grad-flow runs/rnn -o rnn.png`, draws the same measurement for a full run;
#   `--model gru` is the third recurrent cell. docs/sequence-models.md has more.
