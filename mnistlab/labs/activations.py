"""Activation functions and their derivatives, taken by the scratch engine's autograd and checked.

Without a nonlinearity, stacked linear layers collapse into one linear map (the notes). Each
activation bends the map differently, and its derivative decides how gradient flows back: ReLU
passes 1 or 0 (a unit whose input stays negative is "dead": it never learns again), LeakyReLU
keeps a small slope, Softplus is a smooth ReLU whose derivative is exactly the sigmoid, GELU
weights x by the probability Phi(x), sigmoid and tanh saturate (derivative at most 1/4 and 1).
The same MLP is then trained with each on the `digits` set (offline, seconds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mnistlab.labs import Check
from mnistlab.scratch import functional as F
from mnistlab.scratch import nn, optim, tensor
from mnistlab.scratch.engine import no_grad

TITLE = "f and f' of relu, leaky_relu, softplus, gelu, sigmoid, tanh; softplus' = sigmoid; one MLP trained with each"

NAMES = list(F.ACTIVATIONS)


def value_and_derivative(name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f(x) and f'(x) elementwise, f' by backpropagation through the engine (float64)."""
    t = tensor(x, requires_grad=True, dtype=np.float64)
    y = F.ACTIVATIONS[name](t)
    y.sum().backward()  # d(sum f(x_i))/dx_i = f'(x_i)
    return y.data, t.grad


def dead_fraction(model: nn.MLP, activation: str, x: np.ndarray) -> float:
    """Fraction of hidden units whose derivative is ~0 on every image of x: no gradient reaches them."""
    with no_grad():
        h, pre = tensor(x).reshape(len(x), -1), []
        for layer in model.body.layers[1:]:
            h = layer(h)
            if isinstance(layer, nn.Linear):
                pre.append(h.data.astype(np.float64))  # (N, units)
    slopes = [value_and_derivative(activation, p)[1] for p in pre]
    return sum(int((np.abs(s).max(0) < 1e-6).sum()) for s in slopes) / sum(s.shape[1] for s in slopes)


def train_mlp(activation: str, data, epochs: int = 12, seed: int = 0) -> tuple[float, float, float]:
    """Test accuracy, and dead fractions before and after training, of a 784-128-64-10 MLP with `activation`."""
    (xtr, ytr), (xte, yte) = data
    nn.manual_seed(seed)
    model = nn.MLP(hidden=(128, 64), activation=activation)
    dead_at_init = dead_fraction(model, activation, xtr)
    opt = optim.Adam(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        perm = rng.permutation(len(ytr))
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(tensor(xtr[idx])), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with no_grad():
        acc = float((model(tensor(xte)).data.argmax(1) == yte).mean())
    return acc, dead_at_init, dead_fraction(model, activation, xtr)


def load_digits_arrays():
    from mnistlab.data.dataset import load_dataset
    from mnistlab.scratch.train import to_input

    ds = load_dataset("digits")
    train = (to_input(ds.train_images.numpy(), ds.mean, ds.std), ds.train_labels.numpy())
    test = (to_input(ds.test_images.numpy(), ds.mean, ds.std), ds.test_labels.numpy())
    return train, test


def run(out: Path | None = None) -> list[Check]:
    x = np.linspace(-5, 5, 2001)
    curves = {n: value_and_derivative(n, x) for n in NAMES}
    sig = 1 / (1 + np.exp(-x))
    checks = []
    err = np.abs(curves["softplus"][1] - sig).max()
    checks.append(Check("softplus' = sigmoid", err < 1e-12, f"max |softplus'(x) - sigmoid(x)| {err:.1e} on [-5, 5]"))
    err = np.abs(curves["sigmoid"][1] - sig * (1 - sig)).max()
    checks.append(Check("sigmoid' = sigmoid (1 - sigmoid), at most 1/4",
                        err < 1e-12 and curves["sigmoid"][1].max() <= 0.25,
                        f"max |diff| {err:.1e}, max sigmoid' {curves['sigmoid'][1].max():.4f}"))
    err = np.abs(curves["tanh"][1] - (1 - np.tanh(x) ** 2)).max()
    checks.append(Check("tanh' = 1 - tanh^2", err < 1e-12, f"max |diff| {err:.1e}"))
    relu_d = curves["relu"][1]
    ok = np.array_equal(relu_d, (x > 0).astype(float))
    checks.append(Check("relu' is the step: 0 for x <= 0, 1 for x > 0", ok,
                        f"{int((relu_d == 0).sum())} zeros, {int((relu_d == 1).sum())} ones"))
    leaky = curves["leaky_relu"][1]
    checks.append(Check("leaky_relu' is 0.01 for x <= 0 (never exactly 0: no dead units)",
                        bool(np.allclose(leaky[x <= 0], 0.01) and np.allclose(leaky[x > 0], 1.0)),
                        f"min {leaky.min():.3f}, max {leaky.max():.3f}"))
    h = 1e-5
    fd = (F.gelu(tensor(x + h, dtype=np.float64)).data - F.gelu(tensor(x - h, dtype=np.float64)).data) / (2 * h)
    err = np.abs(curves["gelu"][1] - fd).max()
    checks.append(Check("gelu' = Phi(x) + x phi(x) matches finite differences", err < 1e-6, f"max |diff| {err:.1e}"))
    data = load_digits_arrays()
    results = {n: train_mlp(n, data) for n in NAMES}
    best = max(r[0] for r in results.values())
    summary = ", ".join(f"{n} {a:.1%} (dead {d:.0%})" for n, (a, _, d) in results.items())
    checks.append(Check("the same MLP learns digits with every activation (>= 85% test)",
                        min(r[0] for r in results.values()) >= 0.85, summary))
    checks.append(Check("leaky_relu has no dead units (its slope is never below 0.01)", results["leaky_relu"][2] == 0,
                        f"dead relu units: {results['relu'][1]:.1%} at initialisation, {results['relu'][2]:.1%} "
                        f"after training; leaky_relu {results['leaky_relu'][2]:.1%}; best accuracy {best:.1%}"))
    if out is not None:
        draw(out, x, curves, results)
    return checks


def draw(out: Path, x: np.ndarray, curves, results) -> None:
    from mnistlab.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for n, (f, d) in curves.items():
        style = dict(ls="--") if n == "leaky_relu" else {}  # dashed: relu shows through where they coincide
        axes[0].plot(x, f, label=n, **style)
        axes[1].plot(x, d, label=n, **style)
    axes[0].set_title("f(x)")
    axes[0].set_ylim(-1.5, 5)
    axes[1].set_title("f'(x), by the engine's backward pass")
    axes[1].set_ylim(-0.2, 1.3)
    for ax in axes[:2]:
        ax.axhline(0, color="0.5", lw=0.6)
        ax.axvline(0, color="0.5", lw=0.6)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    names = list(results)
    accs = [results[n][0] * 100 for n in names]
    bars = axes[2].bar(names, accs, color="tab:blue")
    for bar, n in zip(bars, names, strict=True):
        axes[2].text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.2,
                     f"{results[n][0]:.1%}\n{results[n][1]:.0%} -> {results[n][2]:.0%}", ha="center",
                     fontsize=8)
    axes[2].set_ylim(min(accs) - 5, 101)
    axes[2].set_title("MLP 784-128-64-10 on digits (scratch, Adam, 12 epochs):\n"
                      "test accuracy; dead hidden units at init -> after")
    axes[2].tick_params(axis="x", labelrotation=30)
    save_figure(fig, out)
