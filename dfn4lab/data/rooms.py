"""Room impulse responses: shoebox rooms simulated with pyroomacoustics (image sources + ray tracing).

A room is drawn from a generator (size, RT60, one source, a few microphones); its absorption and
image order come from Sabine's formula for the drawn RT60. pyroomacoustics is imported only here,
when rooms are simulated.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Room:
    dims: tuple[float, float, float]  # metres
    rt60: float  # target (Sabine) reverberation time, seconds
    source: tuple[float, float, float]
    mics: tuple[tuple[float, float, float], ...]

    def to_dict(self) -> dict:
        return asdict(self)


def random_room(rng: np.random.Generator, rt60: tuple[float, float] = (0.2, 1.0), mics: int = 2) -> Room:
    """A shoebox 3-9 x 3-7 x 2.4-3.6 m; source and microphones >= 0.5 m from walls, 0.5-3 m apart."""
    dims = (rng.uniform(3, 9), rng.uniform(3, 7), rng.uniform(2.4, 3.6))
    t60 = float(rng.uniform(*rt60))

    def point() -> np.ndarray:
        return np.array([rng.uniform(0.5, d - 0.5) for d in dims[:2]] + [rng.uniform(1.0, 1.8)])

    src = point()
    pts: list[tuple[float, float, float]] = []
    while len(pts) < mics:
        p = point()
        if 0.5 <= np.linalg.norm(p - src) <= 3.0:
            pts.append(tuple(round(float(v), 3) for v in p))
    return Room(
        tuple(round(d, 3) for d in dims), round(t60, 3), tuple(round(float(v), 3) for v in src), tuple(pts)
    )


def simulate(room: Room, sr: int = 48000) -> tuple[list[np.ndarray], list[float]]:
    """RIRs ``[(samples,)]`` float32, one per microphone, trimmed at -80 dB; and their measured RT60s.

    pyroomacoustics' hybrid simulator: image sources up to order 3 for the early part, ray tracing
    for the tail (several times faster than a full image-source model at RT60 1 s, same RT60). Its
    random generator is seeded from the room, so a room always gives the same RIRs.
    """
    import pyroomacoustics as pra

    pra.random.seed(zlib.crc32(repr(room).encode()))
    e_abs, _ = pra.inverse_sabine(room.rt60, list(room.dims))
    r = pra.ShoeBox(list(room.dims), fs=sr, materials=pra.Material(e_abs), max_order=3, ray_tracing=True)
    r.set_ray_tracing()
    r.add_source(list(room.source))
    r.add_microphone_array(np.array(room.mics).T)
    r.compute_rir()
    rirs = [trim(np.asarray(r.rir[m][0], dtype=np.float32)) for m in range(len(room.mics))]
    rt = [float(pra.experimental.measure_rt60(h, fs=sr)) for h in rirs]
    return rirs, rt


def simulate_calibrated(
    room: Room, sr: int = 48000, tol: float = 0.15
) -> tuple[Room, list[np.ndarray], list[float]]:
    """``simulate``, and once more with a corrected Sabine RT60 when the measured RT60 misses the
    target by more than ``tol`` (a simulated shoebox often rings longer than Sabine's formula says).

    Returns the room actually simulated (its ``rt60`` is the Sabine parameter used), RIRs, RT60s.
    """
    rirs, rt = simulate(room, sr)
    measured = float(np.mean(rt))
    if abs(measured / room.rt60 - 1) > tol:
        room = replace(room, rt60=round(room.rt60 * room.rt60 / measured, 3))
        rirs, rt = simulate(room, sr)
    return room, rirs, rt


def trim(rir: np.ndarray, floor_db: float = -80.0) -> np.ndarray:
    """Drop the tail that stays below ``floor_db`` relative to the peak (as DeepFilterNet does)."""
    a = np.abs(rir)
    above = np.nonzero(a >= a.max() * 10 ** (floor_db / 20))[0]
    return rir[: above[-1] + 1]
