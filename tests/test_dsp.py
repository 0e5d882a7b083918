"""dfn4lab.dsp against libDF (the reference DSP), torch (gradients) and float64 recursions."""

from __future__ import annotations

import math
from pathlib import Path

# isort: off
import dfn4lab  # noqa: F401  (binds BLAS before mlx.core)
import mlx.core as mx

# isort: on
from dfn4lab import dsp
from dfn4lab.config import DspConfig

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from libdf import DF, erb, erb_norm, unit_norm, unit_norm_init

CFG48 = DspConfig()
CFG16 = DspConfig(sr=16000, fft_size=320, hop_size=160, nb_erb=32, nb_df=64, min_nb_erb_freqs=1)
CFG48_HOP240 = DspConfig(hop_size=240)  # 4x overlap: frames span more than two hops
CONFIGS = {"48k": CFG48, "16k": CFG16, "48k-hop240": CFG48_HOP240}
RECORDING = Path("/usr/share/sounds/alsa/Front_Center.wav")


def libdf_state(cfg: DspConfig) -> DF:
    return DF(cfg.sr, cfg.fft_size, cfg.hop_size, cfg.nb_erb, cfg.min_nb_erb_freqs)


def noise(cfg: DspConfig, frames: int = 200, channels: int = 2, extra: int = 37) -> np.ndarray:
    """(channels, frames*hop + extra): the trailing partial hop must be dropped like libDF does."""
    rng = np.random.default_rng(frames + cfg.sr)
    return (0.1 * rng.standard_normal((channels, frames * cfg.hop_size + extra))).astype(np.float32)


def recording(cfg: DspConfig) -> np.ndarray:
    if not RECORDING.exists():
        pytest.skip(f"{RECORDING} not installed (alsa-utils sounds)")
    x, sr = sf.read(RECORDING, dtype="float32", always_2d=True)
    x = x.T
    if sr != cfg.sr:
        x = soxr.resample(x.T, sr, cfg.sr).T
    return np.ascontiguousarray(x, dtype=np.float32)


def signal(kind: str, cfg: DspConfig) -> np.ndarray:
    return noise(cfg) if kind == "noise" else recording(cfg)


@pytest.mark.parametrize(
    "sr,fft,hop,nb_erb,min_freqs",
    [
        (48000, 960, 480, 32, 2),
        (48000, 960, 480, 24, 2),
        (16000, 320, 160, 32, 1),
        (16000, 320, 160, 24, 1),
        (24000, 480, 240, 24, 1),
        (44100, 882, 441, 32, 2),
        (8000, 256, 128, 16, 1),
        (48000, 1920, 480, 32, 2),
    ],
)
def test_erb_widths_equal_libdf(sr, fft, hop, nb_erb, min_freqs):
    cfg = DspConfig(sr=sr, fft_size=fft, hop_size=hop, nb_erb=nb_erb, min_nb_erb_freqs=min_freqs)
    np.testing.assert_array_equal(dsp.erb_widths(cfg), DF(sr, fft, hop, nb_erb, min_freqs).erb_widths())


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_window_equals_libdf(cfg):
    np.testing.assert_allclose(dsp.window(cfg), libdf_state(cfg).fft_window(), atol=1e-7)


def test_erb_fb_forward_averages_and_inverse_repeats():
    cfg = CFG48
    widths = dsp.erb_widths(cfg)
    rng = np.random.default_rng(0)
    p = rng.random((3, cfg.freq_bins)).astype(np.float32)
    starts = np.cumsum(widths) - widths
    expected = np.stack([p[:, s : s + w].mean(-1) for s, w in zip(starts, widths, strict=True)], -1)
    np.testing.assert_allclose(np.array(mx.array(p) @ dsp.erb_fb(cfg)), expected, rtol=1e-5)
    g = rng.random((3, cfg.nb_erb)).astype(np.float32)
    inv = dsp.erb_fb(cfg, inverse=True)
    assert inv.shape == (cfg.nb_erb, cfg.freq_bins)
    np.testing.assert_array_equal(np.array(mx.array(g) @ inv), np.repeat(g, widths, axis=-1))


@pytest.mark.parametrize("kind", ["noise", "recording"])
@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_stft_matches_libdf_analysis(cfg, kind):
    x = signal(kind, cfg)
    ref = libdf_state(cfg).analysis(x)
    spec = np.array(dsp.stft(mx.array(x), cfg))
    assert spec.shape == ref.shape == (x.shape[0], x.shape[1] // cfg.hop_size, cfg.freq_bins)
    assert spec.dtype == np.complex64
    err = np.abs(spec - ref).max()
    assert err <= 1e-6 * max(1.0, np.abs(ref).max()), err  # measured ~2e-9 (48k noise)


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_istft_matches_libdf_synthesis(cfg):
    rng = np.random.default_rng(1)
    shape = (2, 50, cfg.freq_bins)
    spec = (0.01 * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))).astype(np.complex64)
    ref = libdf_state(cfg).synthesis(spec.copy())  # libDF's inverse FFT overwrites its input
    out = np.array(dsp.istft(mx.array(spec), cfg))
    assert out.shape == ref.shape == (2, 50 * cfg.hop_size)
    assert np.abs(out - ref).max() <= 1e-5


@pytest.mark.parametrize("kind", ["noise", "recording"])
@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_round_trip_is_delayed_input(cfg, kind):
    x = signal(kind, cfg)
    y = np.array(dsp.istft(dsp.stft(mx.array(x), cfg), cfg))
    delay = cfg.fft_size - cfg.hop_size
    n = y.shape[-1] - delay
    assert np.abs(y[:, :delay]).max() <= 1e-6
    assert np.abs(y[:, delay:] - x[:, :n]).max() <= 1e-5


@pytest.mark.parametrize("kind", ["noise", "recording"])
@pytest.mark.parametrize("cfg", [CFG48, CFG16], ids=["48k", "16k"])
def test_features_match_libdf(cfg, kind):
    x = signal(kind, cfg)
    spec = libdf_state(cfg).analysis(x)
    ref_erb = erb_norm(erb(spec, libdf_state(cfg).erb_widths()), cfg.alpha)
    ref_df = unit_norm(spec[..., : cfg.nb_df].copy(), cfg.alpha)  # libdf normalises in place
    feat_erb, feat_df = dsp.features(mx.array(spec), cfg)
    assert feat_erb.shape == ref_erb.shape and feat_df.shape == ref_df.shape
    assert feat_df.dtype == mx.complex64
    assert np.abs(np.array(feat_erb) - ref_erb).max() <= 1e-4  # measured ~2e-6
    assert np.abs(np.array(feat_df) - ref_df).max() <= 1e-4  # measured ~7e-8


def test_norm_init_states_equal_libdf():
    np.testing.assert_allclose(np.array(dsp.df_norm_init(CFG48)), unit_norm_init(CFG48.nb_df)[0], rtol=1e-6)
    # libdf's erb_norm from its own init on zero input: feature_0 = (0 - alpha*init) / 40
    ref = erb_norm(np.zeros((1, 1, CFG48.nb_erb), np.float32), 0.5)[0, 0]
    np.testing.assert_allclose(np.array(dsp.erb_norm_init(CFG48)), -80 * ref, rtol=1e-6)


def test_features_from_given_state_match_libdf():
    cfg = CFG16
    spec = libdf_state(cfg).analysis(noise(cfg, frames=150))
    rng = np.random.default_rng(2)
    s_erb = (-40 - 20 * rng.random((2, cfg.nb_erb))).astype(np.float32)
    s_df = (0.01 * rng.random((2, cfg.nb_df)) + 1e-3).astype(np.float32)
    ref_erb = erb_norm(erb(spec, libdf_state(cfg).erb_widths()), cfg.alpha, s_erb.copy())
    ref_df = unit_norm(spec[..., : cfg.nb_df].copy(), cfg.alpha, s_df.copy())
    s = mx.array(spec)
    assert np.abs(np.array(dsp.erb_feature(s, cfg, mx.array(s_erb))) - ref_erb).max() <= 1e-4
    assert np.abs(np.array(dsp.df_feature(s, cfg, mx.array(s_df))) - ref_df).max() <= 1e-4


def test_feature_state_continues_a_stream():
    cfg = CFG48
    spec = dsp.stft(mx.array(noise(cfg, frames=300)), cfg)
    whole_erb, whole_df = dsp.features(spec, cfg)
    a_erb, s_erb = dsp.erb_feature(spec[:, :130], cfg, return_state=True)
    a_df, s_df = dsp.df_feature(spec[:, :130], cfg, return_state=True)
    b_erb = dsp.erb_feature(spec[:, 130:], cfg, s_erb)
    b_df = dsp.df_feature(spec[:, 130:], cfg, s_df)
    np.testing.assert_allclose(np.array(mx.concatenate([a_erb, b_erb], 1)), np.array(whole_erb), atol=1e-5)
    assert np.abs(np.array(mx.concatenate([a_df, b_df], 1)) - np.array(whole_df)).max() <= 1e-5


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_batched_equals_per_frame(cfg):
    x = noise(cfg, frames=80, extra=0)
    spec = dsp.stft(mx.array(x), cfg)
    feat_erb, feat_df = dsp.features(spec, cfg)
    y = dsp.istft(spec, cfg)
    stream = dsp.DfStream(cfg, batch=x.shape[0])
    frames, erbs, dfs, hops = [], [], [], []
    for t in range(spec.shape[1]):
        frame = stream.analysis(mx.array(x[:, t * cfg.hop_size : (t + 1) * cfg.hop_size]))
        e, d = stream.features(frame)
        frames.append(frame), erbs.append(e), dfs.append(d), hops.append(stream.synthesis(frame))
    assert np.abs(np.array(mx.stack(frames, 1)) - np.array(spec)).max() <= 1e-7
    assert np.abs(np.array(mx.stack(erbs, 1)) - np.array(feat_erb)).max() <= 1e-5
    assert np.abs(np.array(mx.stack(dfs, 1)) - np.array(feat_df)).max() <= 1e-5
    assert np.abs(np.array(mx.concatenate(hops, 1)) - np.array(y)).max() <= 1e-6


def test_exp_mean_long_signal_matches_float64():
    """5000 frames exercise three levels of the chunked closed form."""
    t, f, a = 5000, 8, float(np.float32(0.99))
    rng = np.random.default_rng(3)
    x = (-50 + 15 * rng.standard_normal((1, t, f))).astype(np.float32)
    s0 = np.linspace(-60, -90, f, dtype=np.float32)[None]
    ref = np.empty((t, f))
    s = s0[0].astype(np.float64)
    for i in range(t):
        s = a * s + (1 - a) * x[0, i]
        ref[i] = s
    out = np.array(dsp.exp_mean(mx.array(x), a, mx.array(s0)))[0]
    assert np.abs(out - ref).max() / 40 <= 1e-5  # in ERB-feature units; measured ~4e-7


@pytest.mark.parametrize(
    "sr,hop,tau",
    [(48000, 480, 1.0), (16000, 160, 1.0), (48000, 480, 10.0), (48000, 480, 100.0), (8000, 80, 0.5)],
)
def test_alpha_rounding_matches_upstream(sr, hop, tau):
    # df.utils.get_norm_alpha: round exp(-hop/sr/tau) to 3, 4, ... decimals until it is below 1
    a_, precision, a = math.exp(-hop / sr / tau), 3, 1.0
    while a >= 1.0:
        a = round(a_, precision)
        precision += 1
    assert DspConfig(sr=sr, hop_size=hop, fft_size=2 * hop, norm_tau=tau, nb_df=32).alpha == a


def _torch_reference_loss(x: torch.Tensor, cfg: DspConfig, g: torch.Tensor) -> torch.Tensor:
    """Independent torch version of stft + features (unfold + per-frame loop) and istft."""
    hop, n = cfg.hop_size, cfg.fft_size
    w = torch.tensor(dsp.window(cfg))
    xp = torch.nn.functional.pad(x, (n - hop, 0))
    frames = xp.unfold(-1, n, hop)
    spec = torch.fft.rfft(frames * w, dim=-1) * dsp.wnorm(cfg)
    fb = torch.tensor(np.array(dsp.erb_fb(cfg)))
    db = 10 * torch.log10(spec.abs() ** 2 @ fb + 1e-10)
    s_e = torch.tensor(np.array(dsp.erb_norm_init(cfg)))
    s_d = torch.tensor(np.array(dsp.df_norm_init(cfg)))
    loss = torch.zeros(())
    for t in range(spec.shape[1]):
        s_e = cfg.alpha * s_e + (1 - cfg.alpha) * db[:, t]
        s_d = cfg.alpha * s_d + (1 - cfg.alpha) * spec[:, t, : cfg.nb_df].abs()
        loss = loss + ((db[:, t] - s_e) / 40).pow(2).sum()
        loss = loss + (spec[:, t, : cfg.nb_df] / s_d.sqrt()).real.sum()
    frames_out = torch.fft.irfft(spec * g, n=n, dim=-1) * n * w  # (1, T, n)
    t = spec.shape[1]
    y = torch.nn.functional.fold(frames_out.transpose(1, 2), (1, (t - 1) * hop + n), (1, n), stride=(1, hop))
    return loss + (y.flatten()[: t * hop] ** 2).sum()


def test_gradient_matches_torch():
    cfg = CFG16
    x = noise(cfg, frames=40, channels=1, extra=0)
    g = np.random.default_rng(4).random(cfg.freq_bins).astype(np.float32)

    def loss(xm: mx.array) -> mx.array:
        spec = dsp.stft(xm, cfg)
        e, d = dsp.features(spec, cfg)
        y = dsp.istft(spec * mx.array(g), cfg)
        return (e**2).sum() + mx.real(d).sum() + (y**2).sum()

    grad = np.array(mx.grad(loss)(mx.array(x)))
    xt = torch.tensor(x, requires_grad=True)
    _torch_reference_loss(xt, cfg, torch.tensor(g)).backward()
    ref = xt.grad.numpy()
    assert np.isfinite(grad).all()
    assert np.abs(grad - ref).max() <= 1e-3 * np.abs(ref).max()
