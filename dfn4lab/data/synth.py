"""Procedural audio: coloured noise, mains hum, keyboard clicks, babble, and a speech-like fallback.

All functions take a ``numpy.random.Generator`` and return float32 ``(samples,)`` at unit RMS
(``speechlike`` at -25 dBFS RMS), so the same generator state gives the same signal.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import signal


def unit_rms(x: np.ndarray) -> np.ndarray:
    rms = np.sqrt(np.mean(np.square(x, dtype=np.float64)))
    return (x / rms).astype(np.float32) if rms > 0 else x.astype(np.float32)


def colored_noise(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with power ~ 1/f**exponent: 0 white, 1 pink, 2 brown."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spec.size, dtype=np.float64)
    spec[1:] /= f[1:] ** (exponent / 2)
    spec[0] = 0
    return unit_rms(np.fft.irfft(spec, n))


def hum(n: int, sr: int, rng: np.random.Generator, mains: float | None = None) -> np.ndarray:
    """Mains hum: 50 or 60 Hz and 2-12 harmonics with decaying random amplitudes, slow amplitude drift."""
    f0 = mains or float(rng.choice([50.0, 60.0]))
    t = np.arange(n) / sr
    x = np.zeros(n)
    for k in range(1, int(rng.integers(3, 13)) + 1):
        if k * f0 >= sr / 2:
            break
        amp = rng.uniform(0.2, 1.0) / k ** rng.uniform(0.3, 1.2)
        x += amp * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
    drift = 1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t + rng.uniform(0, 2 * np.pi))
    return unit_rms(x * drift)


def clicks(n: int, sr: int, rng: np.random.Generator, rate_hz: float | None = None) -> np.ndarray:
    """Keyboard-like typing: irregular key presses, each a band-passed burst and a quieter release."""
    rate = rate_hz or rng.uniform(4.0, 10.0)
    x = np.zeros(n)
    top = 0.45 * sr  # below Nyquist: at 8 kHz the 4-12 kHz upper edge is 3.6 kHz
    lo, hi = rng.uniform(800, min(2500, 0.5 * top)), rng.uniform(min(4000, top), min(12000, top))
    sos = signal.butter(2, [lo, hi], btype="bandpass", fs=sr, output="sos")
    t = rng.uniform(0, 0.2)
    while t < n / sr:
        for delay, level in ((0.0, 1.0), (rng.uniform(0.05, 0.12), rng.uniform(0.2, 0.5))):
            start = int((t + delay) * sr)
            m = int(rng.uniform(0.003, 0.012) * sr)
            if start + m > n:
                continue
            burst = rng.standard_normal(m) * np.exp(-np.arange(m) / (m / 4))
            x[start : start + m] += level * rng.uniform(0.3, 1.0) * burst
        t += rng.gamma(2.0, 1 / (2 * rate))  # irregular intervals, mean 1/rate
    return unit_rms(signal.sosfilt(sos, x) + 1e-4 * rng.standard_normal(n))


def babble(
    utterances: Sequence[np.ndarray], n: int, rng: np.random.Generator, talkers: int = 6
) -> np.ndarray:
    """Several talkers at once: random crops of ``utterances`` (looped when short), each at unit RMS."""
    x = np.zeros(n)
    for i in rng.choice(len(utterances), size=min(talkers, len(utterances)), replace=False):
        u = utterances[int(i)]
        u = np.tile(u, -(-n // u.size) + 1)
        start = int(rng.integers(0, u.size - n + 1))
        x += unit_rms(u[start : start + n]) * rng.uniform(0.5, 1.0)
    return unit_rms(x)


# (F1, F2, F3) in Hz of a few vowels of an adult male voice
_VOWELS = np.array(
    [[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010], [570, 840, 2410], [300, 870, 2240]]
)


def speechlike(
    seconds: float, sr: int, rng: np.random.Generator, f0: float, formant_scale: float
) -> np.ndarray:
    """A voice-like signal (no words): pulse-train syllables through formant resonators, with pauses
    and fricative bursts. The fallback speech when no TTS or recording is installed; ``f0`` and
    ``formant_scale`` make different "speakers"."""
    parts = []
    total = int(seconds * sr)
    while sum(p.size for p in parts) < total:
        m = int(rng.uniform(0.12, 0.3) * sr)
        k = np.arange(m)
        pitch = f0 * (1 + 0.15 * np.sin(np.pi * k / m) + 0.01 * rng.standard_normal()) * rng.uniform(0.9, 1.1)
        phase = np.cumsum(pitch / sr)
        src = np.diff(np.floor(phase), prepend=0.0)  # one impulse per pitch period
        src = signal.lfilter([1.0], [1.0, -0.95], src)  # glottal roll-off
        for f, bw in zip(_VOWELS[rng.integers(len(_VOWELS))] * formant_scale, (80, 100, 140), strict=True):
            r = np.exp(-np.pi * bw / sr)
            src = signal.lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * f / sr), r * r], src)
        parts.append(src * np.hanning(m))
        if rng.uniform() < 0.3:  # a fricative
            fr = signal.lfilter([1, -0.9], [1], rng.standard_normal(int(rng.uniform(0.04, 0.1) * sr)))
            parts.append(0.3 * np.sqrt(np.mean(parts[-1] ** 2)) * unit_rms(fr * np.hanning(fr.size)))
        if rng.uniform() < 0.25:  # a pause between words
            parts.append(np.zeros(int(rng.uniform(0.1, 0.4) * sr)))
    x = np.concatenate(parts)[:total]
    return (unit_rms(x) * 10 ** (-25 / 20)).astype(np.float32)
