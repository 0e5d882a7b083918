"""Offline enhancement with the official DeepFilterNet3 weights: quality, agreement, I/O and the CLI."""

from __future__ import annotations

import subprocess
import sys

import dfn4lab  # noqa: F401
from dfn4lab import data, inference
from dfn4lab.audio import AudioError

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from conftest import tiny_cfg


def si_sdr(ref: np.ndarray, est: np.ndarray) -> float:
    a = np.dot(est, ref) / np.dot(ref, ref)
    return float(10 * np.log10(np.sum((a * ref) ** 2) / np.sum((a * ref - est) ** 2)))


def snr(ref: np.ndarray, est: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - est) ** 2)))


@pytest.fixture(scope="module")
def dfn3():
    return inference.load_pretrained("dfn3")


@pytest.fixture(scope="module")
def clip():
    if not data.speech_files():
        pytest.skip("real speech comes from Debian's alsa-utils (/usr/share/sounds/alsa), not installed")
    return data.noisy_clip(seconds=4.0, snr_db=0.0)


def test_dfn3_raises_si_sdr(dfn3, clip):
    noisy, clean = clip
    gain = si_sdr(clean, inference.enhance(noisy, 48000, dfn3)) - si_sdr(clean, noisy)
    assert gain > 6.0, f"SI-SDR improvement only {gain:.1f} dB"


def test_agrees_with_official_runtime(dfn3, clip):
    noisy, _ = clip
    ours = inference.enhance(noisy, 48000, dfn3)
    official = inference.official_enhance(noisy)
    # The runtime zeroes output while its input is silent, so the flushed tail (its 3-hop delay) differs.
    tail = inference.OFFICIAL_DELAY
    # Same network, weights and alignment (the encoder reads every frame from the first, as the
    # runtime): measured 91-123 dB on the demo test files, so float32 rounding is all that differs.
    assert snr(official[:-tail], ours[:-tail]) > 60.0


@pytest.mark.parametrize(
    "setting", [{"pf_beta": 0.02}, {"pf_beta": 0.2}, {"atten_lim_db": 6.0}, {"atten_lim_db": 12}]
)
def test_post_filter_and_attenuation_limit_agree_with_official_runtime(dfn3, clip, setting):
    """Checked against the runtime's own post_filter_beta and atten_lim, not formulas written here."""
    noisy, _ = clip
    beta = setting.get("pf_beta", 0.0)
    model = inference.load_pretrained("dfn3")
    model.cfg = model.cfg.replace(mask_pf=beta > 0, pf_beta=beta)
    ours = inference.enhance(noisy, 48000, model, atten_lim_db=setting.get("atten_lim_db"))
    official = inference.official_enhance(
        noisy, atten_lim_db=setting.get("atten_lim_db", 100.0), pf_beta=beta
    )
    plain = inference.official_enhance(noisy)
    tail = inference.OFFICIAL_DELAY
    assert snr(official[:-tail], ours[:-tail]) > 60.0  # measured 105-131 dB
    assert snr(official[:-tail], plain[:-tail]) < 40.0  # the setting changes the output (24-31 dB)


@pytest.mark.parametrize("chunk", [37, 480])
def test_chunked_enhance_equals_offline_forward(dfn3, clip, chunk):
    noisy, _ = clip
    offline = inference.analyze(noisy[:96000], dfn3)["enhanced"]  # one offline forward over it all
    chunked = inference.enhance(noisy[:96000], 48000, dfn3, chunk_frames=chunk)
    np.testing.assert_allclose(chunked, offline, atol=1e-5)
    limited = inference.enhance(noisy[:96000], 48000, dfn3, atten_lim_db=6.0, chunk_frames=chunk)
    floor = 10 ** (-6 / 20)
    # the attenuation limit mixes the noisy input back in: y = floor*noisy + (1-floor)*enhanced
    np.testing.assert_allclose(limited, floor * noisy[:96000] + (1 - floor) * offline, atol=2e-4)


def test_chunked_enhance_when_hop_does_not_divide_fft():
    """fft 1024, hop 480: a frame spans 3 hops, not 2; the chunks' analysis memory rounds up. (The model
    is fresh, in training mode: analyze, like enhance, runs it in eval mode.)"""
    mx.random.seed(0)
    model = inference.build(tiny_cfg(dsp={"fft_size": 1024, "hop_size": 480}))
    x = 0.1 * np.random.default_rng(0).standard_normal(9000).astype(np.float32)
    offline = inference.analyze(x, model)["enhanced"]
    assert not model.training
    np.testing.assert_allclose(inference.enhance(x, 48000, model, chunk_frames=3), offline, atol=1e-6)


def test_any_rate_and_channels(dfn3):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 16000)) * 0.1).astype(np.float32)
    y = inference.enhance(x, 16000, dfn3)
    assert y.shape == x.shape and np.isfinite(y).all()
    y0 = inference.enhance(x[0], 16000, dfn3)  # channels are independent
    np.testing.assert_allclose(y[0], y0, atol=1e-5)
    with pytest.raises(AudioError, match="transpose"):  # soundfile's (samples, channels) layout
        inference.enhance(x.T, 16000, dfn3)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dfn4lab", *args], capture_output=True, text=True, timeout=300
    )


def test_enhanced_files_keep_the_input_format_and_say_when_they_clip(dfn3, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    (tmp_path / "out").mkdir()
    deep = tmp_path / "deep.flac"  # 24-bit stereo at 44.1 kHz
    sf.write(deep, (rng.standard_normal((8820, 2)) * 0.05).astype(np.float32), 44100, subtype="PCM_24")
    out = inference.enhance_file(deep, tmp_path / "out", dfn3)
    assert (sf.info(out).subtype, sf.info(out).channels, sf.info(out).samplerate) == ("PCM_24", 2, 44100)
    monkeypatch.setattr(inference, "enhance", lambda x, sr, model, **kw: 4 * x)  # an output past full scale
    x = (rng.standard_normal(9600) * 0.3).clip(-1, 1)
    sf.write(tmp_path / "float.wav", x, 48000, subtype="FLOAT")
    sf.write(tmp_path / "pcm.wav", x, 48000, subtype="PCM_16")
    out = inference.enhance_file(tmp_path / "float.wav", tmp_path / "out", dfn3)  # float holds it: no warning
    assert sf.info(out).subtype == "FLOAT" and np.abs(sf.read(out)[0]).max() > 1.0
    with pytest.warns(UserWarning, match=r"pcm.wav: \d+ samples beyond full scale clipped \(PCM_16\)"):
        out = inference.enhance_file(tmp_path / "pcm.wav", tmp_path / "out", dfn3)
    assert sf.info(out).subtype == "PCM_16" and np.abs(sf.read(out)[0]).max() <= 1.0
    sf.write(tmp_path / "mac.aif", x, 48000, format="AIFF", subtype="PCM_24")  # no "AIF" format in soundfile
    with pytest.warns(UserWarning, match="mac.aif"):  # 4 x: clipped in PCM_24 too
        out = inference.enhance_file(tmp_path / "mac.aif", tmp_path / "out", dfn3)
    assert (out.name, sf.info(out).format, sf.info(out).subtype) == ("mac.aif", "AIFF", "PCM_24")


def test_cli_enhances_and_rejects_bad_input(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, (np.random.default_rng(0).standard_normal(24000) * 0.05).astype(np.float32), 24000)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 48000)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(4800, np.nan, np.float32), 48000, subtype="FLOAT")
    out = tmp_path / "out"
    res = _cli("enhance", str(good), str(empty), str(nan), str(tmp_path / "missing.wav"), "-o", str(out))
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["good.wav"]  # no partial outputs
    y, sr = sf.read(out / "good.wav")
    assert sr == 24000 and y.shape == (24000,)
    before = good.read_bytes()
    res = _cli("enhance", str(good), "-o", str(tmp_path))  # would write over its input
    assert res.returncode == 1 and "replace the input" in res.stderr and good.read_bytes() == before
    (tmp_path / "other").mkdir()
    twin = tmp_path / "other" / "good.wav"
    twin.write_bytes(before)
    res = _cli("enhance", str(good), str(twin), "-o", str(tmp_path / "twins"))  # one output name, twice
    assert res.returncode == 2 and "share a file name" in res.stderr and not (tmp_path / "twins").exists()
    res = _cli("enhance", str(good), "-o", str(out), "--model", "nonsense")
    assert res.returncode == 2 and res.stderr.startswith("error:") and "Traceback" not in res.stderr
    res = _cli("enhance", str(good), "-o", str(tmp_path / "lim"), "--atten-lim", "-5")  # was |-5| silently
    assert res.returncode == 2 and "--atten-lim must be a number of dB >= 0" in res.stderr
    res = _cli("enhance", str(good), "-o", str(good))  # -o names the input file itself
    assert res.returncode == 1 and "would replace the input" in res.stderr
    res = _cli("enhance", str(good), "-o", str(tmp_path / "clean.flac"))  # a folder clean.flac/, before
    assert res.returncode == 0 and res.stdout.strip() == str(tmp_path / "clean.flac")
    assert sf.info(str(tmp_path / "clean.flac")).format == "FLAC"
    res = _cli("enhance", str(good), str(twin), "-o", str(tmp_path / "two.wav"))
    assert res.returncode == 2 and "two.wav names a file: 2 inputs need a folder" in res.stderr
    (tmp_path / "file").write_bytes(b"x")
    res = _cli("enhance", str(good), "-o", str(tmp_path / "file"))  # not audio, not a folder
    assert res.returncode == 2 and "is a file, not a folder" in res.stderr
    for beta in ("inf", "nan", "-1"):  # inf gave NaN audio blamed on the file; nan silently disabled it
        res = _cli("enhance", str(good), "-o", str(tmp_path / "pf"), "--pf-beta", beta)
        assert res.returncode == 2 and "--pf-beta must be" in res.stderr and not (tmp_path / "pf").exists()
