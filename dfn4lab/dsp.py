"""libDF's DSP in MLX: STFT/ISTFT, ERB filterbank, and the normalised network input features.

Every function reproduces ``libdf`` (deepfilterlib) numerically, which the tests check:

- Analysis: a Vorbis window over ``fft_size`` samples every ``hop_size`` samples, scaled by
  ``wnorm = hop / (fft * sum(window**2))`` (1/960 at 48 kHz/960/480). A fresh stream starts with
  ``fft - hop`` zeros of memory, so ``samples // hop`` frames come out and a trailing partial hop is
  dropped. Synthesis is an unnormalised inverse FFT, the window again, and overlap-add;
  ``istft(stft(x))`` is ``x`` delayed by ``fft - hop`` samples.
- ERB feature: ``10*log10(mean band power + 1e-10)``, minus an exponential mean (state starts at a
  linear ramp from -60 to -90 dB over the bands), divided by 40.
- DF feature: the complex spectrum of the lowest ``nb_df`` bins divided by the square root of an
  exponential mean of ``|X|`` (state starts at a linear ramp from 0.001 to 0.0001).

Both exponential means use ``alpha = cfg.alpha``. Complex spectra are ``complex64`` MLX arrays:
MLX differentiates ``fft.rfft``/``irfft``, complex products and ``abs`` (checked against torch), so
training can go through these functions directly.

Two forms with the same numbers: batched functions over ``(batch, time, ...)`` for training and
offline use, and ``DfStream`` (one hop in, one frame out) for streaming. Leading dimensions other
than the last one or two are treated as batch dimensions throughout.
"""

from __future__ import annotations

import functools
import math

from dfn4lab.config import DspConfig

import mlx.core as mx
import numpy as np

ERB_NORM_INIT = (-60.0, -90.0)  # dB, first and last band
DF_NORM_INIT = (0.001, 0.0001)  # |X|, first and last bin
_EMA_CHUNK = 64  # frames per chunk of the closed-form exponential mean


# --- Window and filterbank -------------------------------------------------------------------


@functools.cache
def _window_np(fft_size: int, hop_size: int) -> tuple[np.ndarray, np.float32]:
    if not 0 < 2 * hop_size <= fft_size:
        raise ValueError(f"need 0 < 2*hop_size <= fft_size (as libDF), got hop {hop_size}, fft {fft_size}")
    n = np.arange(fft_size, dtype=np.float64)
    window = np.sin(0.5 * np.pi * np.sin(0.5 * np.pi * (n + 0.5) / (fft_size // 2)) ** 2).astype(np.float32)
    wnorm = np.float32(1.0) / np.sum(window * window, dtype=np.float32) * np.float32(hop_size / fft_size)
    return window, np.float32(wnorm)


def window(cfg: DspConfig) -> np.ndarray:
    """The Vorbis window ``(fft_size,)``, float32 (libDF's ``DF.fft_window()``)."""
    return _window_np(cfg.fft_size, cfg.hop_size)[0].copy()


def wnorm(cfg: DspConfig) -> float:
    """Analysis scale ``hop / (fft * sum(window**2))``; synthesis is unscaled."""
    return float(_window_np(cfg.fft_size, cfg.hop_size)[1])


@functools.cache
def _analysis_window(cfg: DspConfig) -> mx.array:
    return mx.array(_window_np(cfg.fft_size, cfg.hop_size)[0])


@functools.cache
def _synthesis_window(cfg: DspConfig) -> mx.array:
    # MLX's irfft divides by n; libDF's (realfft) does not, so fold n into the window.
    w, _ = _window_np(cfg.fft_size, cfg.hop_size)
    return mx.array(w * np.float32(cfg.fft_size))


def _freq2erb(f: np.float32) -> np.float32:
    return np.float32(9.265) * np.log1p(f / np.float32(24.7 * 9.265))


def _erb2freq(e: np.float32) -> np.float32:
    return np.float32(24.7 * 9.265) * (np.exp(e / np.float32(9.265)) - np.float32(1.0))


@functools.cache
def _erb_widths(sr: int, fft_size: int, nb_erb: int, min_nb_freqs: int) -> tuple[int, ...]:
    # libDF's erb_fb, in float32 like the Rust original so band edges round identically.
    freq_width = np.float32(sr) / np.float32(fft_size)
    erb_low, erb_high = _freq2erb(np.float32(0.0)), _freq2erb(np.float32(sr // 2))
    step = (erb_high - erb_low) / np.float32(nb_erb)
    widths, prev, over = [], 0, 0
    for i in range(1, nb_erb + 1):
        f = _erb2freq(erb_low + np.float32(i) * step)
        fb = int(math.floor(float(f / freq_width) + 0.5))  # Rust's round(): half away from zero
        nb = fb - prev - over
        over, nb = (min_nb_freqs - nb, min_nb_freqs) if nb < min_nb_freqs else (0, nb)
        widths.append(nb)
        prev = fb
    widths[-1] += 1  # fft/2 + 1 bins
    widths[-1] -= sum(widths) - (fft_size // 2 + 1)
    if widths[-1] < 1:
        raise ValueError(f"{nb_erb} ERB bands with >= {min_nb_freqs} bins do not fit in {fft_size // 2 + 1}")
    return tuple(widths)


def erb_widths(cfg: DspConfig) -> np.ndarray:
    """Number of frequency bins per ERB band ``(nb_erb,)``, equal to libDF's ``DF.erb_widths()``."""
    return np.array(_erb_widths(cfg.sr, cfg.fft_size, cfg.nb_erb, cfg.min_nb_erb_freqs), dtype=np.int64)


@functools.cache
def _erb_fb(cfg: DspConfig, inverse: bool) -> mx.array:
    widths = erb_widths(cfg)
    fb = np.zeros((cfg.freq_bins, cfg.nb_erb), dtype=np.float32)
    for band, (start, w) in enumerate(zip(np.cumsum(widths) - widths, widths, strict=True)):
        fb[start : start + w, band] = 1.0 if inverse else 1.0 / w
    return mx.array(fb.T.copy() if inverse else fb)


def erb_fb(cfg: DspConfig, inverse: bool = False) -> mx.array:
    """ERB filterbank as upstream ``modules.erb_fb``.

    Forward ``(freq, nb_erb)``: columns average the bins of a band (``x @ fb`` is the band mean).
    Inverse ``(nb_erb, freq)``: 0/1 rows that copy each band's value to its bins (``g @ fb_inv``).
    """
    return _erb_fb(cfg, inverse)


# --- STFT ------------------------------------------------------------------------------------


def _frames(x: mx.array, cfg: DspConfig, pad: int) -> mx.array:
    """``(B, pad + T*hop)`` -> overlapping frames ``(B, T, fft)`` starting every hop."""
    hop, n = cfg.hop_size, cfg.fft_size
    k = -(-n // hop)  # hops spanned by one frame
    t = (x.shape[-1] - pad) // hop
    x = mx.pad(x, [(0, 0), (0, (t + k - 1) * hop - x.shape[-1])])
    blocks = x.reshape(x.shape[0], t + k - 1, hop)
    # Frame t is blocks t..t+k-1 back to back: k shifted views, no gather.
    return mx.concatenate([blocks[:, j : j + t] for j in range(k)], axis=-1)[..., :n]


def stft(x: mx.array, cfg: DspConfig) -> mx.array:
    """``(..., samples)`` float -> ``(..., time, freq)`` complex64 with ``time = samples // hop``.

    Equals libDF's ``DF.analysis`` on a fresh state for the same samples.
    """
    lead, n = x.shape[:-1], x.shape[-1]
    pad = cfg.fft_size - cfg.hop_size
    t = n // cfg.hop_size
    x = x.astype(mx.float32).reshape(math.prod(lead), n)[:, : t * cfg.hop_size]
    x = mx.pad(x, [(0, 0), (pad, 0)])  # the zero analysis memory of a fresh stream
    frames = _frames(x, cfg, pad) * _analysis_window(cfg)
    spec = mx.fft.rfft(frames, axis=-1) * wnorm(cfg)
    return spec.reshape(*lead, t, cfg.freq_bins)


def istft(spec: mx.array, cfg: DspConfig) -> mx.array:
    """``(..., time, freq)`` complex -> ``(..., time*hop)`` float32: libDF's ``DF.synthesis``, fresh state.

    The output holds the first ``time*hop`` samples of the overlap-add, as libDF does; after
    ``stft`` it is the input delayed by ``fft_size - hop_size`` samples.
    """
    lead, t = spec.shape[:-2], spec.shape[-2]
    hop, n = cfg.hop_size, cfg.fft_size
    k = -(-n // hop)
    b = math.prod(lead)
    frames = mx.fft.irfft(spec.reshape(b, t, cfg.freq_bins), n=n, axis=-1) * _synthesis_window(cfg)
    frames = mx.pad(frames, [(0, 0), (0, 0), (0, k * hop - n)]).reshape(b, t, k, hop)
    # Overlap-add: hop-block j of frame t lands in output block t + j.
    out = sum(mx.pad(frames[:, :, j], [(0, 0), (j, k - 1 - j), (0, 0)]) for j in range(k))
    return out[:, :t].reshape(*lead, t * hop)


def analysis_step(x: mx.array, mem: mx.array, cfg: DspConfig) -> tuple[mx.array, mx.array]:
    """One hop ``(batch, hop)`` and memory ``(batch, fft - hop)`` -> frame ``(batch, freq)``, new memory."""
    buf = mx.concatenate([mem, x.astype(mx.float32)], axis=-1)
    spec = mx.fft.rfft(buf * _analysis_window(cfg), axis=-1) * wnorm(cfg)
    return spec, buf[:, cfg.hop_size :]


def synthesis_step(spec: mx.array, mem: mx.array, cfg: DspConfig) -> tuple[mx.array, mx.array]:
    """One frame ``(batch, freq)``, overlap memory ``(batch, fft - hop)`` -> hop ``(batch, hop)``, memory."""
    hop = cfg.hop_size
    x = mx.fft.irfft(spec, n=cfg.fft_size, axis=-1) * _synthesis_window(cfg)
    out = x[:, :hop] + mem[:, :hop]
    mem = mx.pad(mem[:, hop:], [(0, 0), (0, hop)]) + x[:, hop:]
    return out, mem


# --- Exponential mean ------------------------------------------------------------------------


@functools.cache
def _decay(a: float, n: int) -> tuple[mx.array, mx.array]:
    """Lower-triangular ``D[t, k] = a**(t-k)`` ``(n, n)`` and powers ``a**(t+1)`` ``(n, 1)``."""
    t = np.arange(n)
    diff = t[:, None] - t[None, :]
    d = np.where(diff >= 0, np.float64(a) ** np.maximum(diff, 0), 0.0)
    return mx.array(d.astype(np.float32)), mx.array((np.float64(a) ** (t + 1.0))[:, None].astype(np.float32))


def _linear_scan(u: mx.array, a: float, y0: mx.array) -> mx.array:
    """``y_t = a*y_{t-1} + u_t`` over axis 1 of ``(B, T, F)`` from ``y_{-1} = y0`` ``(B, F)``.

    Closed form per chunk (a decay-matrix product); the chunk-end states follow the same
    recursion with decay ``a**L``, solved recursively. All powers are <= 1, so float32 is safe.
    """
    b, t, f = u.shape
    if t <= _EMA_CHUNK:
        d, p = _decay(a, t)
        return d @ u + p * y0[:, None, :]
    n = _EMA_CHUNK
    nc = -(-t // n)
    u = mx.pad(u, [(0, 0), (0, nc * n - t), (0, 0)]).reshape(b, nc, n, f)
    d, p = _decay(a, n)
    local = d @ u  # each chunk from a zero state
    ends = _linear_scan(local[:, :, -1], a**n, y0)  # true state at each chunk end
    prev = mx.concatenate([y0[:, None], ends[:, :-1]], axis=1)
    y = local + p * prev[:, :, None, :]
    return y.reshape(b, nc * n, f)[:, :t]


def exp_mean(x: mx.array, alpha: float, state: mx.array) -> mx.array:
    """Exponential mean ``s_t = alpha*s_{t-1} + (1-alpha)*x_t`` over time of ``(B, T, F)``; ``state (B, F)``.

    Returns all ``s_t`` ``(B, T, F)``; ``s[:, -1]`` continues the stream.
    """
    a = float(np.float32(alpha))
    u = x * float(np.float32(1.0) - np.float32(a))
    if x.shape[1] == 1:  # streaming: the plain recursion, bit-exact with libDF's per-frame update
        return (u[:, 0] + a * state)[:, None]
    return _linear_scan(u, a, state)


# --- Features --------------------------------------------------------------------------------


def _ramp(lo: float, hi: float, n: int) -> np.ndarray:
    # libDF's float32 ramp: lo + i * step
    step = (np.float32(hi) - np.float32(lo)) / np.float32(n - 1)
    return (np.float32(lo) + np.arange(n, dtype=np.float32) * step).astype(np.float32)


def erb_norm_init(cfg: DspConfig) -> mx.array:
    """Initial ERB normalisation state ``(nb_erb,)``: -60 .. -90 dB."""
    return mx.array(_ramp(*ERB_NORM_INIT, cfg.nb_erb))


def df_norm_init(cfg: DspConfig) -> mx.array:
    """Initial DF normalisation state ``(nb_df,)``: 0.001 .. 0.0001 (libDF's ``unit_norm_init``)."""
    return mx.array(_ramp(*DF_NORM_INIT, cfg.nb_df))


def _batched(x: mx.array, state: mx.array | None, init: mx.array) -> tuple[mx.array, mx.array]:
    """``(..., T, F)`` -> ``(B, T, F)`` and the state broadcast to ``(B, F)``."""
    x = x.reshape(math.prod(x.shape[:-2]), *x.shape[-2:])
    s = init if state is None else state.astype(mx.float32)
    return x, mx.broadcast_to(s.reshape(-1, s.shape[-1]), (x.shape[0], x.shape[-1]))


def erb_energy(spec: mx.array, cfg: DspConfig) -> mx.array:
    """Mean power per ERB band: ``(..., time, freq)`` complex -> ``(..., time, nb_erb)``."""
    power = mx.real(spec) ** 2 + mx.imag(spec) ** 2
    return power @ erb_fb(cfg)


def erb_feature(
    spec: mx.array, cfg: DspConfig, state: mx.array | None = None, *, return_state: bool = False
) -> mx.array | tuple[mx.array, mx.array]:
    """Normalised log ERB energies ``(..., time, nb_erb)`` from ``(..., time, freq)`` complex.

    ``state`` ``(..., nb_erb)`` (default ``erb_norm_init``) continues a stream; with ``return_state``
    the state after the last frame is returned too: ``(feat, state)``.
    """
    db = 10.0 * mx.log10(erb_energy(spec, cfg) + 1e-10)
    x, s0 = _batched(db, state, erb_norm_init(cfg))
    mean = exp_mean(x, cfg.alpha, s0)
    feat = ((x - mean) / 40.0).reshape(db.shape)
    return (feat, mean[:, -1].reshape(*db.shape[:-2], cfg.nb_erb)) if return_state else feat


def df_feature(
    spec: mx.array, cfg: DspConfig, state: mx.array | None = None, *, return_state: bool = False
) -> mx.array | tuple[mx.array, mx.array]:
    """Unit-normalised complex spectrum of the lowest ``nb_df`` bins ``(..., time, nb_df)`` complex64.

    ``state`` ``(..., nb_df)`` (default ``df_norm_init``) continues a stream; with ``return_state``
    the state after the last frame is returned too: ``(feat, state)``.
    """
    low = spec[..., : cfg.nb_df]
    x, s0 = _batched(low, state, df_norm_init(cfg))
    mean = exp_mean(mx.abs(x), cfg.alpha, s0)
    feat = (x / mx.sqrt(mean)).reshape(low.shape)
    return (feat, mean[:, -1].reshape(*low.shape[:-2], cfg.nb_df)) if return_state else feat


def features(spec: mx.array, cfg: DspConfig) -> tuple[mx.array, mx.array]:
    """``(feat_erb (..., time, nb_erb), feat_spec (..., time, nb_df) complex64)`` from fresh states."""
    return erb_feature(spec, cfg), df_feature(spec, cfg)


# --- Streaming -------------------------------------------------------------------------------


class DfStream:
    """Frame-by-frame DSP with libDF's ``DFState`` semantics and the batched functions' numbers.

    Holds the analysis and synthesis memories and both feature-normalisation states for ``batch``
    independent streams.
    """

    def __init__(self, cfg: DspConfig, batch: int = 1):
        self.cfg = cfg
        self.batch = batch
        self.reset()

    def reset(self) -> None:
        mem = self.cfg.fft_size - self.cfg.hop_size
        self.analysis_mem = mx.zeros((self.batch, mem))
        self.synthesis_mem = mx.zeros((self.batch, mem))
        self.erb_state = mx.broadcast_to(erb_norm_init(self.cfg), (self.batch, self.cfg.nb_erb))
        self.df_state = mx.broadcast_to(df_norm_init(self.cfg), (self.batch, self.cfg.nb_df))

    def analysis(self, x: mx.array) -> mx.array:
        """One hop ``(batch, hop)`` -> one frame ``(batch, freq)`` complex64."""
        spec, self.analysis_mem = analysis_step(x, self.analysis_mem, self.cfg)
        return spec

    def synthesis(self, spec: mx.array) -> mx.array:
        """One frame ``(batch, freq)`` -> one hop ``(batch, hop)`` float32."""
        out, self.synthesis_mem = synthesis_step(spec, self.synthesis_mem, self.cfg)
        return out

    def features(self, spec: mx.array) -> tuple[mx.array, mx.array]:
        """One frame ``(batch, freq)`` -> ``(feat_erb (batch, nb_erb), feat_spec (batch, nb_df))``."""
        erb, self.erb_state = erb_feature(spec[:, None], self.cfg, self.erb_state, return_state=True)
        dfs, self.df_state = df_feature(spec[:, None], self.cfg, self.df_state, return_state=True)
        return erb[:, 0], dfs[:, 0]
