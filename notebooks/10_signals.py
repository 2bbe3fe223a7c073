# %% [markdown]
# # Chapter 10: Signals: the FFT, phase, phased arrays and the cocktail party
#
# A picture is a signal in two dimensions, a sound a signal in one. The **Fourier transform**
# rewrites a signal as a sum of waves, each with a **magnitude** (how strong) and a **phase**
# (where it starts). Chapter 6 used it to turn convolution into multiplication; here we look at the
# transform itself:
#
# 1. a sine's spectrum, and Parseval's theorem (the energy is the same on both sides);
# 2. phase against magnitude: swap them between two digits, and the picture follows the **phase**;
# 3. phase steers a beam: a phased array of antennas points without moving;
# 4. the cocktail party: un-mix three sounds heard by three microphones (ICA), see where it breaks
#    (echoes), the STFT that rescues it, and what phase errors do to a sound.

# %%
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Audio, display

from mnistlab.data import load_dataset
from mnistlab.labs import cocktail_party as party
from mnistlab.labs import fft as fftlab
from mnistlab.labs import phase as phaselab

rng = np.random.default_rng(0)

# %% [markdown]
# ## A sine's spectrum
#
# The discrete Fourier transform of `N` samples, `X_k = sum_n x_n e^(-2 pi i k n / N)`, measures how
# much of the wave that makes `k` turns in the window is in the signal. A sine making 10 turns in
# 256 samples puts everything into bin 10 (and its mirror, bin 256 - 10: a real signal's spectrum is
# symmetric), with magnitude `N/2` times its amplitude. `mnistlab.labs.fft.fft` is the radix-2 FFT
# written out (divide into even and odd samples, reuse both halves); it equals numpy's.
#
# **Parseval's theorem**: the energy of the signal equals the energy of its spectrum, divided by
# `N`: `sum |x_n|^2 = (1/N) sum |X_k|^2`. The transform only re-expresses the signal; it loses and
# adds nothing.

# %%
N = 256
n = np.arange(N)
x = 1.5 * np.sin(2 * np.pi * 10 * n / N) + 0.5 * np.sin(2 * np.pi * 37 * n / N + 1.0)  # (256,): two tones
X = fftlab.fft(x)  # (256,) complex
mag = np.abs(X)
peaks = sorted(np.argsort(mag)[-4:].tolist())
energy_time, energy_freq = np.sum(x**2), np.sum(mag**2) / N
print("largest bins:", peaks, "| |X| there:", np.round(mag[peaks], 1), "(N/2 x amplitude: 192, 64)")
print(f"energy: {energy_time:.6f} in time, {energy_freq:.6f} in frequency (divided by N)")
assert np.allclose(X, np.fft.fft(x), atol=1e-9), "the lab's FFT is numpy's"
assert peaks == [10, 37, N - 37, N - 10], "each tone sits in its own bin and its mirror"
assert np.allclose(mag[[10, 37]], [1.5 * N / 2, 0.5 * N / 2]), "magnitude N/2 x amplitude"
assert abs(energy_time - energy_freq) < 1e-9 * energy_time, "Parseval: the same energy on both sides"

fig, (a0, a1) = plt.subplots(1, 2, figsize=(9, 2.8))
a0.plot(n, x, lw=1)
a0.set_xlabel("sample n")
a0.set_title("x: tones of 10 and 37 turns per window")
a1.stem(n[: N // 2], mag[: N // 2], markerfmt=" ", basefmt=" ")
a1.set_xlabel("bin k (turns per window)")
a1.set_ylabel("|X_k|")
a1.set_title("its spectrum (first half; the rest mirrors it)")
plt.tight_layout()

# %% [markdown]
# ## Phase carries the picture
#
# A 2-D FFT does the same to an image: waves across rows and columns. Take two digits, keep the
# **magnitude** of one and the **phase** of the other, and transform back. The magnitude says how
# much of each wave there is; the phase says where the waves line up, which is where the edges
# are. The hybrid looks like the digit whose **phase** it got (Oppenheim & Lim 1981).
# The lab's FFT needs a power-of-two size, so the 28x28 digits are padded to 32x32.

# %%
ds = load_dataset("digits")
labels = ds.test_labels.numpy()
ia, ib = int(np.flatnonzero(labels == 0)[0]), int(np.flatnonzero(labels == 7)[0])
a, b = (np.pad(ds.test_images[i].numpy() / 255.0, ((0, 4), (0, 4))) for i in (ia, ib))  # (32, 32) each
Fa, Fb = fftlab.fft2(a), fftlab.fft2(b)  # (32, 32) complex
assert np.allclose(Fa, np.fft.fft2(a)), "the lab's 2-D FFT (rows, then columns) is numpy's"

mag_a_phase_b = np.real(fftlab.ifft2(np.abs(Fa) * np.exp(1j * np.angle(Fb))))  # a's magnitude, b's phase
mag_b_phase_a = np.real(fftlab.ifft2(np.abs(Fb) * np.exp(1j * np.angle(Fa))))


def corr(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.corrcoef(u.ravel(), v.ravel())[0, 1])


print(f"|0| with the 7's phase: correlation {corr(mag_a_phase_b, b):.2f} with the 7, {corr(mag_a_phase_b, a):.2f} "
      "with the 0")
print(f"|7| with the 0's phase: correlation {corr(mag_b_phase_a, a):.2f} with the 0, {corr(mag_b_phase_a, b):.2f} "
      "with the 7")
assert corr(mag_a_phase_b, b) > corr(mag_a_phase_b, a) + 0.2, "the hybrid follows the phase"
assert corr(mag_b_phase_a, a) > corr(mag_b_phase_a, b) + 0.2, "the hybrid follows the phase"

fig, axes = plt.subplots(1, 4, figsize=(8, 2.4))
for ax, img, title in zip(axes, [a, b, mag_a_phase_b, mag_b_phase_a],
                          ["digit A (a 0)", "digit B (a 7)", "|A|, phase of B", "|B|, phase of A"], strict=True):
    ax.imshow(img[:28, :28], cmap="gray")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
plt.tight_layout()

# %% [markdown]
# ## Phase steers a beam
#
# Sixteen antennas on a line, half a wavelength apart. A wave leaving at angle theta reaches
# antenna `n` later by `n d sin(theta)`. Feed each antenna with the opposite phase shift and all
# sixteen add up in step in that one direction: the beam points there, with nothing moving. The
# beam pattern (the "array factor") is a DFT of the antennas' feeds, evaluated at `sin(theta)`:
# the same transform as above. `mnistlab lab phase` adds beam widths, sidelobes and phase errors.

# %%
theta = np.linspace(-90, 90, 3601)  # degrees, 0.05 apart
fig, ax = plt.subplots(figsize=(8, 3))
for aim in (0, 20, 45):
    feeds = phaselab.steering_phases(aim)  # (16,) radians: a linear ramp across the antennas
    pattern = phaselab.array_factor(theta, feeds)  # (3601,) in [0, 1]
    peak = theta[pattern.argmax()]
    print(f"aim {aim:2d} deg: feed phases step by {np.degrees(feeds[1] - feeds[0]):7.2f} deg per antenna; "
          f"beam peak at {peak:+.2f} deg, |AF| {pattern.max():.3f}")
    assert abs(peak - aim) < 0.1 and pattern.max() > 0.999, "the beam points where the phases steer it"
    ax.plot(theta, phaselab.db(pattern), lw=1, label=f"aim {aim} deg")
ax.set_ylim(-40, 2)
ax.set_xlabel("angle (degrees)")
ax.set_ylabel("|AF| (dB)")
ax.set_title("16 antennas, d = lambda/2: the beam moves with the phases alone")
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
plt.tight_layout()

# %% [markdown]
# ## The cocktail party
#
# Three sounds (two buzzy voices with vibrato and pauses, and bursts of noise; `mnistlab lab
# cocktail-party` uses real synthesised speech for one of them when `espeak-ng` is installed, here
# we keep the synthetic voices so that every machine hears the same) reach three microphones. Each
# microphone hears a different blend: `X = A S`, with `A` unknown. **Independent component analysis**
# finds an un-mixing matrix from the mixtures alone. Whitening (PCA scaled to unit variance) makes
# the outputs uncorrelated, but any rotation of white data is still white; FastICA then turns them
# until each is as **non-Gaussian** as possible, since a sum of independent signals is more Gaussian
# than each one (the central limit theorem). It is `mnistlab.labs.cocktail_party.fastica`, in numpy.
#
# The score is **SI-SDR** (scale-invariant signal-to-distortion ratio, in dB): how much of an
# estimate is the source, against everything else. ICA cannot know the order, scale or sign of
# the sources, so each estimate is first matched to a source (`match_sources`).

# %%
S, names = party.make_sources(use_speech=False)  # (3, 20000): 2.5 s at 8 kHz, unit variance each
A = party.mixing_matrix(3)  # (3, 3): how loud each source is at each microphone
X = party.mix(S, A)  # (3, 20000): what the microphones hear
ica = party.fastica(X)  # estimates (3, 20000), in ICA's own order and scale
ica_db = party.separation_db(S, ica.estimates)
Z, _, _ = party.whiten(X)  # PCA alone
pca_db = party.separation_db(S, Z)
print("sources:", names)
print("SI-SDR per source, FastICA:", np.round(ica_db, 1), f"dB ({ica.iterations} iterations)")
print("SI-SDR per source, whitening only:", np.round(pca_db, 1), "dB")
assert ica_db.min() >= 30, ("FastICA separates an instantaneous mixture", ica_db)
assert pca_db.max() < 20, ("uncorrelated is not independent: PCA alone does not separate", pca_db)

from sklearn.decomposition import FastICA  # noqa: E402

sk = FastICA(n_components=3, whiten="unit-variance", random_state=0, max_iter=1000, tol=1e-8)
sk_db = party.separation_db(S, sk.fit_transform(X.T).T)
print("SI-SDR per source, scikit-learn's FastICA:", np.round(sk_db, 1), "dB")
assert sk_db.min() >= 30, ("scikit-learn's FastICA separates it too", sk_db)

# %% [markdown]
# Listen: microphone 1, then FastICA's estimate of the 123 Hz voice from the three microphones
# (1 s each, 8 kHz; press play).

# %%
matched = party.match_sources(S, ica.estimates).aligned  # (3, 20000): estimates in the sources' order and scale
clip = slice(0, 8000)  # 1 s: each clip embeds about 21 KB in the page
display(Audio(X[0, clip], rate=party.FS))
display(Audio(matched[0, clip], rate=party.FS))

fig, axes = plt.subplots(3, 1, figsize=(8, 3.6), sharex=True)
t = np.arange(S.shape[1]) / party.FS
view = (t > 0.9) & (t < 1.0)  # 100 ms
for ax, sig, title in zip(axes, [S[0], X[0], matched[0]],
                          ["source: voice 123 Hz", "microphone 1: all three", "FastICA's estimate"], strict=True):
    ax.plot(t[view], sig[view], lw=0.8)
    ax.set_ylabel(title, fontsize=8, rotation=0, ha="right")
    ax.set_yticks([])
axes[-1].set_xlabel("time (s)")
fig.suptitle(f"100 ms of the voice: the estimate is the source ({ica_db[0]:.0f} dB)", fontsize=10)
plt.tight_layout()

# %% [markdown]
# ## A real room breaks it, and the STFT helps
#
# In a room each microphone hears each source a few samples late and with echoes off the walls:
# the mixture is a sum of **convolutions**, not one matrix, and no single un-mixing matrix undoes
# it. The short-time Fourier transform turns a convolution into a product in every frequency bin:
# bin by bin, the mixture is instantaneous again (a complex matrix per bin), and ICA can run in each
# of the 129 bins. But every bin returns the sources in its own order (the **permutation
# problem**): the bins must be aligned before the sources can be put back together. The lab aligns
# them by their loudness envelopes (bins of the same source rise and fall together).

# %%
delays = np.array([[0, 2, 4], [3, 0, 1], [5, 2, 0]])  # samples (1/8 ms each)
H = party.echo_filters(A, delays)  # (3, 3, 49): direct path plus 4 echoes, up to 6 ms
images = party.source_images(S, H)  # (3 mics, 3 sources, 20000): each source as each microphone hears it
Xe = images.sum(axis=1)  # (3, 20000): the room's mixtures
ref = images[0]  # (3, 20000): the sources as microphone 1 hears them, the references to score against

time_db = party.separation_db(ref, party.fastica(Xe).estimates)
per_bin = party.per_bin_ica(Xe)  # (3, 129 bins, frames): ICA in every bin, each in its own order
identity = np.tile(np.arange(3), (per_bin.shape[1], 1))  # keep ICA's order in every bin
unaligned_db = party.separation_db(ref, party.assemble(per_bin, identity, Xe.shape[1]))
aligned_db = party.separation_db(ref, party.assemble(per_bin, party.align_by_envelopes(per_bin), Xe.shape[1]))
print("mean SI-SDR in the room: time-domain ICA", f"{time_db.mean():.1f} dB;",
      f"per-bin ICA, bins unaligned {unaligned_db.mean():.1f} dB; aligned by envelopes {aligned_db.mean():.1f} dB")
assert time_db.mean() < 15 < 30 <= ica_db.min(), ("echoes break time-domain ICA", time_db)
assert aligned_db.mean() > time_db.mean() + 5, "per-bin ICA with aligned bins does better"
assert aligned_db.mean() > unaligned_db.mean() + 5, "without aligning the bins, per-bin ICA fails"

# %% [markdown]
# ## What phase errors do to a sound
#
# A spectrogram shows the STFT's magnitude; is that the sound? Keep the magnitude exactly, add
# random errors to the phase, and rebuild: SI-SDR falls steadily with the error (to the ear: a
# metallic, robotic voice). With no phase at all (random), **Griffin-Lim** guesses one that fits
# the magnitude, going back and forth between the signal and its STFT; it recovers part of the loss.

# %%
voice = S[1]  # the 197 Hz voice
magnitude = np.abs(party.stft(voice))  # (129, frames)
phase_rng = np.random.default_rng(7)
sigmas = [0.0, 0.2, 0.5, 1.0, 2.0]  # radians of Gaussian phase noise
phase_db = [party.si_sdr(voice, party.with_phase_noise(voice, s, phase_rng)) for s in sigmas]
random_phase = party.istft(magnitude * np.exp(1j * phase_rng.uniform(-np.pi, np.pi, magnitude.shape)), voice.size)
gl = party.griffin_lim(magnitude, voice.size, n_iter=50, seed=0)
random_db, gl_db = party.si_sdr(voice, random_phase), party.si_sdr(voice, gl)
print("phase noise (rad) -> SI-SDR (dB):",
      ", ".join(f"{s:g}: {d:.1f}" if d < 100 else f"{s:g}: exact" for s, d in zip(sigmas, phase_db, strict=True)))
print(f"random phase {random_db:.1f} dB; Griffin-Lim (50 rounds) from it {gl_db:.1f} dB")
assert all(d1 > d2 for d1, d2 in zip(phase_db, phase_db[1:], strict=False)), "more phase error, worse sound"
assert gl_db > random_db + 3, "Griffin-Lim recovers part of what random phase lost"

fig, ax = plt.subplots(figsize=(8.5, 2.8))
ax.plot(sigmas[1:], phase_db[1:], "o-", label="exact magnitude, noisy phase\n(at 0 rad: exact, not drawn)")
ax.axhline(random_db, color="tab:red", ls="--", lw=1, label="random phase")
ax.axhline(gl_db, color="tab:green", ls=":", lw=1.5, label="Griffin-Lim from random phase")
ax.set_xlabel("phase noise sigma (radians)")
ax.set_ylabel("SI-SDR (dB)")
ax.set_title("the magnitude alone is not the sound")
ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes, off the lines
ax.grid(alpha=0.3)
plt.tight_layout()
display(Audio(party.with_phase_noise(voice, 1.0, phase_rng)[clip], rate=party.FS))  # listen: 1 rad of noise

# %% [markdown]
# ## Where next
#
# Chapter 11 takes a trained model out into the world. The labs behind this chapter, with more
# checks and a figure each: `mnistlab lab fft`, `mnistlab lab phase`, and `mnistlab lab
# cocktail-party -o party.png` (it also writes the WAV files beside the figure, to listen to every
# step).
