"""Bad input: find unusable audio files, skip them with a counted warning, and report them.

A file is unusable when it is unreadable, empty, contains NaN/inf, is silent, has the wrong sample
rate (below the minimum, or not the rate its list recorded) or is too short for its kind. Nothing
here raises for a single bad file; ``NoUsableFiles`` is raised only when every file of a list fails.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from dfn4lab.data.config import CheckConfig
from dfn4lab.paths import atomic_write

import numpy as np
import soundfile as sf

log = logging.getLogger("dfn4lab.data")

REASONS = ("unreadable", "empty", "nan", "silent", "wrong_rate", "too_short")


class NoUsableFiles(RuntimeError):
    """Every file of a list (or of a kind) failed its checks."""


@dataclass(frozen=True)
class BadFile:
    path: str
    kind: str
    reason: str  # one of REASONS
    detail: str


@dataclass(frozen=True)
class FileInfo:
    """Header facts of a readable file."""

    sr: int
    frames: int
    channels: int

    @property
    def duration(self) -> float:
        return self.frames / self.sr


class Report:
    """Skipped files, counted per reason; each skip logs one warning line with the running count."""

    def __init__(self) -> None:
        self.bad: list[BadFile] = []
        self._seen: set[tuple[str, str]] = set()

    def add(self, bad: BadFile) -> None:
        key = (bad.path, bad.reason)
        if key in self._seen:
            return
        self._seen.add(key)
        self.bad.append(bad)
        n = len(self.bad)
        log.warning(
            "skipping %s file %s: %s (%s) [%d skipped]", bad.kind, bad.path, bad.reason, bad.detail, n
        )

    @classmethod
    def of(cls, bad: list[BadFile]) -> Report:
        """A report of files already reported (nothing logged again)."""
        r = cls()
        r.bad, r._seen = list(bad), {(b.path, b.reason) for b in bad}
        return r

    def merge(self, other: Report | list[BadFile]) -> None:
        for b in other.bad if isinstance(other, Report) else other:
            self.add(b)

    def counts(self) -> dict[str, int]:
        return dict(Counter(b.reason for b in self.bad))

    def summary(self) -> str:
        if not self.bad:
            return "no files skipped"
        parts = ", ".join(f"{n} {r}" for r, n in sorted(self.counts().items()))
        return f"{len(self.bad)} files skipped ({parts})"

    def to_dict(self) -> dict:
        return {"skipped": len(self.bad), "counts": self.counts(), "files": [asdict(b) for b in self.bad]}

    def save(self, path: str | Path) -> None:
        atomic_write(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


def info(path: str | Path, kind: str, checks: CheckConfig) -> FileInfo | BadFile:
    """Header check (cheap: no samples read): readable, non-empty, rate and length acceptable."""
    p = str(path)
    try:
        i = sf.info(p)
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/TypeError on garbage
        reason = "empty" if Path(p).is_file() and Path(p).stat().st_size == 0 else "unreadable"
        return BadFile(p, kind, reason, first_line(e))
    fi = FileInfo(int(i.samplerate), int(i.frames), int(i.channels))
    if fi.frames == 0:
        return BadFile(p, kind, "empty", "no samples")
    if fi.sr < checks.min_sr:
        return BadFile(p, kind, "wrong_rate", f"{fi.sr} Hz < {checks.min_sr} Hz")
    if fi.duration < checks.min_seconds(kind):
        return BadFile(p, kind, "too_short", f"{fi.duration:.3f} s < {checks.min_seconds(kind)} s")
    return fi


def content(x: np.ndarray, path: str | Path, kind: str, checks: CheckConfig) -> BadFile | None:
    """Sample check of ``(samples,)`` or ``(samples, channels)`` read from ``path``: finite, and no
    channel silent (mixing reads one channel at random, as libDF: a dead one makes a silent target)."""
    if not np.isfinite(x).all():
        return BadFile(str(path), kind, "nan", "NaN or inf samples")
    x = x[:, None] if x.ndim == 1 else x
    return _silence(np.max(np.abs(x), axis=0, initial=0.0), path, kind, checks)


def _silence(peaks: np.ndarray, path: str | Path, kind: str, checks: CheckConfig) -> BadFile | None:
    """A ``silent`` BadFile when a channel's peak (one per channel) is at or below the silence level."""
    quiet = np.flatnonzero(peaks <= 10 ** (checks.silence_db / 20))
    if not quiet.size:
        return None
    peak = float(peaks[quiet[0]])
    level = f"peak {20 * np.log10(peak) if peak > 0 else -np.inf:.1f} dBFS <= {checks.silence_db} dBFS"
    where = f"channel {quiet[0] + 1} of {peaks.size}: " if quiet.size < peaks.size else ""
    return BadFile(str(path), kind, "silent", where + level)


def check_file(path: str | Path, kind: str, checks: CheckConfig, full: bool = True) -> FileInfo | BadFile:
    """``info`` and, with ``full``, a read of every sample (in blocks: an hour-long file costs no
    more memory than a minute) checked as ``content`` checks."""
    fi = info(path, kind, checks)
    if isinstance(fi, BadFile) or not full:
        return fi
    peaks = np.zeros(fi.channels, np.float32)
    try:
        for block in sf.blocks(str(path), blocksize=1 << 18, dtype="float32", always_2d=True):
            if not np.isfinite(block).all():
                return BadFile(str(path), kind, "nan", "NaN or inf samples")
            peaks = np.maximum(peaks, np.abs(block).max(axis=0, initial=0.0))
    except Exception as e:
        return BadFile(str(path), kind, "unreadable", first_line(e))
    return _silence(peaks, path, kind, checks) or fi


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
