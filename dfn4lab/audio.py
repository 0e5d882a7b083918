"""Audio files in and out (soundfile: wav, flac, ogg) and resampling (soxr).

Audio arrays are always float32 ``(channels, samples)``, also for mono (one row). Bad input is
reported as ``AudioError`` (a ``ValueError``) with a one-line message naming the file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from dfn4lab.paths import atomic_write

import numpy as np
import soundfile as sf
import soxr


class AudioError(ValueError):
    """An audio file or array that cannot be used: missing, unreadable, empty, or not finite."""


# audio files the project reads (soundfile/libsndfile; .opus is Ogg Opus, .mp3 needs libsndfile 1.1)
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".opus", ".aiff", ".aif", ".mp3")


def _as_channels(x: np.ndarray, what: str) -> np.ndarray:
    """``(samples,)`` or ``(channels, samples)`` -> float32 ``(channels, samples)``, checked."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise AudioError(f"{what}: expected (channels, samples), got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise AudioError(f"{what}: no samples (shape {x.shape})")
    if not np.isfinite(x).all():
        raise AudioError(f"{what}: contains NaN or inf samples")
    return x


def load(path: str | os.PathLike, sr: int | None = None, mono: bool = False) -> tuple[np.ndarray, int]:
    """Read ``path`` as float32 ``(channels, samples)``; returns ``(audio, sample_rate)``.

    ``sr`` resamples to that rate (None keeps the file's); ``mono`` averages the channels into one.
    """
    p = Path(path)
    if not p.exists():
        raise AudioError(f"{p}: no such file")
    if not p.is_file():
        raise AudioError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise AudioError(f"{p}: empty file")
    try:
        data, file_sr = sf.read(p, dtype="float32", always_2d=True)
    except RuntimeError as e:  # soundfile's LibsndfileError
        raise AudioError(f"{p}: unreadable audio ({_first_line(e)})") from e
    x = _as_channels(data.T, str(p))
    if mono:
        x = x.mean(axis=0, keepdims=True)
    if sr is not None and sr != file_sr:
        x = resample(x, file_sr, sr)
        file_sr = sr
    return np.ascontiguousarray(x), int(file_sr)


def file_format(path: str | os.PathLike) -> tuple[str, str]:
    """The container and sample format of an audio file: (``WAV``, ``PCM_16``), (``AIFF``, ``FLOAT``),
    (``OGG``, ``OPUS``)... whatever its extension says."""
    try:
        info = sf.info(str(path))
        return info.format, info.subtype
    except RuntimeError as e:
        raise AudioError(f"{path}: unreadable audio ({_first_line(e)})") from e


def resample(x: np.ndarray, sr_in: int, sr_out: int, quality: str = "HQ") -> np.ndarray:
    """Resample ``(channels, samples)`` (or ``(samples,)``) from ``sr_in`` to ``sr_out`` Hz with soxr.

    Output is float32 ``(channels, round(samples * sr_out / sr_in))``; a 1-D input stays 1-D.
    """
    if sr_in <= 0 or sr_out <= 0:
        raise AudioError(f"resample: sample rates must be positive, got {sr_in} -> {sr_out}")
    one_d = np.ndim(x) == 1
    x = _as_channels(x, "resample input")
    if sr_in != sr_out:
        x = soxr.resample(x.T, sr_in, sr_out, quality=quality).T
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x[0] if one_d else x


def resample_to(x: np.ndarray, sr_in: int, sr_out: int, n: int) -> np.ndarray:
    """:func:`resample`, then cut or zero-padded to exactly ``n`` samples: the way back to a signal's
    own rate and length (a round trip through another rate can gain or lose one sample)."""
    y = resample(x, sr_in, sr_out)[..., :n]
    return np.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, n - y.shape[-1])])


def save(
    path: str | os.PathLike, x: np.ndarray, sr: int, subtype: str | None = None, format: str | None = None
) -> None:
    """Write ``(channels, samples)`` (or ``(samples,)``) to ``path``; the container ``format`` (``WAV``,
    ``FLAC``, ``OGG``...) defaults to the extension's.

    Atomic: written to a temporary file in the same directory, then renamed over ``path``, so a
    failed write never leaves a partial file. ``subtype`` defaults to soundfile's (PCM_16 for
    wav/flac, Vorbis for ogg); integer subtypes clip to [-1, 1].
    """
    p = Path(path)
    x = _as_channels(x, str(p))
    if p.is_dir():
        raise AudioError(f"{p} is a folder: name an output file")
    fmt = format or _container(p)
    if fmt not in sf.available_formats():
        raise AudioError(f"{p}: unknown audio format {p.suffix!r}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, lambda tmp: sf.write(tmp, x.T, sr, format=fmt, subtype=subtype))
    except (RuntimeError, ValueError, TypeError) as e:
        if isinstance(e, AudioError):
            raise
        raise AudioError(f"{p}: cannot write audio ({_first_line(e)})") from e


def save_like(src: str | os.PathLike, dest: str | os.PathLike, x: np.ndarray, sr: int) -> None:
    """:func:`save` ``x`` to ``dest`` in the sample format of the file ``src`` (and its container, unless
    ``dest``'s extension names another): an enhanced file keeps its input's format (.aif, .opus: their
    extensions name no soundfile format). Samples beyond full scale in an integer format are clipped,
    with a warning."""
    container, subtype = file_format(src)
    suffix = _container(Path(dest))
    if suffix in sf.available_formats() and suffix != container:
        container = suffix
        if not sf.check_format(container, subtype):  # FLOAT into FLAC: the container's default
            subtype = sf.default_subtype(container)
    clipped = int(np.sum(np.abs(x) > 1.0)) if subtype.startswith("PCM") else 0
    if clipped:
        warnings.warn(f"{dest}: {clipped} samples beyond full scale clipped ({subtype})", stacklevel=3)
    save(dest, x, sr, subtype=subtype, format=container)


def as_float(x: np.ndarray) -> np.ndarray:
    """float32 samples; integer PCM (``sf.read(dtype="int16")``) scaled to [-1, 1) as soundfile does."""
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.integer):
        return (x / -float(np.iinfo(x.dtype).min)).astype(np.float32)
    return x.astype(np.float32, copy=False)


def _container(path: Path) -> str:
    """soundfile's container format for ``path``'s extension (``.aif`` is AIFF, ``.opus`` Ogg)."""
    ext = path.suffix.lstrip(".").upper()
    return {"AIF": "AIFF", "OPUS": "OGG"}.get(ext, ext)


def is_audio_name(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an audio file by its extension (``.wav``, ``.flac``, ``.aif``...), not a
    folder (a trailing ``/`` names a folder)."""
    return not str(path).endswith(("/", os.sep)) and _container(Path(path)) in sf.available_formats()


def check_output(dest: str | os.PathLike) -> Path:
    """Refuse, before any work, an output ``save`` would refuse after it: a folder, an unknown format, a
    folder that cannot be made or written. Returns ``dest`` as a path."""
    p = Path(dest)
    if str(dest).endswith(("/", os.sep)) or p.is_dir():
        raise AudioError(f"{p} is a folder: name an output file")
    if _container(p) not in sf.available_formats():
        raise AudioError(f"{p}: unknown audio format {p.suffix!r}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AudioError(f"{p.parent}: cannot make the folder ({e.strerror})") from None
    if not os.access(p.parent, os.W_OK):
        raise AudioError(f"{p.parent}: not writable")
    return p


def check_not_input(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Raise ``AudioError`` when writing ``dest`` would replace the input file ``src``."""
    if Path(dest).exists() and Path(dest).resolve() == Path(src).resolve():
        raise AudioError(f"{src}: the output would replace the input; choose another output")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
