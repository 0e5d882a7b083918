"""Losses: DFN3's terms against PyTorch oracles written from upstream ``df/loss.py``; the dynamic loss
finite (values and gradients) on silent, noise-only and clipped input, and each of its parts doing
what it claims."""

from __future__ import annotations

import dataclasses

import dfn4lab  # noqa: F401
from dfn4lab import dsp, losses
from dfn4lab.config import DspConfig
from dfn4lab.losses import LossConfig

import mlx.core as mx
import numpy as np
import pytest
import torch

CFG = DspConfig()
SR = CFG.sr
ALL = LossConfig(spec_magnitude=1e3, spec_complex=1e3, mask=1.0, sisdr=0.1, dynamic="awesome", vad=1.0)


def _voice(n: int, rng: np.random.Generator, f0: float = 140.0) -> np.ndarray:
    """Harmonic syllables at ~4 Hz with pauses: speech-like in band, pitch and modulation."""
    t = np.arange(n) / SR
    x = sum(np.sin(2 * np.pi * k * f0 * (1 + 0.05 * np.sin(2 * np.pi * 2 * t)) * t) / k for k in range(1, 25))
    gate = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)), 0, None) ** 2
    return (0.05 * x * gate).astype(np.float32)


def _ri(x: np.ndarray) -> mx.array:
    """Waveforms (batch, samples) -> spectra (batch, time, freq, 2)."""
    s = dsp.stft(mx.array(x), CFG)
    return mx.stack([mx.real(s), mx.imag(s)], axis=-1)


def _cases() -> dict[str, tuple[mx.array, mx.array, mx.array]]:
    """(enhanced, clean, noisy) spectra, batch of 2, 0.5 s each."""
    rng = np.random.default_rng(0)
    n = SR // 2
    clean = np.stack([_voice(n, rng), _voice(n, rng, 210.0)])
    noise = 0.02 * rng.standard_normal((2, n)).astype(np.float32)
    zeros = np.zeros_like(clean)
    clipped = np.clip(clean + noise, -0.03, 0.03)
    return {
        "speech": (_ri(clean + 0.5 * noise), _ri(clean), _ri(clean + noise)),
        "silent": (_ri(zeros), _ri(zeros), _ri(zeros)),
        "noise_only": (_ri(0.3 * noise), _ri(zeros), _ri(noise)),
        "clipped": (_ri(clipped), _ri(clean), _ri(clipped)),
    }


def _tc(x: mx.array) -> torch.Tensor:
    return torch.from_numpy(np.array(x))


# --- DFN3 terms against upstream formulas ----------------------------------------------------------


@pytest.mark.parametrize("n_fft", [256, 2048])
def test_stft_matches_torch(n_fft):
    x = np.random.default_rng(1).standard_normal((2, 5000)).astype(np.float32)
    ours = np.array(losses.stft(mx.array(x), n_fft))
    w = torch.hann_window(n_fft)
    ref = torch.stft(torch.from_numpy(x), n_fft, n_fft // 4, window=w, normalized=True, return_complex=True)
    np.testing.assert_allclose(ours, torch.view_as_real(ref).transpose(1, 2).numpy(), atol=2e-6)


def _torch_compress(y: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    mag = y.abs().clamp_min(1e-12).pow(gamma)
    return mag, torch.view_as_real(mag * torch.exp(1j * y.angle()))


def test_multires_spec_loss_matches_upstream():
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal((2, 6000)).astype(np.float32) for _ in range(2))
    ours = float(losses.multires_spec_loss(mx.array(a), mx.array(b), (256, 512, 1024, 2048), 0.3, 500, 500))
    ref = 0.0
    for n in (256, 512, 1024, 2048):
        w = torch.hann_window(n)
        y, s = (
            torch.stft(torch.from_numpy(v), n, n // 4, window=w, normalized=True, return_complex=True)
            for v in (a, b)
        )
        (ym, yc), (sm, sc) = _torch_compress(y, 0.3), _torch_compress(s, 0.3)
        ref += 500 * float(torch.nn.functional.mse_loss(ym, sm)) + 500 * float(
            torch.nn.functional.mse_loss(yc, sc)
        )
    assert ours == pytest.approx(ref, rel=1e-4)


def test_spectral_loss_matches_upstream():
    enh, clean, _ = _cases()["speech"]
    ours = float(losses.spectral_loss(enh, clean, gamma=0.3, f_mag=2.0, f_complex=3.0, f_under=2.0))
    y, s = (torch.view_as_complex(_tc(v).contiguous()) for v in (enh, clean))
    (ym, yc), (sm, sc) = _torch_compress(y, 0.3), _torch_compress(s, 0.3)
    d = (ym - sm) ** 2 * torch.where(ym < sm, 2.0, 1.0)
    ref = 2.0 * float(d.mean()) + 3.0 * float(torch.nn.functional.mse_loss(yc, sc))
    assert ours == pytest.approx(ref, rel=1e-4)


def test_si_sdr_matches_upstream_and_theory():
    rng = np.random.default_rng(3)
    s = rng.standard_normal((3, 4000)).astype(np.float32)
    e = s * 0.7 + 0.3 * rng.standard_normal((3, 4000)).astype(np.float32)
    ours = np.array(losses.si_sdr(mx.array(e), mx.array(s)))
    st, et = torch.from_numpy(s), torch.from_numpy(e)
    eps = torch.finfo(torch.float32).eps
    a = ((st * et).sum(-1, keepdim=True) + eps) / ((st * st).sum(-1, keepdim=True) + eps)
    ref = 10 * torch.log10(((a * st) ** 2).sum(-1) / ((et - a * st) ** 2).sum(-1))
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-3)
    # scaling the estimate changes nothing; a clean estimate scores far higher
    np.testing.assert_allclose(np.array(losses.si_sdr(mx.array(3 * e), mx.array(s))), ours, atol=1e-3)
    assert float(losses.si_sdr(mx.array(s), mx.array(s)).min()) > 60


def test_local_snr_target_matches_upstream():
    _, clean, noisy = _cases()["speech"]
    ours = np.array(losses.local_snr_target(clean, noisy - clean, CFG, (-15.0, 35.0)))
    # upstream local_snr: speech window 1 frame, noise window 2 -> 3 (periodic Hann, centred), / ws
    es = (_tc(clean) ** 2).sum((-1, -2))
    en = torch.nn.functional.pad((_tc(noisy - clean) ** 2).sum((-1, -2)), (1, 1))
    en = (en.unfold(-1, 3, 1) * torch.hann_window(3)).sum(-1) / 3
    ref = (10 * (es / en.clamp_min(1e-12)).clamp_min(1e-12).log10()).clamp(-16, 36)
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-3)


def _upstream_mask_loss(mask, clean, noisy, erb_fb, gamma=0.6, f_under=2.0, eps=1e-12):
    """Upstream df/loss.py ``MaskLoss.forward``: iam; powers [2, 4], factors [1, 10], as ``Loss`` sets it."""
    c, n = (torch.view_as_complex(x.contiguous()) for x in (clean, noisy))
    iam = (c.abs() / (n.abs() + 1e-10)).clamp(0, 1)
    g_t = torch.matmul(iam, erb_fb).clamp_min(eps).pow(gamma)
    g_p = mask.clamp_min(eps).pow(gamma)
    tmp = g_t.sub(g_p).pow(2)
    tmp = tmp * torch.where(g_p < g_t, f_under, 1.0)
    loss = torch.zeros(())
    for power, factor in zip([2, 4], [1, 10], strict=True):
        loss = loss + tmp.clamp_min(1e-13).pow(power // 2).mean().mul(factor)
    return loss


def test_mask_loss_matches_upstream_and_is_zero_at_the_ideal_mask():
    _, clean, noisy = _cases()["speech"]
    iam = mx.clip(losses._mag(clean) / (losses._mag(noisy) + 1e-10), 0, 1) @ dsp.erb_fb(CFG)
    assert float(losses.mask_loss(iam, clean, noisy, CFG)) < 1e-10
    fb = _tc(dsp.erb_fb(CFG)).double()
    rng = np.random.default_rng(3)
    for mask in (
        iam * 0.5,
        mx.clip(iam + 0.3, 0, 1),
        mx.array(rng.uniform(0, 1, iam.shape).astype(np.float32)),
    ):
        for gamma, under in ((0.6, 2.0), (0.3, 1.0)):
            ours = float(losses.mask_loss(mask, clean, noisy, CFG, gamma, under))
            ref = _upstream_mask_loss(
                _tc(mask).double(), _tc(clean).double(), _tc(noisy).double(), fb, gamma, under
            )
            assert ours == pytest.approx(float(ref), rel=1e-4)


# --- the dynamic loss ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["speech", "silent", "noise_only", "clipped"])
def test_all_terms_finite_with_finite_gradients(case):
    enh, clean, noisy = _cases()[case]
    lsnr = mx.zeros(enh.shape[:2])
    mask = mx.full((*enh.shape[:2], CFG.nb_erb), 0.5)

    def total(e, m, ls):
        return losses.compute(ALL, CFG, (-15.0, 35.0), (e, m, ls, None), noisy, clean, mx.array([1.0, 1.0]))

    (value, parts), grads = mx.value_and_grad(lambda *a: total(*a), argnums=(0, 1, 2))(enh, mask, lsnr)
    assert set(parts) == {
        "mrsl",
        "sisdr",
        "spec",
        "lsnr",
        "mask",
        "dyn_speech",
        "dyn_noise",
        "dyn_smooth",
        "vad",
    }
    assert np.isfinite(float(value)), parts
    for g in grads:
        assert np.isfinite(np.array(g)).all()


def test_dominance_has_no_gradient_and_follows_the_louder_source():
    _, clean, noisy = _cases()["speech"]
    noise = noisy - clean
    ref = mx.mean(losses._mag(noisy), axis=(1, 2), keepdims=True)  # as dynamic_loss sets it
    d = losses.dominance(clean, noise, ref, 4.0)
    assert float(mx.abs(mx.grad(lambda c: losses.dominance(c, noise, ref, 4.0).sum())(clean)).max()) == 0.0
    louder = np.array(losses._mag(clean) > 3 * losses._mag(noise))
    quieter = np.array(3 * losses._mag(clean) < losses._mag(noise))
    assert np.array(d)[louder].mean() > 0.9 and np.array(d)[quieter].mean() < 0.2
    sharp = np.array(losses.dominance(clean, noise, ref, 16.0))
    assert sharp[louder].mean() > np.array(d)[louder].mean()  # sharper: closer to a binary mask


def test_speech_term_zero_at_clean_and_noise_term_rewards_suppression():
    enh, clean, noisy = _cases()["speech"]
    lc, on = LossConfig(dynamic="awesome"), mx.array(0.0)
    at_clean = losses.dynamic_loss(clean, clean, noisy, CFG, lc, on)
    assert float(at_clean["dyn_speech"]) < 1e-6 and float(at_clean["dyn_smooth"]) < 1e-6
    noisy_out = losses.dynamic_loss(noisy, clean, noisy, CFG, lc, on)
    assert float(noisy_out["dyn_speech"]) > 10 * float(at_clean["dyn_speech"]) + 1e-3
    assert float(at_clean["dyn_noise"]) < float(
        losses.dynamic_loss(enh, clean, noisy, CFG, lc, on)["dyn_noise"]
    )
    assert float(losses.dynamic_loss(enh, clean, noisy, CFG, lc, on)["dyn_noise"]) < float(
        noisy_out["dyn_noise"]
    )


def test_proxy_prefers_modulated_speech_over_steady_noise_and_music():
    rng = np.random.default_rng(4)
    n = SR
    voice = _voice(n, rng)
    t = np.arange(n) / SR
    tone = (0.05 * sum(np.sin(2 * np.pi * k * 220 * t) / k for k in range(1, 6))).astype(
        np.float32
    )  # sustained note
    hiss = 0.002 * rng.standard_normal(n).astype(np.float32)
    clean = _ri(np.stack([voice, tone]))
    noise = _ri(np.stack([hiss, hiss]))
    lc = LossConfig(dynamic="awesome")
    pr = losses.presence(clean, CFG, lc)
    w = np.array(losses.speech_proxy(clean, noise, CFG, lc))
    assert w.min() >= 0 and w.max() <= lc.proxy_max
    assert w[0].mean() > 2 * w[1].mean()  # the sustained tone is gated as music
    assert np.array(pr["music"])[1].mean() < 0.5 < np.array(pr["music"])[0].mean()
    # within the voice, loud syllable frames outweigh the pauses
    db = np.array(pr["db"])[0]
    assert w[0][db >= np.percentile(db, 75)].mean() > w[0][db <= np.percentile(db, 25)].mean()
    # switched off, every frame weighs 1
    enh, c, nz = _cases()["speech"]
    off = losses.dynamic_loss(enh, c, nz, CFG, dataclasses.replace(lc, proxy=False), mx.array(0.0))
    on = losses.dynamic_loss(enh, c, nz, CFG, lc, mx.array(0.0))
    assert float(off["dyn_speech"]) != pytest.approx(float(on["dyn_speech"]), rel=1e-3)


def test_vad_regulariser_penalises_suppressed_speech_only():
    _, clean, noisy = _cases()["speech"]
    lc = LossConfig(dynamic="awesome", vad=1.0, vad_snr_db=0.0)
    noise = noisy - clean
    assert float(losses.vad_drop(clean, clean, noise, CFG, lc)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.vad_drop(clean * 0.05, clean, noise, CFG, lc)) > 0.1
    off = losses.dynamic_loss(clean * 0.05, clean, noisy, CFG, lc, mx.array(0.0))
    assert float(off["vad"]) == 0.0  # switched off by ctl on this step


def test_dynamic_terms_of_a_batch_are_the_mean_of_its_items():
    """Per-item terms, then the batch mean: N data-parallel processes (which average their losses and
    gradients) equal one process with the whole batch, and the scale does not depend on batch size."""
    enh, clean, noisy = _cases()["speech"]
    lc, on = LossConfig(dynamic="awesome", vad=1.0, vad_snr_db=0.0), mx.array(1.0)
    whole = losses.dynamic_loss(enh * 0.3, clean, noisy, CFG, lc, on)
    items = [
        losses.dynamic_loss(enh[i : i + 1] * 0.3, clean[i : i + 1], noisy[i : i + 1], CFG, lc, on)
        for i in (0, 1)
    ]
    assert float(whole["vad"]) > 1e-3
    for k, v in whole.items():
        assert float(v) == pytest.approx((float(items[0][k]) + float(items[1][k])) / 2, rel=1e-5), k


def test_schedule_helpers():
    lc = LossConfig(dynamic="awesome", dyn_weight=10.0, dyn_warmup=100, vad=1.0, vad_every=4)
    assert losses.dyn_ramp(lc, 0) == pytest.approx(0.1) and losses.dyn_ramp(lc, 49) == pytest.approx(5.0)
    assert losses.dyn_ramp(lc, 5000) == 10.0 and losses.dyn_ramp(LossConfig(), 5000) == 0.0
    assert [losses.vad_active(lc, s, 0) for s in range(5)] == [True, False, False, False, True]
    p = dataclasses.replace(lc, vad_every=0, vad_prob=0.3)
    draws = [losses.vad_active(p, s, 7) for s in range(400)]
    assert draws == [losses.vad_active(p, s, 7) for s in range(400)]  # a function of (seed, step)
    assert 0.2 < np.mean(draws) < 0.4
    # its own stream: before, the coin of step s was the first draw of sample 7 of epoch s (its offset)
    sample7 = [np.random.default_rng([7, s, 7]).random() < 0.3 for s in range(400)]  # Mixer.sample's stream
    assert np.mean(np.array(draws) == np.array(sample7)) < 0.8


def test_compute_weighs_signs_and_sums_its_terms():
    """Each term of the loss that is optimised falls as the estimate nears the clean speech (a flipped sign
    or a lost weight would reward distortion), the total is their sum, and the dynamic terms follow the
    ramp ``ctl[0]`` (the VAD term its switch ``ctl[1]``)."""
    _, clean, noisy = _cases()["speech"]
    lsnr, mask = mx.zeros(clean.shape[:2]), mx.full((*clean.shape[:2], CFG.nb_erb), 0.5)

    def parts(alpha: float, ctl=(1.0, 1.0)) -> tuple[float, dict[str, float]]:
        enh = clean + alpha * (noisy - clean)  # alpha 0: clean, 1: the noisy input
        total, p = losses.compute(
            ALL, CFG, (-15.0, 35.0), (enh, mask, lsnr, None), noisy, clean, mx.array(ctl)
        )
        return float(total), {k: float(v) for k, v in p.items()}

    total, near = parts(0.1)
    _, far = parts(0.7)
    assert total == pytest.approx(sum(near.values()), rel=1e-5)
    for k in ("mrsl", "sisdr", "spec", "dyn_speech", "dyn_noise"):  # the terms on the estimate
        assert near[k] < far[k], (k, near[k], far[k])
    y, s = losses.waveform(clean + 0.1 * (noisy - clean), CFG), losses.waveform(clean, CFG)
    assert near["sisdr"] == pytest.approx(-ALL.sisdr * float(mx.mean(losses.si_sdr(y, s))), rel=1e-5)
    _, half = parts(0.1, ctl=(0.5, 0.0))
    for k in ("dyn_speech", "dyn_noise", "dyn_smooth"):
        assert half[k] == pytest.approx(0.5 * near[k], rel=1e-5)
    assert half["vad"] == 0.0 and near["vad"] != 0.0
