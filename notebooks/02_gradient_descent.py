# %% [markdown]
# # Chapter 2: Gradient descent and the learning rate
#
# Training is a search for the lowest point of the loss landscape: the loss as a function of every
# weight. Gradient descent walks downhill, one step at a time:
#
# `w <- w - eta * grad L(w)`
#
# and `eta`, the **learning rate**, is the setting that decides whether it gets there. Too small and it
# crawls; too large and it overshoots the valley further on every step and blows up.
#
# On a quadratic bowl everything about this can be computed exactly, so the chapter starts there, with
# the functions of the `gradient-descent` lab (`mnistlab.labs.gradient_descent`). Then the same ideas on a
# real network: the multi-layer perceptron learning the digits.

# %%
import matplotlib.pyplot as plt
import numpy as np

from mnistlab.labs import gradient_descent as gd

# %% [markdown]
# ## One dimension: every step multiplies by (1 - eta lambda)
#
# Take `f(x) = lambda x^2 / 2`, a parabola of curvature `lambda`. Its gradient is `lambda x`, so a step is
# `x <- x - eta lambda x = (1 - eta lambda) x`. After `t` steps `x_t = (1 - eta lambda)^t x_0`:
#
# - `0 < eta lambda < 1`: the factor is between 0 and 1, `x` shrinks steadily;
# - `1 < eta lambda < 2`: the factor is between -1 and 0, `x` jumps to the other side each step (the
#   minus signs after an odd number of steps below), but shrinks;
# - `eta lambda > 2`: `|1 - eta lambda| > 1`, every step lands further away. So `eta < 2 / lambda` is the
#   limit, and with many directions the steepest one (the largest curvature, `L`) sets it: `eta < 2 / L`.

# %%
lam = 10.0
for eta in (0.05, 0.15, 0.19, 0.21):
    x = 1.0
    for _ in range(21):
        x = x - eta * lam * x  # one gradient step on f(x) = lam x^2 / 2
    print(f"eta {eta:.2f} (eta lambda {eta * lam:.1f}): x after 21 steps {x:+.2e}, "
          f"(1 - eta lambda)^21 = {(1 - eta * lam) ** 21:+.2e}")
    assert abs(x - (1 - eta * lam) ** 21) < 1e-12, (eta, x)

# %% [markdown]
# ## A 2-D bowl: the steepest direction sets the limit
#
# The lab's bowl `f(x) = x^T H x / 2` has curvatures 1 and 10 (the eigenvalues of `H`) along two axes
# turned by 30 degrees. `gd.gd_path` runs plain gradient descent (`x <- x - eta H x`) from the same start
# for several step sizes. `gd.stability_check` runs it at 95% and at 105% of `2 / L`: the first must reach
# a millionth of its starting distance, the second must have grown a millionfold.

# %%
bowl = gd.quadratic(gd.BOWL_EIGENVALUES, angle=gd.BOWL_ANGLE)  # (2, 2)
L = np.linalg.eigvalsh(bowl).max()
check = gd.stability_check(bowl, gd.BOWL_START)
print(check.line())
assert check.passed, check.line()

etas = {"0.3/L": 0.3 / L, "1/L": 1 / L, "0.95 x 2/L": 1.9 / L, "1.05 x 2/L": 2.1 / L}
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4))
g = np.linspace(-6, 6, 121)
gx, gy = np.meshgrid(g, g)
ax0.contour(gx, gy, gd.quadratic_loss(bowl, np.stack([gx, gy], -1)), levels=np.geomspace(0.05, 150, 12),
            colors="0.8", linewidths=0.8)
for name, eta in etas.items():
    path = gd.gd_path(bowl, gd.BOWL_START, eta, 25)  # (26, 2): the start and 25 steps
    inside = np.abs(path).max(1) <= 6  # a diverging run leaves the picture; draw it until then
    shown = path[: np.argmin(inside) + 1] if not inside.all() else path
    ax0.plot(shown[:, 0], shown[:, 1], "o-", ms=3, lw=1, label=f"eta = {name}")
    ax1.semilogy(gd.quadratic_loss(bowl, gd.gd_path(bowl, gd.BOWL_START, eta, 60)), label=f"eta = {name}")
ax0.plot(0, 0, "k*", ms=10)
ax0.set_xlim(-6, 6)
ax0.set_ylim(-6, 6)
ax0.set_aspect("equal")
ax0.set_title(f"25 steps on the bowl (curvatures 1 and {L:g})", fontsize=10)
ax0.legend(fontsize=8, loc="lower right")
ax1.set_ylim(1e-10, 1e5)
ax1.set_xlabel("step")
ax1.set_ylabel("loss (log scale)")
ax1.set_title(f"loss per step: above 2/L = {2 / L:.2f} it grows", fontsize=10)
ax1.grid(alpha=0.3)
ax1.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Many directions, each on its own: (1 - eta lambda_i)^t
#
# Written in the eigenvectors of `H`, a gradient step multiplies the part of `x` along eigenvector `i` by
# `1 - eta lambda_i`, independently of the others. The lab's 20-dimensional valley has curvatures from
# 1 to 100 (condition number `kappa = L / lambda_min = 100`); `gd.eigen_contractions` measures each part's
# factor per step along a run. It must be the formula, for every direction and step size.

# %%
valley = gd.quadratic(gd.VALLEY_EIGENVALUES, seed=0)  # (20, 20), a random rotation of the curvatures
lams = np.linalg.eigvalsh(valley)
mu, L = lams[0], lams[-1]
x0 = np.random.default_rng(1).standard_normal(len(lams))  # (20,)
worst = 0.0
for eta in (0.5 / L, 1 / L, 1.9 / L):
    lam_i, factor = gd.eigen_contractions(valley, gd.gd_path(valley, x0, eta, 400))
    worst = max(worst, np.abs(factor - (1 - eta * lam_i)).max())
print(f"kappa = {L / mu:g}; measured factor per step vs 1 - eta lambda_i, 20 directions x 3 step sizes: "
      f"max |difference| {worst:.1e}")
assert worst < 1e-7, worst

# %% [markdown]
# This is why a long thin valley is slow. The step size must stay below `2 / L` for the steep direction,
# and then the flat direction (curvature `mu`) shrinks by only `1 - eta mu` per step. The best single step
# size, `2 / (L + mu)`, leaves a factor `(kappa - 1) / (kappa + 1)`: 0.98 for `kappa = 100`, hundreds of
# steps.
#
# **Momentum** (the "heavy ball") adds a fraction `beta` of the previous step to the current one:
# `x <- x - eta grad f(x) + beta (x - x_prev)`. Along the valley floor the gradient keeps its direction
# and the steps build up speed; across it the gradient flips sign every step and the additions cancel.
# Tuned, its factor is `(sqrt(kappa) - 1) / (sqrt(kappa) + 1)`: about `sqrt(kappa)` = 10 times fewer steps.
#
# **Adam** rescales each coordinate by a running average of its own gradient size. It needs no
# eigenvalues; below, its best learning rate of the lab's seven.

# %%
eta_gd, rate_gd = gd.gd_best(valley)
eta_hb, beta, rate_hb = gd.momentum_best(valley)
paths = {f"gradient descent, eta {eta_gd:.4f}": gd.gd_path(valley, x0, eta_gd, 1000),
         f"heavy ball, eta {eta_hb:.4f}, beta {beta:.3f}": gd.momentum_path(valley, x0, eta_hb, beta, 1000)}
adam_steps = {lr: gd.steps_to(gd.adam_path(valley, x0, lr, 1000)) for lr in gd.ADAM_LRS}
adam_lr = min(gd.ADAM_LRS, key=lambda lr: adam_steps[lr] or np.inf)
paths[f"Adam, lr {adam_lr:.2g}"] = gd.adam_path(valley, x0, adam_lr, 1000)
steps = {name: gd.steps_to(p) for name, p in paths.items()}
n_gd, n_hb, n_adam = steps.values()
for name, n in steps.items():
    print(f"{name:>36}: {n} steps to a millionth of the starting distance")
measured_gd = gd.measured_rate(paths[next(iter(paths))])
measured_hb = gd.measured_rate(list(paths.values())[1])
print(f"factor per step: GD {measured_gd:.4f} (theory {rate_gd:.4f}), heavy ball {measured_hb:.4f} "
      f"(theory {rate_hb:.4f})")
assert abs(measured_gd / rate_gd - 1) < 0.01 and abs(measured_hb / rate_hb - 1) < 0.01, (measured_gd, measured_hb)
assert n_gd / n_hb > 5, (n_gd, n_hb)  # the rates say about sqrt(kappa) = 10 times fewer
assert n_adam is not None, "Adam converges without being told the curvatures"
bounce = gd.distances(paths[f"Adam, lr {adam_lr:.2g}"])[n_adam:].max()
print(f"Adam after reaching a millionth: back up to {bounce:.0e} of the starting distance")
assert bounce > 1000 * gd.TOL, bounce  # a fixed lr does not settle (see below)

fig, ax = plt.subplots(figsize=(8, 3.6))
for name, p in paths.items():
    ax.semilogy(gd.distances(p), label=name)
t = np.arange(1001)
ax.semilogy(t, rate_gd**t, "--", color="tab:blue", lw=0.8, label=f"theory GD {rate_gd:.4f}^t")
ax.semilogy(t, rate_hb**t, "--", color="tab:orange", lw=0.8, label=f"theory heavy ball {rate_hb:.4f}^t")
ax.axhline(gd.TOL, color="0.5", lw=0.8)
ax.set_ylim(1e-9, 1e2)
ax.set_xlim(0, 800)
ax.set_xlabel("step")
ax.set_ylabel("distance to the minimum / start")
ax.set_title(f"the kappa = {L / mu:g} valley (grey line: a millionth)", fontsize=10)
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# Adam at a fixed learning rate does not settle at the bottom: once the gradients are tiny its running
# average of their size forgets the early large ones and the step grows back (the bounce on the right).
# Real training lowers the learning rate towards the end for this reason, among others.
#
# ## A real network: the learning-rate range test
#
# A network's loss is no quadratic and nobody knows its `L`. The **range test** (Smith 2017) finds a
# learning rate from one short run: train while the rate grows by the same factor every step, from 1e-5
# to 1, and watch the loss. At first it hardly moves; then it falls; past some rate the steps overshoot
# (the `eta > 2/L` of the bowl) and it climbs back and explodes. The lab's rule takes a tenth of that
# blow-up point, and compares it with the learning rate `mnistlab train --model mlp --dataset digits`
# uses.
#
# `gd.mlp_on_digits` does it on the zoo's MLP with the project's optimizer (AdamW), then trains the MLP
# with the project's settings (one-cycle schedule, 15 epochs) and looks at the loss along the straight
# line from the initial to the trained weights: weights = start + a (end - start). About 10 seconds.

# %%
mlp = gd.mlp_on_digits(seed=0)
test, cfg = mlp["test"], mlp["cfg"]
print(f"range test, {len(test.lrs)} steps: smoothed loss {test.smooth[0]:.2f} -> {test.smooth.min():.2f}; "
      f"falls fastest at lr {test.steepest:.1e}, lowest at {test.lowest:.1e}, blows up at {test.divergence:.1e}")
print(f"suggestion (a tenth of the blow-up): {test.suggestion:.1e}; the project's lr for the MLP: {cfg.lr:g} "
      f"({cfg.optimizer}, the peak of a {cfg.schedule} schedule)")
assert test.divergence is not None and test.smooth.min() < 0.5 * test.smooth[0], "the test found the three regions"
assert 1 / 3 < test.suggestion / cfg.lr < 3, (test.suggestion, cfg.lr)

a, train_slice, test_slice = mlp["alphas"], mlp["slice_train"], mlp["slice_test"]
at_start, at_end = train_slice[np.argmin(np.abs(a))], train_slice[np.argmin(np.abs(a - 1))]
print(f"along the line: train loss {at_start:.3f} at the start (a = 0), {at_end:.4f} at the end (a = 1); "
      f"test accuracy of the trained MLP {mlp['accuracy']:.1%}")
assert at_start > 10 * at_end, (at_start, at_end)
i_end = np.argmin(np.abs(a - 1))
print(f"past the end: train loss lowest at a = {a[np.argmin(train_slice)]:.2f}; test loss {test_slice[i_end]:.3f} "
      f"at a = 1, {test_slice[-1]:.3f} at a = {a[-1]:.1f}")
assert a[np.argmin(train_slice)] > 1 and test_slice[-1] > test_slice[i_end], "train falls on, test rises"

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.6))
ax0.semilogx(test.lrs, test.losses, color="0.7", lw=0.8, label="batch loss")
ax0.semilogx(test.lrs, test.smooth, color="tab:blue", label="smoothed")
ax0.axvline(test.divergence, color="tab:red", ls="--", label=f"blows up: {test.divergence:.1e}")
ax0.axvline(test.suggestion, color="tab:red", label=f"a tenth: {test.suggestion:.1e}")
ax0.axvline(cfg.lr, color="k", ls="-.", label=f"project's lr: {cfg.lr:g}")
ax0.set_ylim(0, 4)
ax0.set_xlabel("learning rate (grows every step)")
ax0.set_ylabel("cross-entropy")
ax0.set_title("range test: MLP on digits, AdamW", fontsize=10)
ax0.legend(fontsize=8, loc="upper left")
ax0.grid(alpha=0.3)
ax1.semilogy(a, train_slice, "o-", ms=3, label="train loss")
ax1.semilogy(a, test_slice, "s-", ms=3, label="test loss")
for x, name in ((0, "start"), (1, "end")):
    ax1.axvline(x, color="0.4", lw=0.8, ls="--")
    ax1.text(x + 0.03, 2.5, name, fontsize=9)
ax1.set_xlabel("a: weights = start + a (end - start)")
ax1.set_ylabel("cross-entropy (log scale)")
ax1.set_title(f"a slice of the landscape (test accuracy {mlp['accuracy']:.1%})", fontsize=10)
ax1.legend(fontsize=8)
ax1.grid(alpha=0.3, which="both")
plt.tight_layout()
plt.show()

# %% [markdown]
# On the slice, training went from a high start down into a valley. Past the end (`a > 1`) the training
# loss goes on falling for a while, but the test loss rises: further along this line the model only grows
# surer of the training pictures, which is overfitting.
#
# ## What to remember
#
# - A gradient step multiplies each direction's error by `1 - eta lambda`: the learning rate must stay
#   below `2 / L`, and the flattest direction then decides how slow it is (`kappa`).
# - Momentum brings the number of steps from about `kappa` down to about `sqrt(kappa)`; Adam needs no
#   knowledge of the curvatures.
# - On a real network a short range test finds a good learning rate, here within a factor 3 of the one
#   the project trains with.
#
# ## Where next
#
# Chapter 3 ([03_backprop](03_backprop.ipynb)): where the gradient comes from. The whole lab with its
# figure: `mnistlab lab gradient-descent -o gradient_descent.png`
# ([docs/scratch-and-labs.md](../docs/scratch-and-labs.md)).
