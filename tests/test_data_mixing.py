"""dfn4lab.data.mixing and augment: target SNR, determinism, reverb target, augmentations."""

from __future__ import annotations

from pathlib import Path

from dfn4lab import audio
from dfn4lab.data import augment
from dfn4lab.data.config import NOISE_ONLY_SNR, DataConfig, MixConfig
from dfn4lab.data.lists import Entry
from dfn4lab.data.mixing import Mixer

import numpy as np
import pytest
from scipy import signal

SR = 48000
ALL_ON = dict(p_eq=1.0, p_bandlimit=0.5, p_interferer=0.5, p_noise_only=0.0, max_len_s=1.0)


@pytest.fixture(scope="module")
def cfg(tiny_corpus: Path) -> DataConfig:
    return DataConfig.from_json(tiny_corpus / "data_config.json")


def snr_db(s: np.ndarray, n: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(s.astype(np.float64) ** 2) / np.sum(n.astype(np.float64) ** 2)))


def span(x) -> slice:
    """Where the speech of a mixture is (its SNR is set there)."""
    return slice(x.meta["offset"], x.meta["offset"] + x.meta["length"])


def test_mixtures_hit_the_target_snr(cfg):
    # Without reverb and clipping the noisy signal is clean + noise: measure the SNR from noisy itself.
    m = Mixer.from_config(cfg.replace(mix=dict(ALL_ON, p_reverb=0.0, p_clip=0.0)), "train")
    seen = set()
    for i in range(24):
        x = m.sample(0, i)
        assert x.noisy.shape == x.clean.shape == (SR,) and x.noisy.dtype == np.float32
        s = span(x)
        assert abs(snr_db(x.clean[s], (x.noisy - x.clean)[s]) - x.snr) < 0.5, x.meta
        seen.add(x.snr)
    assert len(seen) >= 4  # SNRs drawn from the list
    assert seen <= set(MixConfig().snrs)


def test_snr_holds_with_reverb_clipping_and_gain(cfg):
    m = Mixer.from_config(cfg.replace(mix=dict(ALL_ON, p_reverb=1.0, p_clip=0.5)), "train")
    for i in range(12):
        x = m.sample(1, i)
        assert abs(snr_db(x.clean[span(x)], x.noise[span(x)]) - x.snr) < 0.5
        assert np.max(np.abs(x.noisy)) <= 1.0 and np.max(np.abs(x.clean)) <= 1.0
        if "clip" not in x.meta:  # the mixture is reverberant speech + noise
            assert snr_db(x.clean, x.noisy - x.noise - x.clean) < 30  # late reverb is not in the target
        else:  # clipped at the recorded level (after the gain), several samples flat at it
            assert np.max(np.abs(x.noisy)) <= x.meta["clip"] + 1e-6
            assert np.sum(np.abs(x.noisy) >= 0.999 * np.max(np.abs(x.noisy))) > 10


def test_a_short_utterance_is_at_the_drawn_snr_where_it_is(tmp_path):
    """0.5 s of speech in a 3 s window at 0 dB: 0 dB over the speech, not over the window (+7.8 dB where
    the speech is, before)."""
    rng = np.random.default_rng(0)
    sp = _tone_entry(
        tmp_path, "s.wav", (rng.standard_normal(SR // 2) * 0.1).astype(np.float32), "speech", "a"
    )
    nz = _tone_entry(tmp_path, "n.wav", (rng.standard_normal(SR) * 0.1).astype(np.float32), "noise", "n")
    off = dict(p_eq=0.0, p_clip=0.0, p_bandlimit=0.0, p_noise_only=0.0, p_reverb=0.0, p_interferer=0.0)
    x = Mixer([sp], [nz], cfg=MixConfig(max_len_s=3.0, snrs=(0.0,), **off)).sample(0, 0)
    assert x.meta["length"] == SR // 2
    assert abs(snr_db(x.clean[span(x)], x.noise[span(x)])) < 0.1
    assert snr_db(x.clean, x.noise) < -7  # over the whole window the speech is a sixth of the time


def test_short_epochs_still_go_through_every_speech_file(tmp_path):
    x = (np.random.default_rng(0).standard_normal(SR) * 0.1).astype(np.float32)
    speech = [_tone_entry(tmp_path, f"s{i}.wav", x, "speech", f"g{i}") for i in range(10)]
    noise = [_tone_entry(tmp_path, "n.wav", x, "noise", "n")]
    m = Mixer(speech, noise, cfg=MixConfig(max_len_s=0.5), samples_per_epoch=3)
    files = [m.sample(e, i).meta["speech"] for e in range(4) for i in range(3)]
    assert len(set(files[:10])) == 10  # the first 10 samples of 4 epochs: each file once

    def order(seed: int) -> list[int]:
        return [
            Mixer(speech, noise, seed=seed, samples_per_epoch=3).speech_index(e, i)
            for e in range(7)
            for i in range(3)
        ]

    assert order(0) == order(0) and order(0) != order(1)  # a function of (seed, epoch, index)


def test_noise_only_samples_have_a_silent_target(cfg):
    m = Mixer.from_config(cfg.replace(mix=dict(p_noise_only=1.0, p_clip=0.0, max_len_s=0.5)), "train")
    x = m.sample(0, 0)
    assert x.snr == NOISE_ONLY_SNR and not x.clean.any() and np.abs(x.noisy).max() > 0
    np.testing.assert_array_equal(x.noisy, x.noise)
    assert x.meta["noise_only"] and "silent_speech" not in x.meta


def test_an_all_zero_speech_crop_is_marked_noise_only(tmp_path):
    silent = _tone_entry(tmp_path, "silent.wav", np.zeros(SR, np.float32), "speech", "s")
    noise = _tone_entry(
        tmp_path, "n.wav", np.random.default_rng(0).standard_normal(SR).astype(np.float32), "noise", "n"
    )
    x = Mixer([silent], [noise], cfg=MixConfig(max_len_s=0.5, p_noise_only=0.0)).sample(0, 0)
    assert x.snr == NOISE_ONLY_SNR and x.meta["noise_only"] and x.meta["silent_speech"]


def test_samples_are_a_function_of_seed_epoch_index(cfg):
    c = cfg.replace(mix=dict(ALL_ON, p_reverb=0.5, p_clip=0.3))
    a, b = Mixer.from_config(c, "train"), Mixer.from_config(c, "train")
    x, y = a.sample(2, 5), b.sample(2, 5)
    np.testing.assert_array_equal(x.noisy, y.noisy)
    np.testing.assert_array_equal(x.clean, y.clean)
    assert x.meta == y.meta
    assert not np.array_equal(a.sample(3, 5).noisy, x.noisy)  # another epoch, another sample
    assert not np.array_equal(Mixer.from_config(c.replace(seed=1), "train").sample(2, 5).noisy, x.noisy)


def test_interferer_is_another_speaker(cfg, tmp_path):
    m = Mixer.from_config(cfg.replace(mix=dict(p_interferer=1.0, max_len_s=0.5)), "train")
    for i in range(4):
        meta = m.sample(0, i).meta
        assert meta["interferer"]["speaker"] != meta["speaker"]
    # the other speaker's file is bad: the fallback is not the target's own speaker's next file
    x = (np.random.default_rng(0).standard_normal(SR) * 0.1).astype(np.float32)
    files = (("a0", "a"), ("b0", "b"), ("a1", "a"))
    speech = [_tone_entry(tmp_path, f"{name}.wav", x, "speech", g) for name, g in files]
    (tmp_path / "b0.wav").write_bytes(b"garbage")
    noise = [_tone_entry(tmp_path, "n.wav", x, "noise", "n")]
    m = Mixer(speech, noise, cfg=MixConfig(max_len_s=0.5, p_interferer=1.0, p_reverb=0.0))
    for i in range(6):
        meta = m.sample(0, i).meta
        assert meta.get("interferer", {}).get("speaker") != meta["speaker"]


def test_band_limits_stay_below_nyquist(tmp_path):
    """A 16 kHz mix of 48 kHz files: a drawn cutoff is below 8 kHz (at or above it nothing is filtered)."""
    x = (np.random.default_rng(0).standard_normal(SR) * 0.1).astype(np.float32)
    speech = [_tone_entry(tmp_path, f"s{i}.wav", x, "speech", f"s{i}") for i in range(2)]
    noise = [_tone_entry(tmp_path, "n.wav", x, "noise", "n")]
    m = Mixer(speech, noise, cfg=MixConfig(sr=16000, max_len_s=0.5, p_bandlimit=1.0, p_reverb=0.0))
    cuts = [m.sample(0, i).meta.get("bandlimit_hz") for i in range(20)]
    assert any(cuts) and all(c < 8000 for c in cuts if c)


def _tone_entry(tmp: Path, name: str, x: np.ndarray, kind: str, group: str) -> Entry:
    audio.save(tmp / name, x, SR, subtype="FLOAT")
    return Entry(str(tmp / name), kind, "train", group, x.size / SR, SR, 1, SR // 2)


def test_reverb_target_keeps_direct_path_and_early_part(tmp_path):
    rng = np.random.default_rng(0)
    dry = (rng.standard_normal(SR) * np.repeat(rng.random(20) > 0.5, SR // 20)).astype(np.float32) * 0.1
    rir = np.zeros(SR // 2, np.float32)
    rir[200] = 1.0  # direct path 200 samples in, then a dense tail decaying over ~0.6 s
    t = np.arange(rir.size - 400)
    rir[400:] = 0.02 * rng.standard_normal(t.size) * 10 ** (-3 * t / SR / 0.6)
    wet, target = augment.reverb(dry, rir, SR, early_ms=5.0, target_rt60=0.1)
    lag = np.argmax(signal.correlate(target, dry, mode="full")) - (dry.size - 1)
    assert lag == 0  # aligned to the direct path
    assert snr_db(dry, target - dry) > snr_db(dry, wet - dry) + 6  # much less reverberant than the mixture
    assert abs(augment.rms(target) - augment.rms(dry)) < 1e-4

    # Through the mixer (a RIR file, reverb always): the target is closer to the dry speech than the mixture.
    sp = _tone_entry(tmp_path, "s.wav", dry, "speech", "a")
    nz = _tone_entry(tmp_path, "n.wav", rng.standard_normal(SR).astype(np.float32) * 0.1, "noise", "n")
    rr = _tone_entry(tmp_path, "r.wav", rir, "rir", "r")
    off = dict(p_eq=0.0, p_clip=0.0, p_bandlimit=0.0, p_noise_only=0.0)
    cfg = MixConfig(max_len_s=1.0, p_reverb=1.0, snrs=(40.0,), **off)
    x = Mixer([sp], [nz], [rr], cfg).sample(0, 0)
    assert x.meta["reverb_speech"]
    wet_part = x.noisy - x.noise
    assert abs(np.corrcoef(x.clean, wet_part)[0, 1]) < 0.99  # the mixture has the late reverb


def test_bandlimit_removes_high_frequencies(cfg):
    m = Mixer.from_config(cfg.replace(mix=dict(p_bandlimit=1.0, cutoffs_hz=(4000,), max_len_s=1.0)), "train")
    x = m.sample(0, 1)
    assert x.meta["bandlimit_hz"] == 4000
    f, p = signal.welch(x.noisy, SR, nperseg=2048)
    assert p[f > 4500].sum() < 1e-4 * p[f < 3500].sum()


def test_biquads_match_scipy_and_eq_keeps_level():
    b = augment.biquad("lowpass", 1000.0, SR, q=1 / np.sqrt(2))
    bb, aa = signal.butter(2, 1000.0, fs=SR)
    np.testing.assert_allclose(b, np.concatenate([bb, aa]), atol=1e-9)
    peak = augment.biquad("peaking", 1000.0, SR, q=1.0, gain_db=12.0)
    w, h = signal.sosfreqz(peak[None], worN=[1000.0], fs=SR)
    assert abs(20 * np.log10(abs(h[0])) - 12.0) < 0.01  # +12 dB at the centre
    x = np.random.default_rng(1).standard_normal(SR).astype(np.float32)
    y, params = augment.random_eq(x, SR, np.random.default_rng(2), 3, 15.0, (0.5, 1.5))
    assert 1 <= len(params) <= 3 and abs(augment.rms(y) - augment.rms(x)) < 1e-4


@pytest.mark.parametrize("sr", [8000, 16000])
def test_augmentations_work_at_low_rates(sr):
    """A low-pass's 4-8 kHz range and the clicks' 4-12 kHz band edge lie above 8 kHz audio's Nyquist."""
    from dfn4lab.data import synth

    x = np.random.default_rng(1).standard_normal(sr).astype(np.float32)
    for seed in range(20):
        y, params = augment.random_eq(x, sr, np.random.default_rng(seed), 3, 15.0, (0.5, 1.5))
        assert np.isfinite(y).all() and all(p["freq"] < sr / 2 for p in params)
        assert np.isfinite(synth.clicks(sr, sr, np.random.default_rng(seed))).all()


def test_mixture_steps_hit_the_snr_and_keep_the_dry_level():
    from dfn4lab.data.mixing import mixture_steps

    rng = np.random.default_rng(0)
    speech = rng.standard_normal(24000).astype(np.float32) * 0.1
    noise = rng.standard_normal(30000).astype(np.float32)
    for rt60 in (None, 0.4):
        s = mixture_steps(speech, noise, 16000, snr_db=3.0, rt60=rt60, eq_gain_db=6.0)
        assert {k: v.shape for k, v in s.items()} == {k: (24000,) for k in s}
        resid = s["noisy"] - s["reverberant"]
        snr = 10 * np.log10(np.mean(s["target"] ** 2) / np.mean(resid**2))  # as Mixer: against the target
        assert abs(snr - 3.0) < 0.01
        assert abs(np.sqrt(np.mean(s["eq"] ** 2)) - np.sqrt(np.mean(speech**2))) < 1e-4  # EQ keeps the RMS
