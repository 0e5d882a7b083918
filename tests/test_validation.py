"""Training-time validation: its metrics are the metrics libraries' values, in their argument order."""

from __future__ import annotations

from types import SimpleNamespace

import dfn4lab  # noqa: F401
from dfn4lab import data, inference, losses, metrics, validation
from dfn4lab.data.checks import Report
from dfn4lab.losses import LossConfig

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    not data.speech_files(), reason="needs real speech (alsa-utils or the demo corpus)"
)


class _SpeechInPink:
    """Real speech in pink noise at 0 dB, 1 s crops."""

    def __init__(self, n: int):
        self.speech, self.n, self.report = data.real_speech(48000, 6.0), n, Report()

    def __len__(self) -> int:
        return self.n

    def sample(self, epoch: int, index: int) -> SimpleNamespace:
        clean = self.speech[index * 48000 : (index + 1) * 48000]
        noisy = data.mix(clean, data.pink_noise(clean.size, seed=index), 0.0)
        return SimpleNamespace(noisy=noisy, clean=clean, snr=0.0)


def test_validate_reports_stoi_and_si_sdr_of_the_enhanced_and_the_noisy_audio():
    from pystoi import stoi

    model = inference.load_pretrained("dfn3").eval()
    items = validation.validation_items(_SpeechInPink(3), 3, 2, model.cfg.dsp)
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
