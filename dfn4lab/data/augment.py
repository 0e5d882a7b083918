"""Signal augmentations of dynamic mixing, after DeepFilterNet's (libDF ``augmentations.rs``).

All take and return float32 ``(samples,)``; random ones take a ``numpy.random.Generator`` and
return what they drew, for the sample's metadata.
"""

from __future__ import annotations

import math

import numpy as np
import soxr
from scipy import signal

# Filter types and their centre-frequency ranges (Hz), as libDF's RandBiquadFilter draws them.
EQ_RANGES = {
    "lowpass": (4000, 8000),
    "highshelf": (1000, 8000),
    "highpass": (40, 400),
    "lowshelf": (40, 1000),
    "peaking": (40, 4000),
    "notch": (40, 4000),
}


def biquad(kind: str, freq: float, sr: int, q: float = 0.707, gain_db: float = 0.0) -> np.ndarray:
    """One second-order section ``(6,)`` ``[b0, b1, b2, 1, a1, a2]`` from the Audio EQ Cookbook."""
    w0 = 2 * math.pi * freq / sr
    cw, alpha = math.cos(w0), math.sin(w0) / (2 * q)
    amp = 10 ** (gain_db / 40)
    sa, ap, am = 2 * math.sqrt(amp) * alpha, amp + 1, amp - 1
    b, a = {
        "lowpass": ([(1 - cw) / 2, 1 - cw, (1 - cw) / 2], [1 + alpha, -2 * cw, 1 - alpha]),
        "highpass": ([(1 + cw) / 2, -(1 + cw), (1 + cw) / 2], [1 + alpha, -2 * cw, 1 - alpha]),
        "peaking": ([1 + alpha * amp, -2 * cw, 1 - alpha * amp], [1 + alpha / amp, -2 * cw, 1 - alpha / amp]),
        "notch": ([1, -2 * cw, 1], [1 + alpha, -2 * cw, 1 - alpha]),
        "lowshelf": (
            [amp * (ap - am * cw + sa), 2 * amp * (am - ap * cw), amp * (ap - am * cw - sa)],
            [ap + am * cw + sa, -2 * (am + ap * cw), ap + am * cw - sa],
        ),
        "highshelf": (
            [amp * (ap + am * cw + sa), -2 * amp * (am + ap * cw), amp * (ap + am * cw - sa)],
            [ap - am * cw + sa, 2 * (am - ap * cw), ap - am * cw - sa],
        ),
    }[kind]
    return np.array(b + a) / a[0]


def random_eq(
    x: np.ndarray, sr: int, rng: np.random.Generator, max_filters: int, gain_db: float, q: tuple[float, float]
) -> tuple[np.ndarray, list[dict]]:
    """1..``max_filters`` random biquads (types and ranges as libDF), then the input's RMS restored."""
    params, sos = [], []
    for _ in range(int(rng.integers(1, max_filters + 1))):
        kind = str(rng.choice(list(EQ_RANGES)))
        hi = min(EQ_RANGES[kind][1], 0.45 * sr)  # below Nyquist
        lo = min(EQ_RANGES[kind][0], hi)  # at 8 kHz a low-pass's 4-8 kHz range is all above it
        p = dict(
            kind=kind,
            freq=round(float(np.exp(rng.uniform(np.log(lo), np.log(hi)))), 1),
            q=round(float(rng.uniform(*q)), 3),
            gain_db=round(float(rng.uniform(-gain_db, gain_db)), 2),
        )
        params.append(p)
        sos.append(biquad(p["kind"], p["freq"], sr, p["q"], p["gain_db"]))
    y = signal.sosfilt(np.stack(sos), x)
    return match_rms(y, x), params


def match_rms(y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``y`` scaled to the RMS of ``ref`` (unchanged if either is silent)."""
    ry, rr = rms(y), rms(ref)
    return (y * (rr / ry) if ry > 0 and rr > 0 else y).astype(np.float32)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def lowpass(x: np.ndarray, sr: int, cutoff: float) -> np.ndarray:
    """Band-limit to ``cutoff`` Hz by resampling down to ``2*cutoff`` and back (soxr's steep filter)."""
    low = int(2 * cutoff)
    if low >= sr:
        return x
    y = soxr.resample(soxr.resample(x, sr, low, quality="HQ"), low, sr, quality="HQ")
    out = np.zeros_like(x)
    out[: min(x.size, y.size)] = y[: x.size]
    return out


def convolve_aligned(x: np.ndarray, rir: np.ndarray, delay: int) -> np.ndarray:
    """``x * rir`` shifted back by ``delay`` samples (the direct path), cut to ``len(x)``."""
    y = signal.oaconvolve(x, rir)
    return y[delay : delay + x.size].astype(np.float32)


def early_rir(rir: np.ndarray, sr: int, early_ms: float, rt60: float) -> np.ndarray:
    """The target RIR: unchanged up to the direct path + ``early_ms``, then multiplied by a decay that
    reaches -60 dB after ``rt60`` seconds (libDF's ``supress_late``)."""
    start = int(np.argmax(np.abs(rir))) + int(early_ms * sr / 1000)
    decay = np.ones(rir.size)
    t = np.arange(max(0, rir.size - start)) / sr
    decay[start:] = 10 ** (-3 * t / rt60)
    return (rir * decay).astype(np.float32)


def reverb(
    speech: np.ndarray, rir: np.ndarray, sr: int, early_ms: float, target_rt60: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(reverberant, target)``: speech through the full RIR (for the mixture) and through its early
    part (the training target, at the dry speech's RMS), both aligned to the direct path."""
    rir = rir / np.sqrt(np.sum(np.square(rir, dtype=np.float64)))
    delay = int(np.argmax(np.abs(rir)))
    wet = convolve_aligned(speech, rir, delay)
    target = convolve_aligned(speech, early_rir(rir, sr, early_ms, target_rt60), delay)
    return wet, match_rms(target, speech)


def clip(x: np.ndarray, fraction: float) -> tuple[np.ndarray, float]:
    """Hard-clip at ``fraction`` of the peak; returns the clipped signal and the clip level."""
    c = fraction * float(np.max(np.abs(x)))
    return np.clip(x, -c, c).astype(np.float32), c
