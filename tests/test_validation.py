"""Training-time validation: its metrics are the metrics libraries' values, in their argument order."""

from __future__ import annotations

import dfn4lab  # noqa: F401
from dfn4lab import data, inference, losses, metrics, validation
from dfn4lab.losses import LossConfig

import numpy as np
import pytest
from conftest import SpeechInPink

pytestmark = pytest.mark.skipif(
    not data.speech_files(), reason="needs real speech (alsa-utils or the demo corpus)"
)


def test_validate_reports_stoi_and_si_sdr_of_the_enhanced_and_the_noisy_audio():
    from pystoi import stoi

    model = inference.load_pretrained("dfn3").eval()
    items = validation.validation_items(SpeechInPink(3, snr=0.0), 3, 2, model.cfg.dsp)
    rec = validation.validate(model, items, LossConfig(), 1.0)

    expect: dict[str, list[float]] = {"stoi": [], "stoi_noisy": [], "si_sdr": [], "si_sdr_noisy": []}
    sr = model.cfg.dsp.sr
    for it in items:
        enh = losses.waveform(model(it["noisy"], it["feat_erb"], it["feat_spec"])[0], model.cfg.dsp)
        clean, noisy = (losses.waveform(it[k], model.cfg.dsp) for k in ("clean", "noisy"))
        for c, e, n in zip(np.array(clean), np.array(enh), np.array(noisy), strict=True):
            expect["stoi"].append(stoi(c, e, sr))
            expect["stoi_noisy"].append(stoi(c, n, sr))
            expect["si_sdr"].append(metrics.si_sdr(c, e))
            expect["si_sdr_noisy"].append(metrics.si_sdr(c, n))
    assert len(expect["stoi"]) == 3
    for k, v in expect.items():
        assert rec[k] == pytest.approx(np.mean(v), abs=2e-3 if k.startswith("si_sdr") else 1e-6), k
    assert rec["stoi"] > rec["stoi_noisy"] and rec["si_sdr"] > rec["si_sdr_noisy"] + 3  # DFN3 enhances
