# %% [markdown]
# # Chapter 3: Backprop by hand
#
# Training needs the gradient of the loss with respect to every weight. Backpropagation computes all of
# them in one backward pass, and it is nothing more than two old ideas together:
#
# - the **chain rule**: the derivative of a composition is the product of the local derivatives along
#   the way, summed over every path from the input to the output;
# - **dynamic programming**: instead of walking every path (their number explodes), keep the values of
#   the forward pass and visit each node once, backwards, reusing the gradient already finished there.
#
# This chapter does it by hand on a tiny expression, checks the project's numpy autograd engine
# (`mnistlab.scratch`) against `torch.autograd` on a real network, and counts why a backward pass costs
# about two forward passes.

# %%
import itertools
import time
from pathlib import Path
from tempfile import mkdtemp

import numpy as np
import torch
import torch.nn.functional as TF
from IPython.display import Image
from torch.utils.flop_counter import FlopCounterMode

from mnistlab.data import load_dataset
from mnistlab.labs import backprop
from mnistlab.models.registry import create_model
from mnistlab.scratch import functional as F
from mnistlab.scratch import nn, tensor
from mnistlab.scratch.train import to_input

# %% [markdown]
# ## A small graph, forward then backward
#
# Take `f(a, b, c) = tanh(a b + c) * softplus(a)` (the `backprop` lab's expression). The forward pass
# computes it in small steps and **keeps every intermediate value**:
#
# `u = a b`, `v = u + c`, `w = tanh(v)`, `s = softplus(a)`, `f = w s`.
#
# The backward pass starts from `df/df = 1` and goes through the same steps in reverse. Each step
# multiplies the gradient that arrived by one local derivative, and every local derivative is read from
# a value the forward pass stored (`tanh' = 1 - w^2` reuses `w`; `d(w s)/dw = s` reuses `s`).
# The input `a` is used twice (in `u` and in `s`), so its gradient is the **sum** of what comes back
# along both paths.

# %%
a, b, c = backprop.INPUTS["a"], backprop.INPUTS["b"], backprop.INPUTS["c"]
# forward: every value stored
u = a * b
v = u + c
w = np.tanh(v)
s = np.log1p(np.exp(a))
f = w * s
# backward: one local derivative per edge, each from a stored value
df_dw, df_ds = s, w
df_dv = df_dw * (1 - w**2)
df_du, df_dc = df_dv, df_dv
df_db = df_du * a
df_da = df_du * b + df_ds * (1 / (1 + np.exp(-a)))  # two paths into a: the sum of both
by_hand = {"a": df_da, "b": df_db, "c": df_dc}
print(f"f = {f:.6f}; by hand: " + ", ".join(f"df/d{k} = {g:+.6f}" for k, g in by_hand.items()))

# %% [markdown]
# The scratch engine does the same thing automatically: each operation records its inputs and a small
# `_backward` function, and `backward()` runs those in reverse order. `backprop.graph` lists the nodes it
# built (a topological order: inputs first), and `backprop.edge_factors` the local derivative on each
# edge. Compare it with the hand computation and with central finite differences `(f(x+h) - f(x-h)) / 2h`,
# which need no calculus at all.

# %%
xs = {k: tensor(value, requires_grad=True, dtype=np.float64) for k, value in backprop.INPUTS.items()}
out = backprop.expression(xs["a"], xs["b"], xs["c"])
out.backward()
for node in backprop.graph(out):
    if node._parents:
        factors = ", ".join(f"{fac:+.4f}" for fac in backprop.edge_factors(node))
        print(f"{node.op:>9}: value {float(node.data):+.4f}, df/dnode {float(node.grad):+.4f}, "
              f"local factors to its inputs [{factors}]")
for k in "abc":
    engine, fd = float(xs[k].grad), backprop.finite_difference(backprop.INPUTS, k)
    print(f"df/d{k}: engine {engine:+.9f}, by hand {by_hand[k]:+.9f}, finite difference {fd:+.9f}")
    assert abs(engine - by_hand[k]) < 1e-12, (k, engine, by_hand[k])
    assert abs(engine - fd) < 1e-8, (k, engine, fd)
assert abs(float(out.data) - f) < 1e-12, (float(out.data), f)

# %% [markdown]
# ## Why "dynamic programming": paths multiply, work does not
#
# Chain `n` residual steps `h <- h + 0.1 tanh(h)`. Each step can be crossed two ways (the skip, factor
# 1, or the tanh branch, factor `0.1 (1 - tanh(h)^2)`), so `dh_n/dx` is a sum over `2^n` paths, each a
# product of `n` factors. For `n = 10` we can still enumerate all 1,024 paths. For `n = 50` there are
# about 10^15 of them, yet the engine's backward visits each of its few hundred nodes once: the sum
# over paths factors into a product of per-step sums, which is exactly what reusing each node's
# finished gradient computes.

# %%
def residual_chain(x0: float, n: int):
    """(output node, input node, the forward values h_0 .. h_{n-1} kept for the backward)."""
    x = tensor(x0, requires_grad=True, dtype=np.float64)
    h, kept = x, []
    for _ in range(n):
        kept.append(float(h.data))
        h = h + h.tanh() * 0.1
    return h, x, np.array(kept)


h, x, kept = residual_chain(0.3, 10)
h.backward()
branch = 0.1 * (1 - np.tanh(kept) ** 2)  # each step's tanh-branch factor, from the stored forward values
paths = [np.prod([branch[i] if take else 1.0 for i, take in enumerate(choice)])
         for choice in itertools.product([False, True], repeat=10)]
print(f"n = 10: {len(paths)} paths, their sum {sum(paths):.12f}; engine {float(x.grad):.12f}")
assert len(paths) == 2**10 and abs(sum(paths) - float(x.grad)) < 1e-12, (sum(paths), float(x.grad))

h, x, kept = residual_chain(0.3, 50)
start = time.perf_counter()
h.backward()
seconds = time.perf_counter() - start
nodes = len(backprop.graph(h))
per_step_sums = np.prod(1 + 0.1 * (1 - np.tanh(kept) ** 2))  # sum over 2^50 paths = product of 50 sums
print(f"n = 50: 2^50 = {2**50:.2e} paths, {nodes} nodes visited once in {seconds * 1e3:.1f} ms; "
      f"engine {float(x.grad):.10f}, product of per-step sums {per_step_sums:.10f}")
assert abs(float(x.grad) - per_step_sums) < 1e-10, (float(x.grad), per_step_sums)
# each step adds 4 nodes (tanh, the constant 0.1, the product, the sum): work linear in n, not in paths
assert nodes == 4 * 50 + 1, nodes

# %% [markdown]
# ## The scratch engine against torch.autograd, on a real network
#
# The same multi-layer perceptron twice: once in the numpy engine (`mnistlab.scratch.nn.MLP`), once in
# PyTorch (the zoo's `mlp`, by `create_model`), with the **same weights** copied across (the parameter
# names match on purpose), in float64. One batch of 64 real digits, cross-entropy loss, backward on both
# sides: every gradient of every weight must agree.

# %%
ds = load_dataset("digits")
images = to_input(ds.train_images[:64].numpy(), ds.mean, ds.std).astype(np.float64)  # (64, 1, 28, 28)
labels = ds.train_labels[:64].numpy()  # (64,)

nn.manual_seed(0)
ours = nn.MLP(hidden=(32, 16), activation="tanh")  # 784 -> 32 -> 16 -> 10, numpy
for p in ours.parameters():
    p.data = p.data.astype(np.float64)  # float64, so that only rounding at 1e-16 separates the two
theirs = create_model("mlp", hidden=(32, 16), activation="tanh").double()  # the same in torch
theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})

loss = F.cross_entropy(ours(tensor(images)), labels)
loss.backward()
tloss = TF.cross_entropy(theirs(torch.from_numpy(images)), torch.from_numpy(labels))
tloss.backward()
print(f"loss: scratch {loss.item():.12f}, torch {tloss.item():.12f}")
assert abs(loss.item() - tloss.item()) < 1e-12, (loss.item(), tloss.item())
torch_grads = dict(theirs.named_parameters())
for name, p in ours.named_parameters():
    diff = np.abs(p.grad - torch_grads[name].grad.numpy()).max()
    print(f"{name:>15} {str(p.shape):>10}: max |scratch - torch| {diff:.1e}")
    assert diff < 1e-10, (name, diff)

# %% [markdown]
# ## Why a backward pass costs about two forward passes
#
# A linear layer computes `Y = X W^T` with `X` of shape `(B, n_in)` and `W` of shape `(n_out, n_in)`:
# `B * n_out * n_in` multiply-adds, or `2 B n_in n_out` floating-point operations (FLOPs). Its backward
# needs two products of the same size:
#
# - `dX = dY W`, to pass the gradient on to the layer below;
# - `dW = dY^T X`, the gradient of the weights, the one the optimizer wants.
#
# So backward is 2x the forward's FLOPs. PyTorch can count the FLOPs it executes
# (`FlopCounterMode`): check the formula.

# %%
batch, n_in, n_out = 64, 784, 256
layer = torch.nn.Linear(n_in, n_out)
x = torch.randn(batch, n_in, requires_grad=True)  # an input that wants a gradient, like a hidden layer's
with FlopCounterMode(display=False) as forward_count:
    y = layer(x)  # (64, 256)
with FlopCounterMode(display=False) as backward_count:
    y.sum().backward()
fwd, bwd = forward_count.get_total_flops(), backward_count.get_total_flops()
print(f"forward {fwd:,} FLOPs (2 B n_in n_out = {2 * batch * n_in * n_out:,}), backward {bwd:,}: ratio {bwd / fwd}")
assert fwd == 2 * batch * n_in * n_out, fwd
assert bwd == 2 * fwd, (fwd, bwd)

# %% [markdown]
# In a whole network the first layer is the exception: nobody needs the gradient of the *pixels*, so its
# `dX` is skipped. For the zoo's `mlp` (784 -> 256 -> 128 -> 10) that first layer holds most of the
# FLOPs, so its backward is only a little more than one forward.

# %%
mlp = create_model("mlp")
pictures, targets = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))
with FlopCounterMode(display=False) as forward_count:
    mlp_loss = TF.cross_entropy(mlp(pictures), targets)
with FlopCounterMode(display=False) as backward_count:
    mlp_loss.backward()
fwd, bwd = forward_count.get_total_flops(), backward_count.get_total_flops()
first = 2 * 256 * 784 * 256  # the first layer's forward FLOPs, whose dX backward skips
print(f"mlp, batch 256: forward {fwd / 1e6:.1f} MFLOPs, backward {bwd / 1e6:.1f} MFLOPs, ratio {bwd / fwd:.3f}")
assert bwd == 2 * fwd - first, (fwd, bwd, first)

# %% [markdown]
# Time is a looser measure than FLOPs: memory traffic, the elementwise operations, and here a machine
# shared with other work all play a part. The `backprop` lab's timer runs the scratch engine's forward and
# backward on the same MLP and keeps the fastest of ten runs. The scratch engine also skips the gradient of
# the pixels, so on a quiet machine expect a ratio well below 2, a little above the FLOP count's 1.15 (the
# elementwise operations and the graph's bookkeeping add some); on a busy one it scatters (0.6 to 1.4
# while this chapter was written, on a 2-core machine shared with other work). It
# is printed, not asserted: the FLOP counts above are the claim, and a timing is disturbed by whatever else
# the machine does.
#
# The figure is the lab's (`mnistlab lab backprop -o backprop.png`): the graph of the first section with
# each node's value and gradient, and the local factor on each edge (red), beside the timing.

# %%
t_forward, t_backward = backprop.backward_forward_ratio()
print(f"scratch mlp, batch 256: forward {t_forward * 1e3:.2f} ms, backward {t_backward * 1e3:.2f} ms, "
      f"ratio {t_backward / t_forward:.2f}")
figure = Path(mkdtemp()) / "backprop.png"
backprop.draw(figure, backprop.graph(out), xs, t_backward / t_forward, t_forward, t_backward)
Image(filename=figure, width=900)

# %% [markdown]
# ## What to remember
#
# - The forward pass stores values; the backward pass multiplies local derivatives read from them, in
#   reverse order, and adds where paths meet.
# - Visiting each node once turns a sum over exponentially many paths into work proportional to the
#   size of the graph.
# - The scratch engine's gradients equal PyTorch's to rounding; a linear layer's backward is two
#   matrix products, hence "backward ~ 2 forwards".
#
# ## Where next
#
# Chapter 4 ([04_activations](04_activations.ipynb)): the nonlinearities between the layers, and their
# derivatives, which the backward pass multiplies by. The lab with its graph figure:
# `mnistlab lab backprop -o backprop.png`; training with the numpy engine:
# `mnistlab train --engine scratch --model mlp --dataset digits`
# ([docs/scratch-and-labs.md](../docs/scratch-and-labs.md)).
