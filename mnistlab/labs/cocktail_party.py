"""The cocktail party: un-mixing voices with ICA, where it breaks (delays, echoes), and what phase does to sound.

Three sources (two voiced signals with vibrato, or one of them real speech when `espeak-ng` is
installed, and noise bursts) reach three microphones. Instantaneous mixing: each microphone hears
x = A s, a fixed blend, so un-mixing is one matrix W ~ A^-1. Independent component analysis (ICA)
finds W from the mixtures alone: whitening (PCA scaled to unit variance) removes correlation, but
every rotation of white data is still white, so whitening alone cannot pick the sources; FastICA
(Hyvarinen & Oja 2000) then turns the white data until each output is as non-Gaussian as it can be
(a sum of independent signals is more Gaussian than each of them: the central limit theorem).
ICA cannot know the sources' order, scale or sign: any of them fits the mixtures equally well.

SI-SDR, the scale-invariant signal-to-distortion ratio (Le Roux et al. 2019), scores an estimate
s_hat of a reference s: with a = <s_hat, s> / ||s||^2 the best scale,
    SI-SDR = 10 log10(||a s||^2 / ||a s - s_hat||^2)   in dB (30 dB: the error is 1/1000 of the power).
Estimates are first matched to sources (the Hungarian method on |correlation|), since ICA's order
is arbitrary.

Real rooms are convolutive: each microphone hears every source delayed and echoed, x_m = sum_j
h_mj * s_j, and one matrix can no longer undo that. The short-time Fourier transform turns a
convolution into a product in each frequency bin f: X(f, t) ~ H(f) S(f, t), one instantaneous
(complex) mixture per bin, so ICA can run bin by bin; but each bin returns its own order (the
permutation problem), and the bins must be aligned before the sources can be put back together.

Phase: a spectrogram's magnitude is not the whole sound. Rebuilt with noisy phase, a voice turns
metallic and robotic; Griffin & Lim (1984) guess a phase that fits the magnitude by going back and
forth between the signal and its STFT.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mnistlab.labs import Check

TITLE = "ICA un-mixes voices (SI-SDR); delays and echoes break it; per-bin ICA and its permutations; phase, Griffin-Lim"

FS = 8000  # samples per second: telephone quality, enough for voices
SECONDS = 2.5
N_SAMPLES = int(FS * SECONDS)
NPERSEG, NOVERLAP = 256, 192  # STFT: 32 ms Hann windows every 8 ms (129 bins, ~316 frames)
SPEECH_TEXT = "Which voice is which? Can you tell them apart?"
PHASE_SIGMAS = (0.0, 0.2, 0.5, 1.0, 2.0)  # radians of Gaussian phase noise


# --- sources and mixing ---


def harmonic_voice(f0: float, vibrato_hz: float, syllable_hz: float, seed: int, n: int = N_SAMPLES,
                   fs: int = FS) -> np.ndarray:
    """A voiced sound: harmonics of a pitch f0 that wobbles (vibrato, +-3%), switched on and off like syllables.

    Harmonic h has amplitude 1/h (a buzzy vocal source); the random starting phases come from `seed`.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(n) / fs
    pitch = f0 * (1 + 0.03 * np.sin(2 * np.pi * vibrato_hz * t))  # (n,) Hz
    cycles = 2 * np.pi * np.cumsum(pitch) / fs  # the fundamental's phase, integrated from the pitch
    x = np.zeros(n)
    for h in range(1, int(0.45 * fs / (1.03 * f0)) + 1):  # harmonics below 0.45 fs: no aliasing
        x += np.sin(h * cycles + rng.uniform(0, 2 * np.pi)) / h
    syllables = np.clip(np.sin(2 * np.pi * syllable_hz * t + rng.uniform(0, 2 * np.pi)), 0, None) ** 0.5
    return x * syllables


def noise_bursts(seed: int, n: int = N_SAMPLES, fs: int = FS) -> np.ndarray:
    """White noise switched on in bursts of 50-150 ms (a door, a clatter): very non-Gaussian, easy for ICA."""
    rng = np.random.default_rng(seed)
    gate = np.zeros(n)
    start = int(0.05 * fs)
    while start < n:
        length = int(rng.uniform(0.05, 0.15) * fs)
        gate[start : start + length] = np.hanning(length)[: n - start]
        start += length + int(rng.uniform(0.1, 0.3) * fs)
    return rng.standard_normal(n) * gate


def speech(text: str = SPEECH_TEXT, n: int = N_SAMPLES, fs: int = FS) -> np.ndarray | None:
    """`text` spoken by espeak-ng (a formant synthesiser), resampled to fs and cut or padded to n samples.

    None when espeak-ng is not installed or fails: the lab then uses a second synthetic voice instead.
    """
    from scipy.signal import resample_poly

    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "speech.wav")
        try:
            subprocess.run([exe, "-v", "en-us", "-s", "170", "-w", path, text], check=True, capture_output=True,
                           timeout=30)
            with wave.open(path) as w:
                rate, raw = w.getframerate(), w.readframes(w.getnframes())
        except (OSError, subprocess.SubprocessError, wave.Error, EOFError):
            return None
    x = np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32768.0
    if x.size == 0:
        return None
    g = np.gcd(fs, rate)
    x = resample_poly(x, fs // g, rate // g)
    return np.pad(x, (0, max(0, n - x.size)))[:n]


def make_sources(n: int = N_SAMPLES, fs: int = FS, use_speech: bool = True) -> tuple[np.ndarray, list[str]]:
    """Three sources (3, n), each scaled to unit variance, and their names.

    A low voice (123 Hz), a higher voice (197 Hz; or real speech when use_speech and espeak-ng is
    installed), and noise bursts. Deterministic: fixed seeds, and espeak-ng's output is fixed too.
    """
    second = speech(n=n, fs=fs) if use_speech else None
    voices = [harmonic_voice(123.0, 5.0, 2.1, seed=1, n=n, fs=fs),
              second if second is not None else harmonic_voice(197.0, 6.3, 2.9, seed=2, n=n, fs=fs),
              noise_bursts(seed=3, n=n, fs=fs)]
    names = ["voice 123 Hz", "speech (espeak-ng)" if second is not None else "voice 197 Hz", "noise bursts"]
    S = np.stack(voices)
    return S / S.std(axis=1, keepdims=True), names


def mixing_matrix(k: int = 3, seed: int = 0) -> np.ndarray:
    """A random (k, k) mixing matrix: entry [m, j] is how loud source j is at microphone m (0.2 to 1)."""
    return np.random.default_rng(seed).uniform(0.2, 1.0, (k, k))


def mix(S: np.ndarray, A: np.ndarray) -> np.ndarray:
    """Instantaneous mixing: microphone m hears sum_j A[m, j] s_j, all at the same moment. (k, n) -> (m, n)."""
    return A @ S


def delay_filters(A: np.ndarray, delays: np.ndarray) -> np.ndarray:
    """Room filters (m, k, L) for 'each microphone hears each source A[m, j] loud, delays[m, j] samples late'."""
    H = np.zeros((*A.shape, int(delays.max()) + 1))
    for (m, j), d in np.ndenumerate(delays):
        H[m, j, d] = A[m, j]
    return H


def echo_filters(A: np.ndarray, delays: np.ndarray, n_echoes: int = 4, max_delay: int = 48,
                 seed: int = 0) -> np.ndarray:
    """A simple room: the direct path of delay_filters plus `n_echoes` weaker copies (walls) up to max_delay samples.

    Each echo has a random delay and a gain of 0.2 to 0.6 of the direct path, fading with its delay.
    max_delay 48 samples is 6 ms at 8 kHz: a small room, short next to the STFT's 32 ms window.
    """
    rng = np.random.default_rng(seed)
    H = delay_filters(A, delays)
    H = np.pad(H, ((0, 0), (0, 0), (0, max_delay + 1 - H.shape[-1])))
    for m, j in np.ndindex(*A.shape):
        for _ in range(n_echoes):
            d = int(rng.integers(delays[m, j] + 6, max_delay + 1))
            H[m, j, d] += A[m, j] * rng.uniform(0.2, 0.6) * rng.choice([-1, 1]) * (1 - 0.5 * d / max_delay)
    return H


def source_images(S: np.ndarray, H: np.ndarray) -> np.ndarray:
    """What each microphone hears of each source alone: images[m, j] = h_mj * s_j, (m, k, n), cut to n samples.

    The mixture is their sum over j. Separation in a room is judged against the images at one
    microphone (each source as it sounds there, echoes included), not the dry sources.
    """
    from scipy.signal import fftconvolve

    n = S.shape[1]
    return fftconvolve(H, S[None, :, :], axes=-1)[..., :n]


def convolutive_mix(S: np.ndarray, H: np.ndarray) -> np.ndarray:
    """Convolutive mixing: microphone m hears sum_j h_mj * s_j (delayed, attenuated copies). (k, n) -> (m, n)."""
    return source_images(S, H).sum(axis=1)


# --- ICA ---


def _hermitian(M: np.ndarray) -> np.ndarray:
    return M.conj().swapaxes(-1, -2)


def whiten(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA whitening: Z = K (X - mean) has identity covariance; returns (Z, K, mean).

    X is (..., m, n): m signals of n samples (a leading batch axis, e.g. frequency bins, is allowed;
    complex X too). K = D^-1/2 E^H from the covariance's eigendecomposition C = E D E^H; the rows of
    Z are the principal components, largest first, each scaled to unit variance.
    """
    mean = X.mean(axis=-1, keepdims=True)
    Xc = X - mean
    C = Xc @ _hermitian(Xc) / X.shape[-1]  # (..., m, m)
    d, E = np.linalg.eigh(C)  # ascending eigenvalues
    d, E = d[..., ::-1], E[..., ::-1]
    K = (1 / np.sqrt(d))[..., :, None] * _hermitian(E)
    return K @ Xc, K, mean


def symmetric_decorrelation(W: np.ndarray) -> np.ndarray:
    """(W W^H)^-1/2 W: the orthonormal matrix nearest W, so all rows are made orthogonal at once, none favoured."""
    d, E = np.linalg.eigh(W @ _hermitian(W))
    return (E * (1 / np.sqrt(d))[..., None, :]) @ _hermitian(E) @ W


class ICAResult(NamedTuple):
    """What fastica returns: estimates = unmixing @ (X - mean), in ICA's own order, unit variance."""

    estimates: np.ndarray  # (..., m, n)
    unmixing: np.ndarray  # (..., m, m): whitening included, so inv(unmixing) estimates the mixing matrix
    iterations: int


def fastica(X: np.ndarray, max_iter: int = 400, tol: float = 1e-10, seed: int = 0) -> ICAResult:
    """FastICA with symmetric decorrelation: whiten X (..., m, n), then turn the white data to maximise non-Gaussianity.

    Each row w of W (one output y = w z) moves by the fixed-point step of Hyvarinen & Oja (2000),
        w <- E{z g(y)} - E{g'(y)} w,   g = tanh (the derivative of log cosh),
    which climbs towards an output whose distribution is as far from Gaussian as the data allows;
    then all rows are made orthonormal together (symmetric_decorrelation). For complex X (one
    STFT bin of several microphones) the step is Bingham & Hyvarinen's (2000) complex one,
        w <- E{z conj(y) g(|y|^2)} - E{g(|y|^2) + |y|^2 g'(|y|^2)} w,   g(u) = 1 / (0.1 + u),
    written here for the rows of W (w^H). It stops when no row moves (|<w_new, w_old>| = 1 within tol).
    A leading batch axis (frequency bins) runs all its problems at once.
    """
    Z, K, mean = whiten(X)
    n = Z.shape[-1]
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(K.shape)
    if np.iscomplexobj(Z):
        W = W + 1j * rng.standard_normal(K.shape)
    W = symmetric_decorrelation(W)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        Y = W @ Z  # (..., m, n): the current outputs
        if np.iscomplexobj(Z):
            u = np.abs(Y) ** 2
            g, dg = 1 / (0.1 + u), -1 / (0.1 + u) ** 2
            W_new = (Y * g) @ _hermitian(Z) / n - (g + u * dg).mean(-1)[..., None] * W
        else:
            g = np.tanh(Y)
            W_new = g @ Z.swapaxes(-1, -2) / n - (1 - g**2).mean(-1)[..., None] * W
        W_new = symmetric_decorrelation(W_new)
        change = np.abs(np.abs(np.einsum("...ij,...ij->...i", W_new, W.conj())) - 1).max()
        W = W_new
        if change < tol:
            break
    return ICAResult(W @ Z, W @ K, iterations)


# --- scoring ---


def si_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant signal-to-distortion ratio in dB (Le Roux et al. 2019) of `estimate` against `reference`.

    a = <estimate, reference> / ||reference||^2 scales the reference to fit the estimate best;
    SI-SDR = 10 log10(||a s||^2 / ||a s - estimate||^2). Any scale (and sign) of the estimate scores
    the same; whatever is left over (other sources, noise, artefacts) is distortion.
    """
    s, e = np.asarray(reference, dtype=np.float64), np.asarray(estimate, dtype=np.float64)
    a = np.sum(e * s) / np.sum(s * s)  # elementwise sums, not np.dot: no BLAS threads for 20,000 products
    target = a * s
    distortion = np.sum((target - e) ** 2)
    return float(10 * np.log10(np.sum(target**2) / max(distortion, 1e-300)))


class Matching(NamedTuple):
    """match_sources' answer: estimates[order[j]] goes with source j; `aligned` is them in that order, rescaled."""

    order: np.ndarray  # (k,) int
    aligned: np.ndarray  # (k, n): estimate of source j, scaled (and sign-flipped) to fit source j best
    correlation: np.ndarray  # (k sources, k estimates): |correlation| between every source and every estimate


def match_sources(S: np.ndarray, S_hat: np.ndarray) -> Matching:
    """Pair each source (row of S) with one estimate (row of S_hat), undoing ICA's arbitrary order, scale and sign.

    The pairing maximises the sum of |correlation| over the pairs (the Hungarian method,
    scipy.optimize.linear_sum_assignment); each estimate is then scaled by the least-squares factor
    (negative when the sign came out flipped; complex for STFT bins) that fits its source.
    """
    from scipy.optimize import linear_sum_assignment

    Sc = S - S.mean(-1, keepdims=True)
    Ec = S_hat - S_hat.mean(-1, keepdims=True)
    inner = Sc @ Ec.conj().T  # (k, k): <s_j, e_i>
    corr = np.abs(inner) / np.outer(np.linalg.norm(Sc, axis=-1), np.linalg.norm(Ec, axis=-1))
    _, order = linear_sum_assignment(-corr)
    picked = S_hat[order]
    scale = np.einsum("jn,jn->j", S.conj(), picked).conj() / np.sum(np.abs(picked) ** 2, axis=-1)
    return Matching(order, picked * scale[:, None], corr)


def separation_db(references: np.ndarray, estimates: np.ndarray) -> np.ndarray:
    """SI-SDR (dB) of each reference (k, n) against its matched estimate: estimates in any order, scale or sign."""
    m = match_sources(references, estimates)
    return np.array([si_sdr(r, e) for r, e in zip(references, m.aligned, strict=True)])


# --- the STFT view ---


def stft(x: np.ndarray) -> np.ndarray:
    """Short-time Fourier transform along the last axis: (..., n) -> (..., 129 bins, frames), 32 ms Hann windows."""
    from scipy.signal import stft as scipy_stft

    return scipy_stft(x, fs=FS, nperseg=NPERSEG, noverlap=NOVERLAP)[2]


def istft(X: np.ndarray, n: int) -> np.ndarray:
    """The signal (..., n) whose STFT is nearest X (overlap-add of the inverse FFTs; exact when X is an STFT)."""
    from scipy.signal import istft as scipy_istft

    x = scipy_istft(X, fs=FS, nperseg=NPERSEG, noverlap=NOVERLAP)[1]
    return x[..., :n]


def per_bin_ica(X: np.ndarray, seed: int = 0) -> np.ndarray:
    """Complex FastICA in every STFT bin of the mixtures X (m, n); returns the estimated images (k, bins, frames).

    In bin f the mixture is instantaneous, X(f, t) ~ H(f) S(f, t), so fastica un-mixes it; each
    output is then scaled back to how it sounds at microphone 0 (row 0 of inv(W_f) times the output,
    the 'projection back' that fixes ICA's scale per bin). The outputs keep ICA's order in each
    bin: nothing here aligns bins with each other.
    """
    Xf = stft(X).transpose(1, 0, 2)  # (bins, m, frames): one small mixing problem per bin
    res = fastica(Xf, max_iter=100, tol=1e-6, seed=seed)  # a few near-silent bins converge slowly; 100 steps suffice
    A = np.linalg.inv(res.unmixing)  # (bins, m, k): estimated mixing per bin
    images = A[:, 0, :, None] * res.estimates  # (bins, k, frames): each output as heard at microphone 0
    return images.transpose(1, 0, 2)


def oracle_permutations(reference_stft: np.ndarray, estimate_stft: np.ndarray) -> np.ndarray:
    """For each bin, the order of the estimates that matches the true sources (bins, k): cheating, to measure.

    reference_stft, estimate_stft: (k, bins, frames). A real system must find this order from the
    estimates alone (e.g. by how their loudness rises and falls together across bins).
    """
    k, bins, _ = reference_stft.shape
    perms = np.zeros((bins, k), dtype=int)
    for f in range(bins):
        perms[f] = match_sources(reference_stft[:, f], estimate_stft[:, f]).order
    return perms


def align_by_envelopes(estimate_stft: np.ndarray, n_pass: int = 10) -> np.ndarray:
    """Per-bin orders (bins, k) found from the estimates alone: outputs whose loudness rises and falls together
    across time belong to the same source (Murata, Ikeda & Ziehe 2001).

    Each output's envelope |Y(f, t)| over the frames is centred and scaled to unit length; source j's
    centroid is the sum of the envelopes currently assigned to it in all bins. Each pass gives every
    bin the order that best matches the centroids (Hungarian method), then recomputes them, until no
    bin changes. Which centroid is which source stays unknown (a global order, like ICA's own).
    """
    from scipy.optimize import linear_sum_assignment

    env = np.abs(estimate_stft)  # (k, bins, frames)
    env = env - env.mean(-1, keepdims=True)
    env = env / (np.linalg.norm(env, axis=-1, keepdims=True) + 1e-12)
    k, bins, _ = env.shape
    perms = np.tile(np.arange(k), (bins, 1))  # start from ICA's own order in every bin
    for _ in range(n_pass):
        centroids = env[perms.T, np.arange(bins)[None, :]].sum(1)  # (k, frames)
        new = np.array([linear_sum_assignment(-(centroids @ env[:, f].T))[1] for f in range(bins)])
        if (new == perms).all():
            break
        perms = new
    return perms


def assemble(estimate_stft: np.ndarray, perms: np.ndarray, n: int) -> np.ndarray:
    """Put each source's bins together (perms[f, j]: which output is source j in bin f) and go back to time (k, n)."""
    bins = np.arange(estimate_stft.shape[1])
    chosen = estimate_stft[perms.T, bins[None, :]]  # (k, bins, frames)
    return istft(chosen, n)


# --- phase ---


def with_phase_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """x rebuilt from its STFT magnitude and its phase plus Gaussian noise of `sigma` radians (sigma 0: exact)."""
    X = stft(x)
    noisy = np.abs(X) * np.exp(1j * (np.angle(X) + sigma * rng.standard_normal(X.shape)))
    return istft(noisy, x.shape[-1])


def griffin_lim(magnitude: np.ndarray, n: int, n_iter: int = 100, seed: int = 0,
                phase: np.ndarray | None = None) -> np.ndarray:
    """A signal of n samples whose STFT magnitude is close to `magnitude` (bins, frames) (Griffin & Lim 1984).

    Start from `phase` (random when None); then repeat: go to the time domain (istft), back to an
    STFT, keep that STFT's phase and put the wanted magnitude back. Each round the magnitude error
    cannot grow; the phase that comes out is consistent across the overlapping frames, though not
    the original one (the ear hears that as a smeared, phasey sound rather than a robotic one).
    """
    if phase is None:
        phase = np.random.default_rng(seed).uniform(-np.pi, np.pi, magnitude.shape)
    X = magnitude * np.exp(1j * phase)
    for _ in range(n_iter):
        X = magnitude * np.exp(1j * np.angle(stft(istft(X, n))))
    return istft(X, n)


def spectral_convergence(x: np.ndarray, magnitude: np.ndarray) -> float:
    """|| |STFT(x)| - magnitude || / || magnitude ||: how far x's spectrogram is from the wanted one (0: equal)."""
    return float(np.linalg.norm(np.abs(stft(x)) - magnitude) / np.linalg.norm(magnitude))


# --- sound files ---


def sound_folder(out: Path) -> Path:
    """Where `mnistlab lab cocktail-party -o FIG.png` writes its WAV files: FIG_wav/ beside the figure."""
    return out.with_name(out.stem + "_wav")


def wav_bytes(x: np.ndarray, fs: int = FS) -> bytes:
    """x as a mono 16-bit PCM WAV file, scaled so its loudest sample is at 90% of full scale."""
    peak = np.abs(x).max()
    pcm = np.round(x / (peak if peak > 0 else 1.0) * 0.9 * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(fs)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def write_sounds(folder: Path, sounds: dict[str, np.ndarray], fs: int = FS) -> list[Path]:
    """Write each signal as folder/<name>.wav (16-bit PCM, each scaled to its own peak); returns the paths."""
    from mnistlab.errors import UserError
    from mnistlab.files import atomic_write_bytes

    paths = []
    for name, x in sounds.items():
        path = folder / f"{name}.wav"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, wav_bytes(x, fs))
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror or e}") from e
        paths.append(path)
    return paths


# --- the lab ---


def _dbs(values) -> str:
    return ", ".join(f"{v:.1f}" for v in values) + " dB"


def run(out: Path | None = None, use_speech: bool = True) -> list[Check]:
    S, names = make_sources(use_speech=use_speech)
    k, n = S.shape
    A = mixing_matrix(k)
    X = mix(S, A)
    checks = []

    # 1. instantaneous mixing: FastICA separates, whitening alone does not
    ica = fastica(X)
    m = match_sources(S, ica.estimates)
    ica_db = np.array([si_sdr(s, e) for s, e in zip(S, m.aligned, strict=True)])
    checks.append(Check("FastICA separates an instantaneous mixture (SI-SDR >= 30 dB for every source)",
                        ica_db.min() >= 30,
                        f"{', '.join(f'{nm} {d:.1f} dB' for nm, d in zip(names, ica_db, strict=True))}; "
                        f"{ica.iterations} iterations; mixing matrix condition number {np.linalg.cond(A):.1f}"))
    Z, _, _ = whiten(X)
    pca_db = separation_db(S, Z)
    checks.append(Check("whitening (PCA) alone does not separate: uncorrelated is not independent",
                        pca_db.max() < 20 and ica_db.min() - pca_db.max() > 15,
                        f"PCA components matched to sources: {_dbs(pca_db)}; max |correlation| between "
                        f"whitened outputs {np.abs(np.corrcoef(Z) - np.eye(k)).max():.1e}"))

    # 2. order, scale and sign: arbitrary; matching fixes them
    patterns, raw_db, matched_db = set(), [], []
    for seed in range(6):
        r = fastica(X, seed=seed)
        mm = match_sources(S, r.estimates)
        signs = np.sign(np.einsum("jn,jn->j", S, r.estimates[mm.order]))
        patterns.add(tuple(int(o) * int(s) for o, s in zip(mm.order + 1, signs, strict=True)))
        raw_db.append(min(si_sdr(s, e) for s, e in zip(S, r.estimates, strict=True)))
        matched_db.append(min(si_sdr(s, e) for s, e in zip(S, mm.aligned, strict=True)))
    rms = ica.estimates.std(axis=1)
    checks.append(Check("ICA returns sources in its own order, sign and scale; matching undoes all three",
                        len(patterns) > 1 and min(raw_db) < 0 and min(matched_db) >= 30,
                        f"6 random starts gave {len(patterns)} different (estimate for source 1, 2, 3) patterns "
                        f"(- = sign flipped): {sorted(patterns)}; every output has rms {rms.mean():.2f} whatever "
                        f"the source's loudness; worst SI-SDR taking outputs in ICA's order {min(raw_db):.1f} dB, "
                        f"after matching {min(matched_db):.1f} dB"))

    # 3. scikit-learn agrees
    from sklearn.decomposition import FastICA

    sk = FastICA(n_components=k, whiten="unit-variance", random_state=0, max_iter=1000, tol=1e-8)
    sk_est = sk.fit_transform(X.T).T
    sk_db = separation_db(S, sk_est)
    both = match_sources(m.aligned, sk_est)
    agree = np.array([both.correlation[j, both.order[j]] for j in range(k)])
    checks.append(Check("scikit-learn's FastICA finds the same sources",
                        agree.min() > 0.999 and np.abs(sk_db - ica_db).max() < 3,
                        f"|correlation| with ours after matching {', '.join(f'{a:.6f}' for a in agree)}; "
                        f"scikit-learn's SI-SDR {_dbs(sk_db)} (ours {_dbs(ica_db)})"))

    # 4. the hard cases: a few samples of delay, a room's echoes
    delays = np.array([[0, 2, 4], [3, 0, 1], [5, 2, 0]])  # samples (0.25 ms each at 8 kHz)
    cases = {"instantaneous": delay_filters(A, np.zeros_like(delays)), "delays": delay_filters(A, delays),
             "echoes": echo_filters(A, delays)}
    time_db, mixtures, images = {}, {}, {}
    for case, H in cases.items():
        images[case] = source_images(S, H)  # (m, k, n)
        mixtures[case] = images[case].sum(axis=1)
        time_db[case] = separation_db(images[case][0], fastica(mixtures[case]).estimates)
    checks.append(Check("a delay of a few samples between microphones, or a room's echoes, break ICA",
                        time_db["delays"].mean() < 20 and time_db["echoes"].mean() < 15,
                        f"SI-SDR against each source as heard at microphone 1: instantaneous "
                        f"{_dbs(time_db['instantaneous'])}; delays of 1-5 samples {_dbs(time_db['delays'])}; "
                        f"echoes (4 per path, up to 6 ms) {_dbs(time_db['echoes'])}"))

    # 5. the STFT view: one complex mixture per bin; the permutation problem
    Xe = mixtures["echoes"]
    ref_images = images["echoes"][0]  # (k, n): each source as microphone 0 hears it
    est_stft = per_bin_ica(Xe)  # (k, bins, frames)
    ref_stft = stft(ref_images)
    perms = oracle_permutations(ref_stft, est_stft)
    identity = np.tile(np.arange(k), (perms.shape[0], 1))
    unaligned_db = separation_db(ref_images, assemble(est_stft, identity, n))
    oracle_db = separation_db(ref_images, assemble(est_stft, perms, n))
    by_envelopes = match_sources(ref_images, assemble(est_stft, align_by_envelopes(est_stft), n)).aligned
    aligned_db = np.array([si_sdr(r, e) for r, e in zip(ref_images, by_envelopes, strict=True)])
    in_order = np.mean((perms == perms[0]).all(axis=1))
    n_orders = len({tuple(p) for p in perms})
    chance = math.factorial(k)
    checks.append(Check("per-bin ICA un-mixes the echoes once the bins are aligned (oracle order); unaligned it fails",
                        oracle_db.mean() > time_db["echoes"].mean() + 5 and oracle_db.mean() > unaligned_db.mean() + 5,
                        f"{perms.shape[0]} bins: {n_orders} of the {chance} possible orders occur, {in_order:.0%} of "
                        f"bins share bin 0's (1 in {chance} by chance); SI-SDR with ICA's order in every bin "
                        f"{_dbs(unaligned_db)}; with the oracle order per bin {_dbs(oracle_db)}; aligned by "
                        f"envelopes, without the oracle {_dbs(aligned_db)} (time-domain ICA on the same mixture "
                        f"{_dbs(time_db['echoes'])})"))
    checks.append(Check("aligning the bins by their envelopes, without the oracle, gets most of the way",
                        aligned_db.mean() > unaligned_db.mean() + 5 and aligned_db.mean() > oracle_db.mean() - 3,
                        f"mean SI-SDR {aligned_db.mean():.1f} dB by envelopes, {oracle_db.mean():.1f} dB with the "
                        f"oracle order, {unaligned_db.mean():.1f} dB unaligned"))

    # 6. phase: noise on the phase, then Griffin-Lim from random phase
    rng = np.random.default_rng(7)
    voice = S[1]
    mag = np.abs(stft(voice))
    damaged = {s: [with_phase_noise(voice, s, rng) for _ in range(3)] for s in PHASE_SIGMAS}
    phase_db = {s: float(np.mean([si_sdr(voice, y) for y in ys])) for s, ys in damaged.items()}
    random_phase = istft(mag * np.exp(1j * rng.uniform(-np.pi, np.pi, mag.shape)), n)
    random_db = si_sdr(voice, random_phase)
    values = list(phase_db.values())
    checks.append(Check("phase errors alone ruin a sound: SI-SDR falls steadily with the phase noise",
                        all(a > b for a, b in zip(values, values[1:], strict=False)),
                        f"{names[1]}, magnitude kept exactly, Gaussian phase noise sigma "
                        + ", ".join(f"{s:g} rad: {d:.1f} dB" for s, d in phase_db.items())
                        + f"; uniformly random phase: {random_db:.1f} dB"))
    gl = griffin_lim(mag, n, n_iter=100, seed=0)
    gl_db = si_sdr(voice, gl)
    sc_random, sc_gl = spectral_convergence(random_phase, mag), spectral_convergence(gl, mag)
    checks.append(Check("Griffin-Lim recovers part of it from random phase",
                        gl_db > random_db + 3 and sc_gl < 0.5 * sc_random,
                        f"100 iterations: SI-SDR {gl_db:.1f} dB against {random_db:.1f} dB for the random phase it "
                        f"started from; spectrogram error {sc_gl:.3f} against {sc_random:.3f}"))
    if out is not None:
        draw(out, S, names, X, m.aligned, {"PCA only": pca_db, "FastICA": ica_db, "scikit-learn": sk_db,
                                          "delays": time_db["delays"], "echoes": time_db["echoes"],
                                          "per bin, ICA order": unaligned_db, "per bin, oracle order": oracle_db,
                                          "per bin, by envelopes": aligned_db},
             perms, phase_db, random_db, gl_db)
        sounds = {f"source{j + 1}_{nm.split(' (')[0].replace(' ', '_')}": s
                  for j, (nm, s) in enumerate(zip(names, S, strict=True))}
        sounds |= {f"mix_mic{i + 1}": x for i, x in enumerate(X)}
        sounds |= {f"ica_estimate{j + 1}": e for j, e in enumerate(m.aligned)}
        sounds |= {f"echo_mix_mic{i + 1}": x for i, x in enumerate(Xe)}
        sounds |= {f"echo_per_bin_estimate{j + 1}": e for j, e in enumerate(by_envelopes)}
        sounds |= {f"phase_noise_{s:g}rad": ys[0] for s, ys in damaged.items()}
        sounds |= {"phase_random": random_phase, "griffin_lim": gl}
        write_sounds(sound_folder(out), sounds)
    return checks


def _traces(ax, signals: np.ndarray, labels: list[str], colors: list, title: str, t0: float = 0.9,
            t1: float = 1.3) -> None:
    """Signals stacked one above the other over the time window t0..t1 seconds, each scaled to its own peak there."""
    a, b = int(t0 * FS), int(t1 * FS)
    t = np.arange(a, b) / FS
    for i, (x, label, color) in enumerate(zip(signals, labels, colors, strict=True)):
        seg = x[a:b] / (2.2 * np.abs(x[a:b]).max())
        ax.plot(t, seg - i, color=color, lw=0.7)
        ax.text(t0, -i + 0.42, label, fontsize=8, va="bottom", ha="left",
                bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
    ax.set_yticks([])
    ax.set_ylim(-len(signals) + 0.45, 0.95)
    ax.set_xlabel("time (s)")
    ax.set_title(title, fontsize=10)


def draw(out: Path, S: np.ndarray, names: list[str], X: np.ndarray, aligned: np.ndarray, bars: dict[str, np.ndarray],
         perms: np.ndarray, phase_db: dict[float, float], random_db: float, gl_db: float) -> None:
    from matplotlib.colors import ListedColormap

    from mnistlab.plots import pyplot, save_figure

    plt = pyplot()
    colors = ["tab:blue", "tab:orange", "tab:green"]
    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    _traces(axes[0, 0], S, [f"source {j + 1}: {nm}" for j, nm in enumerate(names)], colors,
            "the sources (0.4 s of 2.5 s)")
    _traces(axes[0, 1], X, [f"microphone {i + 1}" for i in range(len(X))], ["0.3"] * len(X),
            "instantaneous mixtures x = A s: every microphone hears all three")
    _traces(axes[0, 2], aligned, [f"FastICA estimate of source {j + 1}" for j in range(len(aligned))], colors,
            "FastICA's outputs, matched to the sources (order, sign, scale)")

    ax = axes[1, 0]
    width = 0.8 / len(S)
    pos = np.arange(len(bars))
    for j, nm in enumerate(names):
        ax.bar(pos + (j - 1) * width, [v[j] for v in bars.values()], width, color=colors[j], label=nm)
    ax.axhline(30, color="k", ls="--", lw=0.8)
    ax.text(len(bars) - 0.5, 31, "30 dB", fontsize=8, ha="right", va="bottom")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(pos, list(bars), fontsize=8, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_ylabel("SI-SDR (dB; higher is cleaner)")
    ax.set_ylim(-40, 60)
    ax.set_title("SI-SDR: instantaneous mixture (left three), delays, echoes;\nper-bin ICA of the echoes "
                 "with three ways to order the bins", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3, axis="y")

    ax = axes[1, 1]
    freqs = np.arange(perms.shape[0]) * FS / NPERSEG
    owner = np.argsort(perms, axis=1).T  # (k outputs, bins): which source ICA's output i turned out to be
    ax.imshow(owner, aspect="auto", cmap=ListedColormap(colors), vmin=-0.5, vmax=len(colors) - 0.5,
              interpolation="nearest", extent=(0, freqs[-1] + FS / NPERSEG, len(S) - 0.5, -0.5))
    ax.set_yticks(range(len(S)), [f"ICA output {i + 1}" for i in range(len(S))])
    ax.set_xlabel("frequency bin (Hz)")
    same = np.mean((perms == perms[0]).all(axis=1))
    ax.set_title(f"per-bin ICA on the echo mixture: which source each output is (colours as above)\n"
                 f"the order changes from bin to bin ({same:.0%} of bins share bin 0's): the permutation problem",
                 fontsize=10)

    ax = axes[1, 2]
    sig = np.array(list(phase_db))
    vals = np.array(list(phase_db.values()))
    shown = np.minimum(vals, 45)
    ax.plot(sig, shown, "o-", color="tab:orange", label="true phase + Gaussian noise (mean of 3 draws)")
    ax.annotate(f"sigma 0: exact ({vals[0]:.0f} dB, float rounding only)", (sig[0], shown[0]), xytext=(0.15, 27),
                fontsize=8, arrowprops=dict(arrowstyle="->", lw=0.6))
    ax.axhline(random_db, color="tab:red", ls=":", label=f"uniformly random phase ({random_db:.1f} dB)")
    ax.axhline(gl_db, color="tab:purple", ls="--", label=f"Griffin-Lim, 100 iterations from random ({gl_db:.1f} dB)")
    ax.set_xlabel("phase noise sigma (radians); the magnitude is kept exactly")
    ax.set_ylabel("SI-SDR of the rebuilt voice (dB)")
    ax.set_ylim(min(random_db, vals.min()) - 5, 48)
    ax.set_title(f"phase matters: {names[1]} rebuilt from its STFT magnitude", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.suptitle("The cocktail party: ICA un-mixes instantaneous mixtures; delays, echoes and phase are the hard part")
    save_figure(fig, out)
