"""Data configuration: dynamic mixing, input checks, and the data config that training reads.

``python -m dfn4lab.data.lists ... --generate-config`` writes a ``DataConfig`` as JSON; training
reads it back with ``DataConfig.from_json(path)``. Unknown keys and values of the wrong type are errors
(``config.from_dict``): a typo in a config never passes silently.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfn4lab.config import JsonConfig, from_dict, is_json_text, read_json, replace_fields

SPLITS = ("train", "valid", "test")
KINDS = ("speech", "noise", "rir")
NOISE_ONLY_SNR = -100.0  # the SNR reported for noise-only samples (their clean target is silence)


@dataclass(frozen=True)
class MixConfig:
    """How one training sample is drawn and degraded (DeepFilterNet's recipe, with its defaults)."""

    sr: int = 48000
    max_len_s: float = 3.0  # every sample is exactly this long; shorter speech sits at a random offset
    snrs: tuple[float, ...] = (-5.0, 0.0, 5.0, 10.0, 20.0, 40.0)  # dB, drawn uniformly
    p_noise_only: float = 0.05  # clean target is silence: the model must learn to output nothing
    gains_db: tuple[float, ...] = (-6.0, 0.0, 6.0)  # overall level of the whole sample
    noises: tuple[int, int] = (1, 3)  # number of noise segments summed (inclusive range)
    noise_gains_db: tuple[float, ...] = (-6.0, 0.0, 6.0)  # relative levels of the summed noises
    p_reverb: float = 0.1  # DFN3's value; drawn separately for speech and for noise (same room)
    early_ms: float = 5.0  # target RIR keeps the direct path and this much after it unchanged ...
    target_rt60: float = 0.5  # ... then an extra exponential decay reaching -60 dB after this (s)
    p_eq: float = 0.25  # random biquads, drawn separately for speech (target too) and each noise
    eq_max_filters: int = 3
    eq_gain_db: float = 15.0  # shelf/peak gains drawn from +-this
    eq_q: tuple[float, float] = (0.5, 1.5)
    p_bandlimit: float = 0.1  # low-pass speech and noise alike (a band-limited recording)
    cutoffs_hz: tuple[int, ...] = (4000, 6000, 8000, 10000, 12000, 16000, 20000)
    p_clip: float = 0.05  # clip the noisy mixture only; the target stays clean
    clip_range: tuple[float, float] = (0.05, 0.5)  # clip level as a fraction of the mixture's peak
    p_interferer: float = 0.05  # add another speaker's speech to the noise

    @property
    def samples(self) -> int:
        return round(self.max_len_s * self.sr)


@dataclass(frozen=True)
class CheckConfig:
    """What makes an input file unusable (skipped, counted and reported, never fatal alone)."""

    min_sr: int = 8000  # lower rates are reported as wrong_rate
    silence_db: float = -60.0  # peak below this (dBFS) is silent
    min_speech_s: float = 0.5
    min_noise_s: float = 0.1
    min_rir_s: float = 0.01

    def min_seconds(self, kind: str) -> float:
        return {"speech": self.min_speech_s, "noise": self.min_noise_s, "rir": self.min_rir_s}[kind]


@dataclass(frozen=True)
class DataConfig(JsonConfig):
    """Everything a training run needs to load data: file lists per split and kind, mixing, loader."""

    lists: dict[str, dict[str, str]] = field(default_factory=dict)  # split -> kind -> list file
    mix: MixConfig = field(default_factory=MixConfig)
    checks: CheckConfig = field(default_factory=CheckConfig)
    seed: int = 0
    batch_size: int = 8
    workers: int = 2  # background processes; 0 mixes in the calling thread
    prefetch: int = 4  # batches in flight (at least `workers` to keep every worker busy)
    samples_per_epoch: int | None = None  # None: one sample per speech file of the split

    def list_path(self, split: str, kind: str) -> Path | None:
        """The list file for ``split``/``kind``, or None."""
        p = self.lists.get(split, {}).get(kind)
        return None if p is None else Path(p)

    @classmethod
    def from_json(cls, s_or_path: str | Path) -> DataConfig:
        """From a JSON string or file; a file's relative list paths resolve against its folder."""
        cfg = from_dict(cls, read_json(s_or_path))
        if is_json_text(s_or_path):
            return cfg
        p = Path(s_or_path)
        base = p.resolve().parent
        lists = {s: {k: str(base / v) for k, v in kinds.items()} for s, kinds in cfg.lists.items()}
        return dataclasses.replace(cfg, lists=lists)

    def replace(self, **overrides: Any) -> DataConfig:
        """Copy with overrides; ``mix={...}`` and ``checks={...}`` update single fields."""
        for name, sub in (("mix", self.mix), ("checks", self.checks)):
            if isinstance(overrides.get(name), dict):
                overrides[name] = replace_fields(sub, **overrides[name])
        return replace_fields(self, **overrides)
