# %% [markdown]
# # Chapter 4: Activations
#
# Chapter 1 showed that linear layers stacked without anything between them collapse into one linear
# layer. An **activation** is the small nonlinear function applied to every number between two layers,
# and it is what lets depth buy anything. This chapter:
#
# 1. shows the smallest problem a linear model cannot solve, XOR, and a one-hidden-layer network that does;
# 2. looks at four activations the notes name, ReLU, LeakyReLU, Softplus and GELU, with their
#    derivatives (the numbers backprop multiplies by, chapter 3), each checked against PyTorch.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as TF

from mnistlab.labs.activations import value_and_derivative
from mnistlab.models.registry import create_model

# %% [markdown]
# ## XOR: four points no straight line separates
#
# XOR outputs 1 when exactly one of its two inputs is 1. A linear classifier predicts 1 where
# `w1 x1 + w2 x2 + b > 0`, which is one side of a straight line. It would need
#
# - `b <= 0` (for (0, 0)) and `w1 + w2 + b <= 0` (for (1, 1)), and
# - `w1 + b > 0` and `w2 + b > 0` (for (1, 0) and (0, 1)).
#
# Adding the last two gives `w1 + w2 + 2b > 0`; adding the first two gives `w1 + w2 + 2b <= 0`. No line
# does it, so at least one of the four points is always wrong: 75% at best. Check by trying 100,000
# lines, and by training a logistic-regression model, which ends on the useless answer "0.5 everywhere"
# (the loss `ln 2`).

# %%
X = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # (4, 2): the four inputs
y = torch.tensor([0.0, 1.0, 1.0, 0.0])  # (4,): XOR

angles = torch.linspace(0, 2 * np.pi, 1000)
w = torch.stack([angles.cos(), angles.sin()], 1)  # (1000, 2): every direction of the line's normal
b = torch.linspace(-2, 2, 100)  # (100,) offsets
scores = (X @ w.T)[:, :, None] + b  # (4, 1000, 100): w.x + b for every point, direction and offset
accuracy = ((scores > 0).float() == y[:, None, None]).float().mean(0)  # (1000, 100)
print(f"best accuracy of 100,000 straight lines on XOR: {accuracy.max():.0%}")
assert accuracy.max() == 0.75, accuracy.max()


def fit(model: torch.nn.Module, steps: int = 300) -> tuple[float, float]:
    """Train on the four XOR points (Adam, full batch); return the final loss and accuracy."""
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        loss = TF.binary_cross_entropy_with_logits(model(X).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = ((model(X).squeeze(1) > 0).float() == y).float().mean().item()
    return loss.item(), acc


torch.manual_seed(0)
linear = torch.nn.Linear(2, 1)
linear_loss, linear_acc = fit(linear)
torch.manual_seed(0)
deep_linear = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
deep_loss, deep_acc = fit(deep_linear)
print(f"logistic regression: loss {linear_loss:.4f} (ln 2 = {np.log(2):.4f}), accuracy {linear_acc:.0%}")
print(f"three linear layers, no activation: loss {deep_loss:.4f}, accuracy {deep_acc:.0%}")
assert linear_acc < 1 and deep_acc < 1, (linear_acc, deep_acc)
assert abs(linear_loss - np.log(2)) < 1e-3, linear_loss
with torch.no_grad():
    logits = linear(X).squeeze(1)  # (4,)
    undecided = (torch.sigmoid(logits) - 0.5).abs().max().item()
print(f"the logistic model's P(XOR = 1) on the four points is within {undecided:.1e} of 0.5 (largest |logit| "
      f"{logits.abs().max():.1e}): its 75% is the sign of a logit that is all but zero")
assert undecided < 0.01, undecided

# %% [markdown]
# Now one hidden layer with a ReLU between. Before training anything, here is a solution by hand with two
# hidden units: `h1 = relu(x1 + x2)` counts the ones, `h2 = relu(x1 + x2 - 1)` fires only when both are
# one, and `h1 - 2 h2` is XOR. The bend of the ReLU at 0 is what makes `h2` different from a line.
# Then the same shape of network (2 -> 8 -> 1) finds a solution by gradient descent.

# %%
h1 = torch.relu(X[:, 0] + X[:, 1])
h2 = torch.relu(X[:, 0] + X[:, 1] - 1)
by_hand = h1 - 2 * h2  # (4,)
print("by hand:", by_hand.tolist(), "| XOR:", y.tolist())
assert torch.equal(by_hand, y), by_hand

torch.manual_seed(0)
hidden = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
hidden_loss, hidden_acc = fit(hidden)
print(f"one hidden layer of 8 ReLUs, trained: loss {hidden_loss:.4f}, accuracy {hidden_acc:.0%}")
assert hidden_acc == 1.0, hidden_acc

grid = torch.stack(torch.meshgrid(torch.linspace(-0.5, 1.5, 161), torch.linspace(-0.5, 1.5, 161),
                                  indexing="xy"), -1)  # (161, 161, 2)
fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4), layout="constrained")
for ax, model, title in ((axes[0], linear, "linear: P = 0.5 everywhere\n(the line: where a ~0 logit changes sign)"),
                         (axes[1], hidden, f"one hidden ReLU layer: {hidden_acc:.0%}\n(the line: P = 0.5)")):
    with torch.no_grad():
        p = torch.sigmoid(model(grid.reshape(-1, 2))).reshape(161, 161)  # P(class 1) on the grid
    im = ax.contourf(grid[..., 0], grid[..., 1], p, levels=np.linspace(0, 1, 11), cmap="coolwarm", vmin=0, vmax=1)
    ax.contour(grid[..., 0], grid[..., 1], p, levels=[0.5], colors="k", linewidths=1)
    ax.scatter(X[:, 0], X[:, 1], c=y, cmap="coolwarm", edgecolors="k", s=80, vmin=0, vmax=1)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.set_aspect("equal")
fig.colorbar(im, ax=axes, label="P(XOR = 1)")
plt.show()

# %% [markdown]
# ## Four activations and their derivatives
#
# - **ReLU** `max(x, 0)`: derivative 1 for `x > 0`, 0 otherwise. Cheap, and it does not shrink the
#   gradient where it is active, but a unit whose input stays negative gets no gradient at all ("dead").
# - **LeakyReLU** `x if x > 0 else 0.01 x`: the same with a small slope on the left, so no unit is ever
#   quite dead.
# - **Softplus** `log(1 + e^x)`: a smooth ReLU. Its derivative is exactly the sigmoid `1 / (1 + e^-x)`.
# - **GELU** `x * Phi(x)`, with `Phi` the probability that a standard normal variable is below `x`: the
#   input, kept with the probability that it is "large". It is the Transformers' choice (chapter 8).
#
# Each derivative below is computed twice: by the project's numpy engine (`value_and_derivative`, from the
# `activations` lab, which backpropagates through `mnistlab.scratch`) and by `torch.autograd`. They must
# agree (to rounding; to 1e-6 for GELU, since numpy has no `erf` and the engine carries its own
# approximation of it, good to 1.2e-7), and Softplus' derivative must equal the sigmoid.

# %%
x = torch.linspace(-5, 5, 2001, dtype=torch.float64, requires_grad=True)  # (2001,)
torch_functions = {"relu": TF.relu, "leaky_relu": TF.leaky_relu, "softplus": TF.softplus, "gelu": TF.gelu}
curves = {}
for name, fn in torch_functions.items():
    value = fn(x)
    (slope,) = torch.autograd.grad(value.sum(), x)  # d(sum f(x_i))/dx_i = f'(x_i)
    ours_value, ours_slope = value_and_derivative(name, x.detach().numpy())
    err_value = np.abs(ours_value - value.detach().numpy()).max()
    err_slope = np.abs(ours_slope - slope.numpy()).max()
    print(f"{name:>10}: scratch vs torch, max |f - f_torch| {err_value:.1e}, max |f' - f'_torch| {err_slope:.1e}")
    tolerance = 1e-6 if name == "gelu" else 1e-12  # numpy has no erf: the engine's own is good to 1.2e-7
    assert err_value < tolerance and err_slope < tolerance, (name, err_value, err_slope)
    curves[name] = (value.detach().numpy(), slope.numpy())

t = x.detach()
relu_slope, leaky_slope, softplus_slope = curves["relu"][1], curves["leaky_relu"][1], curves["softplus"][1]
assert np.array_equal(relu_slope, (t > 0).double().numpy()), "relu' is the step: 0 for x <= 0, 1 for x > 0"
assert np.allclose(leaky_slope[t.numpy() < 0], 0.01), "leaky relu keeps a slope of 0.01 on the left"
err_sigmoid = np.abs(softplus_slope - torch.sigmoid(t).numpy()).max()
print(f"max |softplus'(x) - sigmoid(x)| = {err_sigmoid:.1e}")
assert err_sigmoid < 1e-12, err_sigmoid

# %% [markdown]
# GELU written out: `Phi(x) = (1 + erf(x / sqrt 2)) / 2`, so `gelu(x) = x (1 + erf(x / sqrt 2)) / 2`. Many
# implementations use a cheaper tanh formula instead (`approximate="tanh"` in PyTorch); it differs from
# the exact one by less than a thousandth.

# %%
phi = 0.5 * (1 + torch.erf(t / np.sqrt(2)))  # the standard normal CDF
gelu_by_hand = t * phi
err_exact = (gelu_by_hand - TF.gelu(t)).abs().max().item()
err_tanh = (TF.gelu(t, approximate="tanh") - TF.gelu(t)).abs().max().item()
print(f"max |x Phi(x) - torch gelu| = {err_exact:.1e}; tanh approximation vs exact: {err_tanh:.1e}")
assert err_exact < 1e-12, err_exact
assert err_tanh < 1e-3, err_tanh
vit_gelus = sum(isinstance(m, torch.nn.GELU) for m in create_model("vit").modules())
print(f"the zoo's vit has a GELU in each of its {vit_gelus} Transformer blocks' MLPs")
assert vit_gelus > 0, "the Transformer of chapter 8 uses GELU"

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.4))
for name, (value, slope) in curves.items():
    style = dict(ls="--") if name == "leaky_relu" else {}  # dashed, so relu shows through where they meet
    ax0.plot(t, value, label=name, **style)
    ax1.plot(t, slope, label=f"{name}'", **style)
ax1.plot(t, torch.sigmoid(t), color="k", lw=0.8, ls=":", label="sigmoid (= softplus')")
ax0.set_title("f(x)")
ax0.set_ylim(-1, 5)
ax1.set_title("f'(x), by torch.autograd")
ax1.set_ylim(-0.2, 1.2)
for ax in (ax0, ax1):
    ax.axhline(0, color="0.5", lw=0.6)
    ax.axvline(0, color="0.5", lw=0.6)
    ax.set_xlabel("x")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# Read the right panel as "how much gradient passes through": ReLU passes all or nothing; LeakyReLU never
# quite nothing; Softplus and GELU are smooth, and GELU even dips below zero for negative inputs (its
# curve on the left has a small negative bump).

# %%
gelu_value, gelu_slope = curves["gelu"]
print(f"gelu's minimum {gelu_value.min():.4f} at x = {t[gelu_value.argmin()]:.3f}; "
      f"smallest slope {gelu_slope.min():.4f}")
assert gelu_value.min() < -0.16 and gelu_slope.min() < 0, (gelu_value.min(), gelu_slope.min())

# %% [markdown]
# ## What to remember
#
# - Without an activation a network is one linear map and cannot even do XOR; one hidden layer with a
#   ReLU can.
# - The derivative of the activation is a factor in every gradient that passes through it: ReLU's 0 on the
#   left is why units can die, LeakyReLU's 0.01 why they cannot; Softplus' derivative is the sigmoid.
#
# ## Where next
#
# Chapter 5 ([05_training_loop](05_training_loop.ipynb)): the complete training loop in one screen. The lab
# trains the same MLP on digits with each activation and counts dead units: `mnistlab lab activations -o
# activations.png`; a model of the zoo with another activation: `mnistlab train --model mlp --dataset digits
# --model-arg activation=gelu` ([docs/training.md](../docs/training.md)).
