"""dfn4lab.audio: file round trips, resampling, bad input, atomic saves."""

from __future__ import annotations

from dfn4lab import audio
from dfn4lab.audio import AudioError

import numpy as np
import pytest
import soundfile as sf


def sine(freq: float, sr: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return np.stack([0.5 * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)]).astype(
        np.float32
    )


def peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spec) * sr / x.size)


@pytest.mark.parametrize("ext,lossy", [("wav", False), ("flac", False), ("ogg", True)])
def test_round_trip(tmp_path, ext, lossy):
    x = sine(440, 16000, 0.5, channels=2)
    path = tmp_path / f"a.{ext}"
    audio.save(path, x, 16000)
    y, sr = audio.load(path)
    assert sr == 16000 and y.dtype == np.float32
    assert y.shape == x.shape  # (channels, samples)
    if lossy:  # Vorbis: per-channel SNR above 20 dB
        assert (10 * np.log10((x**2).sum(1) / ((y - x) ** 2).sum(1)) > 20).all()
    else:  # 16-bit PCM
        assert np.abs(y - x).max() <= 1 / 2**15


def test_float_wav_is_exact_and_mono_is_one_row(tmp_path):
    x = np.random.default_rng(0).uniform(-1.5, 1.5, 1000).astype(np.float32)
    path = tmp_path / "f.wav"
    audio.save(path, x, 8000, subtype="FLOAT")
    y, _ = audio.load(path)
    assert y.shape == (1, 1000)
    np.testing.assert_array_equal(y[0], x)


def test_load_mono_and_resample(tmp_path):
    x = sine(1000, 48000, 0.5, channels=2)
    path = tmp_path / "s.flac"
    audio.save(path, x, 48000)
    y, sr = audio.load(path, sr=16000, mono=True)
    assert sr == 16000 and y.shape == (1, 8000)
    np.testing.assert_allclose(y[0], audio.resample(x.mean(0), 48000, 16000), atol=1e-4)


@pytest.mark.parametrize("sr_in,sr_out", [(48000, 16000), (16000, 48000), (44100, 48000)])
def test_resample_keeps_length_and_frequency(sr_in, sr_out):
    x = sine(997, sr_in, 1.0, channels=2)
    y = audio.resample(x, sr_in, sr_out)
    assert y.dtype == np.float32 and y.shape[0] == 2
    assert abs(y.shape[1] - x.shape[1] * sr_out / sr_in) <= 1
    for c in range(2):
        assert abs(peak_hz(y[c], sr_out) - 997 * (c + 1)) <= 2  # 1 s: 1 Hz bins
    # the level is kept too, away from the filter's edge effects
    assert abs(np.abs(y[0, 1000:-1000]).max() - 0.5) < 0.01


def test_resample_to_restores_any_length_through_48k():
    """88.2 and 192 kHz -> 48 kHz -> back can lose a sample; resample_to gives the length back."""
    for sr in (88200, 192000, 44100):
        for n in range(20000, 20050):
            x = np.zeros(n, np.float32)
            assert audio.resample_to(audio.resample(x, sr, 48000), 48000, sr, n).shape == (n,)


def test_resample_1d_stays_1d():
    y = audio.resample(np.zeros(480, np.float32), 48000, 16000)
    assert y.shape == (160,)


def test_bad_inputs_raise_audio_error(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really audio" * 10)
    sf.write(tmp_path / "zero.wav", np.zeros((0, 1), np.float32), 16000)
    bad = np.array([0.0, np.nan, 0.1], np.float32)
    sf.write(tmp_path / "nan.wav", bad, 16000, subtype="FLOAT")
    sf.write(tmp_path / "inf.wav", np.array([0.0, np.inf], np.float32), 16000, subtype="FLOAT")
    cases = {
        "missing.wav": "no such file",
        "empty.wav": "empty file",
        "junk.wav": "unreadable",
        "zero.wav": "no samples",
        "nan.wav": "NaN or inf",
        "inf.wav": "NaN or inf",
        ".": "not a file",
    }
    for name, problem in cases.items():
        with pytest.raises(AudioError, match=problem) as info:
            audio.load(tmp_path / name)
        message = str(info.value)
        assert str(tmp_path / name) in message and "\n" not in message
    assert issubclass(AudioError, ValueError)
    with pytest.raises(AudioError, match="NaN or inf"):
        audio.save(tmp_path / "out.wav", bad, 16000)
    with pytest.raises(AudioError, match="no samples"):
        audio.save(tmp_path / "out.wav", np.zeros((1, 0), np.float32), 16000)
    with pytest.raises(AudioError, match="NaN or inf"):
        audio.resample(bad, 16000, 8000)
    assert not (tmp_path / "out.wav").exists()


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "out.wav"
    audio.save(path, sine(440, 8000, 0.1), 8000)
    before = path.read_bytes()
    real_write = sf.write

    def write_then_fail(file, data, *args, **kwargs):
        real_write(file, data[: len(data) // 2], *args, **kwargs)  # a partial file hits the disk
        raise OSError("disk full")

    monkeypatch.setattr(audio.sf, "write", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        audio.save(path, sine(220, 8000, 1.0), 8000)
    with pytest.raises(OSError, match="disk full"):
        audio.save(tmp_path / "new.wav", sine(220, 8000, 1.0), 8000)
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]  # no temp or partial files


def test_save_rejects_unknown_extension(tmp_path):
    with pytest.raises(AudioError, match="unknown audio format"):
        audio.save(tmp_path / "x.xyz", sine(440, 8000, 0.1), 8000)
    assert list(tmp_path.iterdir()) == []
