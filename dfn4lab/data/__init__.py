"""Data: speech, noise and rooms; their dynamic mixing; file lists; datastores; the training loader.

Modules (import what you use; the names below also resolve lazily from ``dfn4lab.data``):

- ``demo``: the demo corpus from installed packages (``make data``, ``python -m dfn4lab.data.demo``)
- ``lists``: scan folders into per-split file lists and a data config (``python -m dfn4lab.data.lists``)
- ``mixing``: ``Mixer``, DeepFilterNet-style dynamic mixing, deterministic from (seed, epoch, index)
- ``loader``: ``Loader`` of MLX batches with worker processes, prefetch, and a resumable ``DataPosition``
- ``datastore``: fixed mixtures and features in sharded safetensors (``python -m dfn4lab.data.datastore``)
- ``checks``: bad-input detection and the skip ``Report``; ``augment``, ``synth``, ``rooms``, ``sources``

This module also keeps small helpers used by tests and benchmarks: mixing at a target SNR and a
reproducible real noisy clip from system sounds (alsa-utils' spoken prompts).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from dfn4lab import audio, paths

import numpy as np

_LAZY = {
    "DataConfig": "config",
    "MixConfig": "config",
    "CheckConfig": "config",
    "Mixer": "mixing",
    "Mixture": "mixing",
    "Loader": "loader",
    "Batch": "loader",
    "DataPosition": "loader",
    "Datastore": "datastore",
    "Report": "checks",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"dfn4lab.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dfn4lab.data' has no attribute {name!r}")


ALSA_SOUNDS = Path("/usr/share/sounds/alsa")


def mix(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``speech + g*noise`` with ``g`` chosen so the power ratio is ``snr_db``; shapes (samples,)."""
    ps = float(np.mean(speech.astype(np.float64) ** 2))
    pn = float(np.mean(noise.astype(np.float64) ** 2))
    if ps == 0 or pn == 0:
        raise ValueError("cannot set an SNR with silent speech or silent noise")
    g = np.sqrt(ps / (pn * 10 ** (snr_db / 10)))
    return (speech + g * noise).astype(np.float32)


def speech_files() -> list[Path]:
    """Real speech for clips and tests: alsa-utils' channel prompts (Debian; one male voice), else the
    demo corpus's test speech (``make data``; on a Mac its ``say`` voices); [] when neither is here."""
    files = sorted(p for p in ALSA_SOUNDS.glob("*.wav") if p.stem != "Noise")
    if not files and (paths.DEMO / "speech" / "test").is_dir():
        files = sorted(p for p in (paths.DEMO / "speech" / "test").rglob("*") if p.suffix in (".flac", ".wav"))[:24]
    return files


def real_speech(sr: int = 48000, seconds: float = 10.0) -> np.ndarray:
    """Real speech (:func:`speech_files`) concatenated and repeated to ``seconds`` at ``sr``."""
    files = speech_files()
    if not files:
        raise FileNotFoundError(
            f"no real speech here: install alsa-utils (Debian: {ALSA_SOUNDS}) or build the demo corpus (make data)"
        )
    parts = []
    for p in files:
        x, fs = audio.load(p, sr=sr)
        parts.append(x.mean(axis=0))
    speech = np.concatenate(parts)
    n = int(seconds * sr)
    return np.resize(speech, n).astype(np.float32)


def pink_noise(n: int, seed: int = 0) -> np.ndarray:
    """Pink (1/f power) noise of ``n`` samples, unit RMS."""
    rng = np.random.default_rng(seed)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spec.size, dtype=np.float64)
    spec[1:] /= np.sqrt(f[1:])
    spec[0] = 0
    x = np.fft.irfft(spec, n)
    return (x / np.sqrt(np.mean(x**2))).astype(np.float32)


def noisy_clip(sr: int = 48000, seconds: float = 10.0, snr_db: float = 5.0, seed: int = 0):
    """(noisy, clean) real speech in pink noise at ``snr_db``; both (samples,) float32."""
    clean = real_speech(sr, seconds)
    return mix(clean, pink_noise(clean.size, seed), snr_db), clean
