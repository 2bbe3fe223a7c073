"""Phase steers a beam: a phased array of N antennas, with and without phase errors.

N elements on a line, spacing d. A plane wave leaving at angle theta reaches element n with an
extra path n d sin(theta), a phase k n d sin(theta) (k = 2 pi / lambda). Feeding element n with
phase -k n d sin(theta0) cancels that exactly at theta0: all N contributions add in phase there
and the beam points at theta0 with no moving part. The array factor
    AF(theta) = |sum_n exp(i k n d (sin theta - sin theta0))| / N
is the whole story: a DFT of the element weights (the FFT lab's transform), evaluated at
u = sin(theta). Small random phase errors (std sigma, radians) cost gain on average by
e^{-sigma^2} (Ruze's rule for arrays) and raise the sidelobes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mnistlab.labs import Check

TITLE = "a phased array's beam steered by per-element phases; beamwidth, sidelobes, phase errors, grating lobes"

N = 16  # elements
SPACING = 0.5  # d / lambda


def steering_phases(theta0_deg: float, n: int = N, spacing: float = SPACING) -> np.ndarray:
    """Per-element feed phases (radians) that point the beam at theta0."""
    return -2 * np.pi * spacing * np.arange(n) * np.sin(np.radians(theta0_deg))


def array_factor(theta_deg: np.ndarray, phases: np.ndarray, spacing: float = SPACING) -> np.ndarray:
    """|AF(theta)| in [0, 1] for element feed `phases` (N,), over angles theta (M,) in degrees."""
    n = np.arange(len(phases))
    path = 2 * np.pi * spacing * np.outer(np.sin(np.radians(theta_deg)), n)  # (M, N): geometry's phase
    return np.abs(np.exp(1j * (path + phases)).sum(1)) / len(phases)


def db(a: np.ndarray) -> np.ndarray:
    return 20 * np.log10(np.maximum(a, 1e-6))


def half_power_width(theta: np.ndarray, af: np.ndarray) -> float:
    """Width in degrees of the main lobe where |AF|^2 >= 1/2."""
    peak = int(af.argmax())
    lo = hi = peak
    while lo > 0 and af[lo] ** 2 >= 0.5:
        lo -= 1
    while hi < len(af) - 1 and af[hi] ** 2 >= 0.5:
        hi += 1
    return float(theta[hi] - theta[lo])


def peak_sidelobe(theta: np.ndarray, af: np.ndarray) -> float:
    """Highest sidelobe in dB: the largest local maximum outside the main lobe's nulls."""
    peak = int(af.argmax())
    lo = hi = peak
    while lo > 0 and af[lo - 1] < af[lo]:
        lo -= 1
    while hi < len(af) - 1 and af[hi + 1] < af[hi]:
        hi += 1
    rest = np.concatenate([af[:lo], af[hi + 1 :]])
    return float(db(rest.max()))


def run(out: Path | None = None) -> list[Check]:
    theta = np.linspace(-90, 90, 36001)  # 0.005 degree steps
    checks = []
    aims = [0.0, 20.0, 45.0, -30.0]
    found = [float(theta[array_factor(theta, steering_phases(a)).argmax()]) for a in aims]
    err = max(abs(f - a) for f, a in zip(found, aims, strict=True))
    checks.append(Check("the beam points where the phases steer it", err < 0.01,
                        ", ".join(f"aim {a:+.0f} -> peak {f:+.3f} deg" for a, f in zip(aims, found, strict=True))))
    w0 = half_power_width(theta, array_factor(theta, steering_phases(0)))
    theory = np.degrees(0.886 / (N * SPACING))
    checks.append(Check("broadside half-power beamwidth ~ 0.886 lambda / (N d)", abs(w0 - theory) / theory < 0.02,
                        f"measured {w0:.2f} deg, theory {theory:.2f} deg (N = {N}, d = {SPACING} lambda)"))
    w45 = half_power_width(theta, array_factor(theta, steering_phases(45)))
    checks.append(Check("steering widens the beam by 1 / cos(theta0)",
                        abs(w45 / w0 - 1 / np.cos(np.radians(45))) < 0.05,
                        f"width at 45 deg {w45:.2f} deg = {w45 / w0:.3f} x broadside (1/cos 45 = 1.414)"))
    sll = peak_sidelobe(theta, array_factor(theta, steering_phases(0)))
    checks.append(Check("uniform array: first sidelobe ~ -13.3 dB", abs(sll + 13.26) < 0.3, f"measured {sll:.2f} dB"))

    rng = np.random.default_rng(0)
    ideal = steering_phases(30)
    results = {}
    for sigma_deg in (10.0, 20.0, 40.0):
        s = np.radians(sigma_deg)
        errs = rng.normal(0, s, (400, N))
        gain = np.array([array_factor(np.array([30.0]), ideal + e)[0] ** 2 for e in errs]).mean()
        expected = np.exp(-s * s) + (1 - np.exp(-s * s)) / N  # coherent part + incoherent floor
        side = np.mean([peak_sidelobe(theta[::20], array_factor(theta[::20], ideal + e)) for e in errs[:40]])
        results[sigma_deg] = (gain, expected, side)
    ok = all(abs(g - e) < 0.02 for g, e, _ in results.values())
    checks.append(Check("random phase errors cost gain e^-sigma^2 (+ 1/N floor) on average", ok,
                        "; ".join(f"sigma {s:.0f} deg: mean |AF|^2 at aim {g:.3f} (theory {e:.3f})"
                                  for s, (g, e, _) in results.items())))
    ideal_sll = peak_sidelobe(theta[::20], array_factor(theta[::20], ideal))
    checks.append(Check("phase errors raise the sidelobes", results[40.0][2] > results[10.0][2] > ideal_sll,
                        f"peak sidelobe {ideal_sll:.1f} dB without errors; mean {results[10.0][2]:.1f} dB at 10 deg, "
                        f"{results[40.0][2]:.1f} dB at 40 deg"))
    wide = array_factor(np.array([-30.0, 30.0]), steering_phases(30, spacing=1.0), spacing=1.0)
    checks.append(Check("spacing of one wavelength: a grating lobe as strong as the beam (why d <= lambda/2)",
                        wide[0] > 0.99,
                        f"d = lambda, aim +30 deg: |AF| {wide[1]:.3f} at +30, {wide[0]:.3f} at -30 deg"))
    if out is not None:
        draw(out, theta, rng)
    return checks


def draw(out: Path, theta: np.ndarray, rng: np.random.Generator) -> None:
    from mnistlab.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw=dict(width_ratios=[1, 1.6, 1.6]))
    for aim, marker in ((0, "o"), (30, "s"), (60, "^")):
        axes[0].plot(np.arange(N), np.degrees(steering_phases(aim)), marker, ls="-", label=f"aim {aim} deg")
    axes[0].set_xlabel("element n")
    axes[0].set_ylabel("feed phase (degrees; only its value mod 360 matters)")
    axes[0].set_title("feed phase: a linear ramp in n", fontsize=10)
    axes[0].legend(fontsize=8)
    for aim in (0, 30, 60):
        axes[1].plot(theta, db(array_factor(theta, steering_phases(aim))), label=f"aim {aim} deg")
    axes[1].set_title(f"beam pattern, {N} elements, d = lambda/2: steered by phase alone")
    ideal = steering_phases(30)
    axes[2].plot(theta, db(array_factor(theta, ideal)), color="k", lw=1.5, label="no error")
    for sigma in (10, 40):
        e = rng.normal(0, np.radians(sigma), N)
        axes[2].plot(theta, db(array_factor(theta, ideal + e)), lw=1, label=f"phase errors, sigma {sigma} deg")
    axes[2].set_title("aim 30 deg, with random phase errors (one draw each)")
    for ax in axes[1:]:
        ax.set_ylim(-40, 2)
        ax.set_xlabel("angle (degrees)")
        ax.set_ylabel("|AF| (dB)")
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(alpha=0.3)
    save_figure(fig, out)
