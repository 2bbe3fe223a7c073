# %% [markdown]
# # Chapter 1: Linear maps
#
# A layer of a network starts with a matrix times a vector. This chapter looks at what a matrix does
# to the space its vectors live in, with 2x2 matrices you can draw, and then at the question that
# decides why networks have activations at all: what does a stack of matrices do?
#
# Three facts, each checked below:
#
# 1. the **columns** of a matrix are where the basis vectors `e1 = (1, 0)` and `e2 = (0, 1)` land, and
#    that is the whole map;
# 2. applying `B` then `A` is the product `AB`, and **`AB` is not `BA`**: order matters;
# 3. two linear layers stacked **without an activation** are one linear layer: depth alone adds nothing.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

from mnistlab.data import load_dataset
from mnistlab.data.batches import to_input
from mnistlab.labs import linear_map
from mnistlab.labs.linear_map import A, B, grid_lines

torch.manual_seed(0)
print("A (a shear) =\n", A, "\nB (a quarter turn) =\n", B)

# %% [markdown]
# ## The columns are where the basis lands
#
# Any vector is `x = x1 e1 + x2 e2`. A linear map keeps sums and multiples, so
# `A x = x1 (A e1) + x2 (A e2)`: knowing the two vectors `A e1` and `A e2` is knowing `A` everywhere.
# And `A e1` is just the first column of `A`, `A e2` the second.

# %%
e1, e2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
x = np.array([2.0, -3.0])
print("A e1 =", A @ e1, " A e2 =", A @ e2, " columns of A:", A[:, 0], A[:, 1])
print("A x =", A @ x, " x1 A e1 + x2 A e2 =", x[0] * A[:, 0] + x[1] * A[:, 1])
assert np.array_equal(A @ e1, A[:, 0]) and np.array_equal(A @ e2, A[:, 1]), "columns are the images of e1, e2"
assert np.allclose(A @ x, x[0] * A[:, 0] + x[1] * A[:, 1]), "A x is the columns mixed by x's coordinates"

# %% [markdown]
# Draw it: the grid of the plane, the unit square (orange), `e1` (red) and `e2` (blue), before and after
# each map. The grid lines stay straight, parallel and evenly spaced, and the origin stays put: that is
# what "linear" looks like. The area of the square is multiplied by `|det|`.

# %%
def draw(ax, m: np.ndarray, title: str) -> None:
    """The plane after the map m (2, 2): grid lines, unit square, and the images of e1 and e2."""
    for line in grid_lines(n=3, points=13):  # each line (2, 13): points on it
        p = m @ line
        ax.plot(p[0], p[1], color="0.8", lw=0.7)
    square = m @ np.array([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=float)  # corners, (2, 4)
    ax.fill(square[0], square[1], color="tab:orange", alpha=0.4)
    for col, color in ((0, "tab:red"), (1, "tab:blue")):
        ax.arrow(0, 0, *m[:, col], color=color, width=0.05, length_includes_head=True)
    ax.set_title(f"{title}\ncolumns {m[:, 0].tolist()}, {m[:, 1].tolist()}; det {np.linalg.det(m):g}", fontsize=9)
    ax.set_xlim(-2.5, 2.5)
    ax.set_ylim(-2.5, 2.5)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


fig, axes = plt.subplots(1, 4, figsize=(10, 3))
for ax, (m, title) in zip(axes, [(np.eye(2), "identity"), (A, "A: shear"), (A @ B, "AB: B first, then A"),
                                 (B @ A, "BA: A first, then B")], strict=True):
    draw(ax, m, title)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Order matters: AB is not BA
#
# `A @ B @ x` applies `B` first (it is nearest to `x`), then `A`. Turning then shearing is not shearing
# then turning: the last two panels above differ, and so do the matrices.

# %%
ab, ba = A @ B, B @ A
print("AB =\n", ab, "\nBA =\n", ba)
assert not np.allclose(ab, ba), "AB != BA for this pair"
assert np.allclose(A @ (B @ x), ab @ x), "B then A is the one matrix AB"
for check in linear_map.run():  # the same lab from the command line: `mnistlab lab linear-map`
    print(check.line())
    assert check.passed, check.line()

# %% [markdown]
# ## Two linear layers are one linear layer
#
# A layer `nn.Linear(n_in, n_out)` computes `y = W x + b` with `W` of shape `(n_out, n_in)`. Stack two:
#
# `y = W2 (W1 x + b1) + b2 = (W2 W1) x + (W2 b1 + b2)`
#
# which is one layer with weight `W2 W1` and bias `W2 b1 + b2`. Below: a 784 -> 64 -> 10 stack on real
# digits, and the single 784 -> 10 layer built from it, give the same outputs (float64, so the only
# difference is rounding).

# %%
ds = load_dataset("digits")
x = to_input(ds.test_images[:32], ds.mean, ds.std).reshape(32, -1).double()  # (32, 784)
first, second = torch.nn.Linear(784, 64).double(), torch.nn.Linear(64, 10).double()
one = torch.nn.Linear(784, 10).double()
with torch.no_grad():
    one.weight.copy_(second.weight @ first.weight)  # (10, 64) @ (64, 784) -> (10, 784)
    one.bias.copy_(second.weight @ first.bias + second.bias)  # (10,)
    stacked, single = second(first(x)), one(x)  # (32, 10) each
err = (stacked - single).abs().max().item()
print(f"two layers vs their one-layer product: max |difference| {err:.1e} over {stacked.numel()} outputs")
assert err < 1e-10, err

# %% [markdown]
# So a hundred linear layers are still one matrix, and a network of them can only draw straight lines
# (flat planes) between classes. Putting a nonlinearity between the layers, like `ReLU(z) = max(z, 0)`,
# breaks the collapse. To see it, feed a number `t` through three random layers 1 -> 16 -> 16 -> 1, once
# without and once with ReLU between them, and plot the output against `t`.

# %%
torch.manual_seed(1)
layers = [torch.nn.Linear(1, 16).double(), torch.nn.Linear(16, 16).double(), torch.nn.Linear(16, 1).double()]
t = torch.linspace(-3, 3, 601, dtype=torch.float64)[:, None]  # (601, 1): 601 inputs, one number each
with torch.no_grad():
    linear_out, relu_out = t, t
    for i, layer in enumerate(layers):
        linear_out = layer(linear_out)
        relu_out = layer(relu_out)
        if i < len(layers) - 1:
            relu_out = torch.relu(relu_out)
# a straight line has one slope everywhere; a bent curve has several
slopes_linear = linear_out.squeeze().diff() / (t[1] - t[0])  # (600,)
slopes_relu = relu_out.squeeze().diff() / (t[1] - t[0])
spread_linear = (slopes_linear.max() - slopes_linear.min()).item()
spread_relu = (slopes_relu.max() - slopes_relu.min()).item()
print(f"slope from {slopes_linear.min():+.3f} to {slopes_linear.max():+.3f} without activation, "
      f"from {slopes_relu.min():+.3f} to {slopes_relu.max():+.3f} with ReLU")
assert spread_linear < 1e-9, spread_linear
assert spread_relu > 0.05, spread_relu

fig, ax = plt.subplots(figsize=(8, 3))
ax.plot(t, linear_out, label="3 linear layers: a straight line")
ax.plot(t, relu_out, label="3 linear layers with ReLU between: bends")
ax.set_xlabel("input t")
ax.set_ylabel("output")
ax.legend()
ax.grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What to remember
#
# - A matrix is a map; its columns are where `e1, e2, ...` go; `det` is how it scales areas.
# - Composition is multiplication, right to left, and the order matters.
# - Linear layers stacked without an activation collapse into one: depth needs a nonlinearity.
#   Chapter 4 shows which ones, and why XOR cannot be learned without one.
#
# ## Where next
#
# Chapter 2 ([02_gradient_descent](02_gradient_descent.ipynb)): how the numbers in these matrices are
# learned. The figure of this chapter's lab: `mnistlab lab linear-map -o linear_map.png`
# ([docs/scratch-and-labs.md](../docs/scratch-and-labs.md)).
