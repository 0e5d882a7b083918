"""Validation during training: a fixed set of model inputs and the metrics of a model on it."""

from __future__ import annotations

import importlib.util
from typing import Any

from dfn4lab import losses
from dfn4lab.config import DspConfig
from dfn4lab.losses import LossConfig
from dfn4lab.model import DfNet

import mlx.core as mx
import numpy as np


def validation_items(source: Any, count: int, batch_size: int, cfg: DspConfig) -> list[dict[str, mx.array]]:
    """The fixed validation set: items ``0..count-1`` of epoch 0 of ``source`` (a ``dfn4lab.data``
    source), as batches of model inputs ``noisy``, ``clean``, ``feat_erb``, ``feat_spec``."""
    from dfn4lab.data.loader import make_batch

    n = min(count, len(source))
    out = []
    for s in range(0, n, batch_size):
        b = make_batch(source, 0, list(range(s, min(n, s + batch_size))), cfg)
        out.append({k: mx.array(b[k]) for k in ("noisy", "clean", "feat_erb", "feat_spec")})
    return out


def validate(model: DfNet, items: list[dict[str, mx.array]], lc: LossConfig, ramp: float) -> dict[str, float]:
    """Mean loss, SI-SDR, STOI and VAD agreement (speech-presence proxy; Silero where installed) of the
    model on fixed batches of model inputs, with SI-SDR and STOI of the noisy input for reference.
    Noise-only items count for the loss only. ``ramp``: the dynamic loss's ramp at this step."""
    from dfn4lab import metrics
    from dfn4lab.audio import resample

    cfg = model.cfg
    sums: dict[str, list[float]] = {}

    def add(k: str, v: float) -> None:
        sums.setdefault(k, []).append(v)

    for it in items:
        out = model(it["noisy"], it["feat_erb"], it["feat_spec"])
        lsnr_range = (cfg.lsnr_min, cfg.lsnr_max)
        loss, _ = losses.compute(
            lc, cfg.dsp, lsnr_range, out, it["noisy"], it["clean"], mx.array([ramp, 0.0])
        )
        enh, clean, noisy = (losses.waveform(x, cfg.dsp) for x in (out[0], it["clean"], it["noisy"]))
        p_enh, p_clean = (losses.presence(x, cfg.dsp, lc)["speech"] > 0.5 for x in (out[0], it["clean"]))
        si, si_noisy = losses.si_sdr(enh, clean), losses.si_sdr(noisy, clean)
        agree = mx.mean(p_enh == p_clean, axis=1)
        mx.eval(loss, enh, clean, noisy, si, si_noisy, agree)
        for _ in range(out[0].shape[0]):  # per item: a short last batch weighs what its items weigh
            add("loss", float(loss))
        for b in range(enh.shape[0]):
            c, e, n = np.array(clean[b]), np.array(enh[b]), np.array(noisy[b])
            if np.sqrt(np.mean(c**2)) < metrics.SILENCE_RMS:
                continue
            add("si_sdr", float(si[b]))
            add("si_sdr_noisy", float(si_noisy[b]))
            add("vad_proxy_agree", float(agree[b]))
            for name, x in (("stoi", e), ("stoi_noisy", n)):
                try:
                    add(name, metrics.stoi(c, x, cfg.dsp.sr))
                except metrics.Undefined:  # too little speech for STOI's own VAD
                    pass
            if _has_silero():
                c16, e16 = resample(c, cfg.dsp.sr, 16000), resample(e, cfg.dsp.sr, 16000)
                add("vad_silero_agree", metrics.vad_agreement(c16, e16))
    return {k: float(np.mean(v)) for k, v in sums.items()}


def _has_silero() -> bool:
    # found, not imported: importing silero_vad sets torch to one thread (metrics._vad_model undoes that)
    return importlib.util.find_spec("silero_vad") is not None
