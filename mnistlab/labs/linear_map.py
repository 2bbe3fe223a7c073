"""A matrix is a linear map: its columns are where the basis vectors land, and order matters.

The notes start here: a 2x2 matrix moves every point of the plane, keeps grid lines straight,
parallel and evenly spaced, and keeps the origin fixed. Knowing where e1 = (1, 0) and e2 = (0, 1)
go (the columns) is knowing the whole map, since x = x1 e1 + x2 e2 lands on x1 A e1 + x2 A e2.
Composition is matrix multiplication, applied right to left, and AB is not BA.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mnistlab.labs import Check

TITLE = "a 2x2 matrix acting on a grid: columns are where the basis vectors land; AB != BA"

A = np.array([[1.0, 1.0], [0.0, 1.0]])  # shear: e2 leans right
B = np.array([[0.0, -1.0], [1.0, 0.0]])  # rotation by 90 degrees


def grid_lines(n: int = 5, points: int = 21) -> list[np.ndarray]:
    """Lines of the square grid [-n, n]^2, each as (2, points) coordinates."""
    t = np.linspace(-n, n, points)
    lines = [np.stack([np.full_like(t, c), t]) for c in range(-n, n + 1)]
    lines += [np.stack([t, np.full_like(t, c)]) for c in range(-n, n + 1)]
    return lines


def run(out: Path | None = None) -> list[Check]:
    e1, e2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    checks = [
        Check("A e1 is A's first column, A e2 its second",
              bool(np.allclose(A @ e1, A[:, 0]) and np.allclose(A @ e2, A[:, 1])),
              f"A e1 = {A @ e1}, A e2 = {A @ e2}, A = {A.tolist()}"),
    ]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1000))
    lin = A @ (2 * x[:, :500] + 3 * x[:, 500:]) - (2 * A @ x[:, :500] + 3 * A @ x[:, 500:])
    checks.append(Check("linearity: A(2x + 3y) = 2Ax + 3Ay", bool(np.abs(lin).max() < 1e-12),
                        f"max |difference| {np.abs(lin).max():.1e} over 500 random pairs"))
    ab, ba = A @ B, B @ A
    diff = np.abs(ab @ x - ba @ x).max()
    checks.append(Check("AB and BA move the same grid differently", bool(diff > 0.5),
                        f"AB = {ab.tolist()}, BA = {ba.tolist()}, max |ABx - BAx| {diff:.2f}"))
    seq = A @ (B @ x) - ab @ x
    checks.append(Check("applying B then A is the product AB", bool(np.abs(seq).max() < 1e-12),
                        f"max |A(Bx) - (AB)x| {np.abs(seq).max():.1e}"))
    det = np.linalg.det(A)
    square = np.array([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=float)
    img = A @ square
    area = 0.5 * abs(np.dot(img[0], np.roll(img[1], -1)) - np.dot(img[1], np.roll(img[0], -1)))  # shoelace
    checks.append(Check("det A is the factor by which A scales areas", bool(abs(area - abs(det)) < 1e-12),
                        f"det {det:.3f}, area of the image of the unit square {area:.3f}"))
    if out is not None:
        draw(out)
    return checks


def draw(out: Path) -> None:
    from mnistlab.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    panels = [(np.eye(2), "identity: the grid, e1 (red), e2 (blue)"), (A, "A (shear)"),
              (A @ B, "AB: rotate by B first, then shear"), (B @ A, "BA: shear first, then rotate")]
    for ax, (m, title) in zip(axes, panels, strict=True):
        for line in grid_lines():
            p = m @ line
            ax.plot(p[0], p[1], color="0.75", lw=0.7)
        for col, color, name in ((0, "tab:red", "e1"), (1, "tab:blue", "e2")):
            v = m[:, col]
            ax.annotate("", xy=v * 2, xytext=(0, 0), arrowprops=dict(arrowstyle="->", color=color, lw=2.2))
            tip = v * 2 + np.array([0.25 if v[0] >= 0 else -0.25, 0.3 if col else -0.5])
            ax.text(*tip, f"{name} -> ({v[0]:g}, {v[1]:g})", color=color, fontsize=9,
                    ha="left" if v[0] >= 0 else "right")
        sq = m @ np.array([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=float)
        ax.fill(sq[0], sq[1], color="tab:orange", alpha=0.3,
                label=f"unit square, area |det| = {abs(np.linalg.det(m)):g}")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{title}\n[[{m[0, 0]:g}, {m[0, 1]:g}], [{m[1, 0]:g}, {m[1, 1]:g}]]", fontsize=10)
        ax.set_xlim(-5, 5)
        ax.set_ylim(-5, 5)
        ax.set_aspect("equal")
        ax.axhline(0, color="0.4", lw=0.6)
        ax.axvline(0, color="0.4", lw=0.6)
    fig.suptitle("A matrix is where the basis vectors land (arrows scaled x2); the order of maps matters")
    save_figure(fig, out)
