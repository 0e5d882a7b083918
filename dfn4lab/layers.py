"""Building blocks of DfNet: causal convs, the deep filter, the post-filter, DFN4's hybrid encoder.

Feature maps are channels-last ``(batch, time, freq, channels)``; spectra ``(batch, time, freq, 2)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from dfn4lab import kernels
from dfn4lab.activations import sigmoid

import mlx.core as mx
import mlx.nn as nn


def _act(name: str | None, x: mx.array) -> mx.array:
    if name == "relu":
        return nn.relu(x)
    if name == "sigmoid":
        return sigmoid(x)
    return x


def _bias_act(x: mx.array, bias: mx.array, act: str | None) -> mx.array:
    """``act(x + bias)`` on ``(..., channels)``: eval mode's BatchNorm folded into the conv. On the CPU
    one pass of :mod:`dfn4lab.kernels` on every core (MLX: two passes on one; DFN3's forward at batch
    8 x 500 frames 331 -> 319 ms)."""
    if not kernels.usable(x, bias, min_size=kernels.SMALL):
        return _act(act, x + bias)
    return _bias_act_fn(act)(x.reshape(-1, x.shape[-1]), bias).reshape(x.shape)


@functools.cache
def _bias_act_fn(act: str | None):
    @mx.custom_function
    def bias_act(x: mx.array, bias: mx.array) -> mx.array:
        return kernels.bias_act(x, bias, act)

    @bias_act.vjp
    def bias_act_vjp(_, dy: mx.array, y: mx.array) -> tuple[mx.array, mx.array]:
        g = dy * {None: 1.0, "relu": y > 0, "sigmoid": y * (1 - y)}[act]
        return g, g.sum(axis=0)

    return bias_act


class BatchNorm(nn.BatchNorm):
    """``nn.BatchNorm`` (same parameters, statistics and results) that stays fast under ``mx.compile``.

    MLX's compiler fuses element-wise ops on a small broadcast operand into the big kernel, so
    ``(x - mean) * rsqrt(var + eps)`` evaluates ``rsqrt`` once per element of ``x`` instead of once
    per channel. A reshape is not fusable: the per-channel scale is computed once, then broadcast.
    DFN3's conv0p block in training at batch 8 x 500 frames, compiled: 115 ms, 8 ms with this.
    """

    def __call__(self, x: mx.array) -> mx.array:
        """``(..., channels)`` -> same shape."""
        if self.training and x.size == x.shape[-1]:  # one value per channel: 0/0 running variance
            raise ValueError("BatchNorm training requires more than one value per channel")
        if self.training or not self.track_running_stats:
            mean, var = self._calc_stats(x)
            if self.training and self.track_running_stats:
                mu = self.momentum
                _, running_var = self._calc_stats(x, ddof=1)
                self.running_mean = (1 - mu) * self.running_mean + mu * mean
                self.running_var = (1 - mu) * self.running_var + mu * running_var
        else:
            mean, var = self.running_mean, self.running_var
        scale = mx.rsqrt(var + self.eps)
        if "weight" in self:
            scale = scale * self.weight
        x = (x - mean) * scale.reshape(1, -1)
        return x + self.bias if "weight" in self else x

    def activated(self, x: mx.array, act: str | None) -> mx.array:
        """``act(self(x))`` on ``(..., channels)``. In training on the CPU (float32, affine, running
        statistics) :mod:`dfn4lab.kernels` runs it as one fused primitive each way: MLX runs the ops
        of a batch norm and its backward one pass each on one core. BatchNorm + ReLU after DFN3's
        df_conv0 (batch 8 x 500 frames x 96 bins x 64 channels), forward+backward: 98 -> 33 ms; and
        float64 sums (MLX's float32 ones were off by 5e-5 relative there)."""
        c = x.shape[-1]
        affine = "weight" in self
        if not (
            self.training
            and self.track_running_stats
            and affine
            and kernels.usable(x, self.weight, self.bias)
        ):
            return _act(act, self(x))
        if x.size == c:
            raise ValueError("BatchNorm training requires more than one value per channel")
        y, mean, var = _fused_batch_norm(self.eps, act)(x.reshape(-1, c), self.weight, self.bias)
        n, mu = x.size // c, self.momentum
        mean, var = mx.stop_gradient(mean), mx.stop_gradient(var) * (n / (n - 1))  # unbiased, as above
        self.running_mean = (1 - mu) * self.running_mean + mu * mean
        self.running_var = (1 - mu) * self.running_var + mu * var
        return y.reshape(x.shape)


@functools.cache
def _fused_batch_norm(eps: float, act: str | None):
    """:mod:`dfn4lab.kernels`' training-mode batch norm + ``act`` as a differentiable function of
    ``(x (N, C), weight, bias)`` returning ``(y, mean, biased var)``; the statistics carry no gradient."""

    @mx.custom_function
    def fused(x: mx.array, weight: mx.array, bias: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        return kernels.batch_norm_forward(x, weight, bias, eps, act)

    @fused.vjp
    def fused_vjp(primals: tuple, cotangents: tuple, outputs: tuple) -> tuple[mx.array, ...]:
        x, weight, _ = primals
        y, mean, var = outputs
        return kernels.batch_norm_backward(x, weight, mean, var, y, cotangents[0], eps, act)

    return fused


@mx.compile
def _tap_sum(
    x: mx.array, taps: tuple[mx.array, ...], starts: tuple[tuple[int, int], ...], t: int, n: int, s: int
) -> mx.array:
    """Sum over taps of ``x[:, i : i + t, j : j + (n - 1) * s + 1 : s] * tap`` for each tap's start
    (i, j): a depthwise conv (or one phase of a transposed one) on ``x`` (batch, time, freq, ch) with
    taps (ch,) -> (batch, t, n, ch). Compiled: one fused pass over strided views, no temporaries
    (DFN3's df_conv1 at batch 8 x 500 frames: 24 -> 8 ms)."""
    y = None
    for (i, j), w in zip(starts, taps, strict=True):
        term = x[:, i : i + t, j : j + (n - 1) * s + 1 : s, :] * w
        y = term if y is None else y + term
    return y


@functools.lru_cache(maxsize=64)
def _depthwise_fn(stride: int, pad: int, size: int, transposed: bool):
    """:mod:`dfn4lab.kernels`' depthwise conv over frequency (or its transpose, ``size`` output
    positions) as a differentiable function of ``(x (rows, freq, ch), taps (K, ch))``; each is the
    other's input gradient. In MLX ops the backward of the strided tap sum scatters each tap into a
    zero copy of the input: DFN3's df_conv1 conv (stride 2) at batch 8 x 500 frames, padding
    included, forward 22 -> 4 ms, forward+backward 118 -> 14 ms."""

    def conv(x: mx.array, w: mx.array, n: int, flip: bool) -> mx.array:
        if flip:
            return kernels.depthwise_scatter(x, w, stride, pad, n)
        return kernels.depthwise_correlate(x, w, stride, pad, n)

    @mx.custom_function
    def depthwise(x: mx.array, w: mx.array) -> mx.array:
        return conv(x, w, size, transposed)

    @depthwise.vjp
    def depthwise_vjp(primals: tuple, dy: mx.array, _) -> tuple[mx.array, mx.array]:
        x, w = primals
        wide, narrow = (dy, x) if transposed else (x, dy)  # the correlation's input and output
        dw = kernels.depthwise_tap_grad(wide, narrow, w.shape[0], stride, pad)
        return conv(dy, w, x.shape[1], not transposed), dw

    return depthwise


@functools.cache
def _time_taps_fn(taps: int):
    """:func:`dfn4lab.kernels.time_taps` as a differentiable function of ``z``."""

    @mx.custom_function
    def time_taps(z: mx.array) -> mx.array:
        return kernels.time_taps(z, taps)

    @time_taps.vjp
    def time_taps_vjp(_, dy: mx.array, __) -> mx.array:
        return kernels.time_taps_grad(dy, taps)

    return time_taps


@dataclass(frozen=True, eq=False)
class EvalConstants:
    """Inference constants a module derives from its parameters once, in ``eval()``.

    Valid while ``sources`` are still the module's current arrays: loading weights or an optimizer
    step replaces them, and the module then derives from the new ones on every call (correct, not
    fast) until ``eval()`` is called again. Arrays are replaced, never edited in place, in MLX's
    APIs; an in-place edit (``w[...] = v``) is not seen: call ``eval()`` after one.
    The modules hook MLX's ``Module._set_training_mode`` (private; MLX 0.32) to build them.
    """

    sources: tuple[mx.array, ...]
    value: Any

    @classmethod
    def of(cls, sources: tuple[mx.array, ...], value: Any) -> EvalConstants:
        mx.eval(value)
        return cls(sources, value)

    def valid_for(self, sources: tuple[mx.array, ...]) -> bool:
        if len(sources) != len(self.sources):
            return False
        return all(a is b for a, b in zip(sources, self.sources, strict=True))


class ConvBlock(nn.Module):
    """Upstream ``Conv2dNormAct``/``ConvTranspose2dNormAct``: causal in time, centred in frequency.

    conv (grouped, kernel ``(kt, kf)``, frequency stride) -> optional 1x1 pointwise (the
    "separable" case) -> BatchNorm -> activation. Weights keep PyTorch's layout
    ``(out, in/groups, kt, kf)`` (transposed: ``(in, out/groups, 1, kf)``).
    Input and output ``(batch, time, freq, channels)``; the state is the last ``kt-1`` input frames.

    In eval mode the block runs on constants computed once by ``eval()``: BatchNorm folded into the
    last linear map, the conv's taps or block-diagonal weight laid out for MLX. Streaming runs a
    few hundred tiny ops per hop, so the ops that only rearrange weights were a large share of them.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: tuple[int, int] | int,
        fstride: int = 1,
        separable: bool = True,
        transposed: bool = False,
        act: str | None = "relu",
    ):
        super().__init__()
        kt, kf = (kernel, kernel) if isinstance(kernel, int) else kernel
        groups = math.gcd(in_ch, out_ch) if separable else 1
        # Upstream keeps the groups of a 1x1 "separable" conv but drops its pointwise conv.
        self.has_pointwise = groups > 1 and max(kt, kf) > 1
        self.kt, self.kf, self.fstride, self.groups = kt, kf, fstride, groups
        self.in_ch, self.out_ch, self.transposed, self.act = in_ch, out_ch, transposed, act
        self.depthwise = groups == in_ch == out_ch
        if transposed:
            assert kt == 1 and self.depthwise, "transposed convs are depthwise, frequency-only"
            self.weight = mx.zeros((in_ch, out_ch // groups, kt, kf))
        else:
            self.weight = mx.zeros((out_ch, in_ch // groups, kt, kf))
        if self.has_pointwise:
            self.pointwise = mx.zeros((out_ch, out_ch, 1, 1))
        self.bn = BatchNorm(out_ch)
        self._folded: EvalConstants | None = None
        self._init()

    def _init(self) -> None:
        fan_in = self.weight.shape[1] * self.kt * self.kf
        bound = 1 / math.sqrt(fan_in)
        self.weight = mx.random.uniform(-bound, bound, self.weight.shape)
        if self.has_pointwise:
            b = 1 / math.sqrt(self.out_ch)
            self.pointwise = mx.random.uniform(-b, b, self.pointwise.shape)

    # --- weights as the conv uses them ---------------------------------------------------------

    def _conv_weight(self) -> mx.array | list[mx.array]:
        """Depthwise: the taps, (channels,) each, time-major; else the dense weight (with the pointwise
        conv merged in) as ``_conv`` uses it."""
        if self.depthwise:
            return [self.weight[:, 0, i, j] for i in range(self.kt) for j in range(self.kf)]
        return self._layout(self._dense_weight())

    def _one_axis(self) -> bool:
        """A dense kernel along time only, (kt, 1) unstrided, or frequency only, (1, kf)."""
        time_only = self.kf == 1 and self.kt > 1 and self.fstride == 1
        return not self.depthwise and (time_only or (self.kt == 1 and self.kf > 1))

    def _layout(self, dense: mx.array) -> mx.array:
        """Dense (out, kt, kf, in) -> the weight ``_conv`` uses: for a one-axis kernel all taps side by
        side, (in, taps * out), run as one matmul; else unchanged (``mx.conv2d``'s layout)."""
        if self._one_axis():
            return dense.reshape(self.out_ch, -1, self.in_ch).transpose(2, 1, 0).reshape(self.in_ch, -1)
        return dense

    def _dense_weight(self) -> mx.array:
        """MLX layout (out, kt, kf, in) with zeros outside each group's block, and the pointwise conv
        merged in: a conv, then a 1x1 conv, is one conv with the same output channels. In training
        too, as eval: DFN3's df_conv0 (2 -> 64 channels, then 64 x 64 pointwise) at batch 8 x 500, the
        block's training forward+backward 167 -> 76 ms; in eval 91 -> 41 ms."""
        g, cin_g, cout_g = self.groups, self.in_ch // self.groups, self.out_ch // self.groups
        w = self.weight.transpose(0, 2, 3, 1)  # (out, kt, kf, in/g)
        if g > 1:
            rows = []
            for k in range(g):
                blk = w[k * cout_g : (k + 1) * cout_g]
                left = mx.zeros((cout_g, self.kt, self.kf, k * cin_g), w.dtype)
                right = mx.zeros((cout_g, self.kt, self.kf, (g - k - 1) * cin_g), w.dtype)
                rows.append(mx.concatenate([left, blk, right], axis=-1))
            w = mx.concatenate(rows, axis=0)
        if self.has_pointwise:
            w = (self.pointwise[:, :, 0, 0] @ w.reshape(self.out_ch, -1)).reshape(w.shape)
        return w

    def _sources(self) -> tuple[mx.array, ...]:
        bn = self.bn
        pw = (self.pointwise,) if self.has_pointwise else ()
        return (self.weight, *pw, bn.weight, bn.bias, bn.running_mean, bn.running_var)

    def _set_training_mode(self, mode: bool) -> None:
        super()._set_training_mode(mode)
        self._folded = None if mode else self._fold()

    def folded(self) -> tuple[mx.array | list[mx.array], mx.array | None, mx.array]:
        """The eval-mode (conv, pointwise, bias): BatchNorm's scale goes into the last linear map.
        Depthwise: the taps, then the pointwise conv as ``(in, out)`` (or None). Dense: one weight
        ``(out, kt, kf, in)`` with the pointwise conv merged in (``_dense_weight``) and None."""
        bn = self.bn
        scale = bn.weight * mx.rsqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale
        if self.depthwise:  # the pointwise conv stays apart: merged, it would multiply the work
            pw = self.pointwise[:, :, 0, 0].T * scale if self.has_pointwise else None
            conv = self._conv_weight()
            return (conv if pw is not None else [w * scale for w in conv]), pw, bias
        return self._dense_weight() * scale[:, None, None, None], None, bias

    def _fold(self) -> EvalConstants:
        conv, pw, bias = self.folded()
        conv = conv if self.depthwise else self._layout(conv)
        return EvalConstants.of(self._sources(), (conv, pw, bias))

    def _current_fold(self) -> tuple[Any, mx.array | None, mx.array] | None:
        """The folded constants when in eval mode and still made from the current arrays."""
        f = self._folded
        if self.training or self.bn.training or f is None or not f.valid_for(self._sources()):
            return None
        return f.value

    # --- the conv ------------------------------------------------------------------------------

    def _taps(self, x: mx.array, hist: mx.array | None) -> tuple[mx.array, mx.array]:
        """Causal time padding from history, centred frequency padding. Returns (padded, new hist)."""
        b, t, f, c = x.shape
        if self.kt > 1:
            if hist is None:
                hist = mx.zeros((b, self.kt - 1, f, c), dtype=x.dtype)
            x = mx.concatenate([hist, x], axis=1)
            hist = x[:, -(self.kt - 1) :]
        fp = self.kf // 2
        if fp:
            x = mx.pad(x, [(0, 0), (0, 0), (fp, fp), (0, 0)])
        return x, hist

    def _conv(self, x: mx.array, t: int, f_out: int, w: mx.array | list[mx.array]) -> mx.array:
        """Grouped conv over padded ``x`` (batch, t + kt - 1, padded freq, in) -> (batch, t, f_out, out)."""
        s = self.fstride
        if self.depthwise:  # a few element-wise taps (strided slices) beat a grouped conv2d here
            starts = tuple(divmod(n, self.kf) for n in range(len(w)))
            return _tap_sum(x, tuple(w), starts, t, f_out, s)
        if w.ndim == 2:  # one-axis kernel (``_layout``)
            # One matmul for every tap, then the (smaller) outputs shifted and summed: slicing the input
            # per tap costs a strided copy of it. DFN3's df_convp, (5, 1), at batch 8 x 500 frames: 316
            # vs 50 ms against mx.conv2d (0.22 vs 0.10 ms per streaming hop); conv0_out, (1, 3) to one
            # channel: 89 vs 22 ms.
            o, z = self.out_ch, x @ w
            y = None
            for i in range(max(self.kt, self.kf)):
                if self.kt > 1:
                    term = z[:, i : i + t, :, i * o : (i + 1) * o]
                else:
                    term = z[:, :, i : i + (f_out - 1) * s + 1 : s, i * o : (i + 1) * o]
                y = term if y is None else y + term
            return y
        # Few groups: one dense conv2d with a block-diagonal weight (measured far faster than groups=g).
        return mx.conv2d(x, w, stride=(1, s))

    def _conv_transposed(self, x: mx.array, w: list[mx.array]) -> mx.array:
        """Depthwise transposed conv over frequency with stride s, by output phase (polyphase).

        With u the input zero-inserted s-fold, ``out[o] = sum_k w[k] * u[o + p - k]``; for
        ``o = s*q + r`` only the taps with ``(r + p - k) % s == 0`` meet a nonzero, and read
        ``x[q + (r + p - k) // s]``. So each phase is a few taps on x itself and the phases are
        interleaved: less work and fewer copies than zero-inserting first (measured 80 -> 19 ms at batch
        8 x 500 frames for DFN3's convt1).
        """
        b, t, f, c = x.shape
        s, kf = self.fstride, self.kf
        p = kf // 2  # upstream: padding kf//2, output_padding kf//2 (for stride > 1)
        f_out = (f - 1) * s - 2 * p + kf + (p if s > 1 else 0)
        n = -(-f_out // s)  # outputs per phase
        taps = [[(k, (r + p - k) // s) for k in range(kf) if (r + p - k) % s == 0] for r in range(s)]
        assert all(taps), "every output phase needs a tap (kernel >= stride)"
        shifts = [d for phase in taps for _, d in phase]
        lo, hi = max(0, -min(shifts)), max(0, n - f + max(shifts))
        xp = mx.pad(x, [(0, 0), (0, 0), (lo, hi), (0, 0)]) if lo or hi else x
        phases = [
            _tap_sum(xp, tuple(w[k] for k, _ in phase), tuple((0, lo + d) for _, d in phase), t, n, 1)
            for phase in taps
        ]
        if s == 1:
            return phases[0][:, :, :f_out]
        return mx.stack(phases, axis=3).reshape(b, t, n * s, c)[:, :, :f_out]

    def _depthwise_kernel(self, x: mx.array, w: list[mx.array]) -> mx.array:
        """A frequency-only depthwise conv, or transposed conv, by :mod:`dfn4lab.kernels`: the padding
        implicit, no strided copies. (batch, time, freq, ch) -> (batch, time, f_out, ch)."""
        b, t, f, c = x.shape
        s, kf, p = self.fstride, self.kf, self.kf // 2
        if self.transposed:
            size = (f - 1) * s - 2 * p + kf + (p if s > 1 else 0)
        else:
            size = (f + 2 * p - kf) // s + 1
        y = _depthwise_fn(s, p, size, self.transposed)(x.reshape(b * t, f, c), mx.stack(w))
        return y.reshape(b, t, size, c)

    def __call__(self, x: mx.array, state: mx.array | None = None) -> tuple[mx.array, mx.array | None]:
        t = x.shape[1]
        folded = self._current_fold()
        w = self._conv_weight() if folded is None else folded[0]
        if self.depthwise and self.kt == 1 and kernels.usable(x, *w, min_size=kernels.SMALL):
            y = self._depthwise_kernel(x, w)
        elif self.transposed:
            y = self._conv_transposed(x, w)
        elif state is None and self.kt > 1 and self._one_axis() and kernels.usable(x):
            # time taps from zero history (offline, training, a stream's first step): no padded copy of
            # x, no strided slices.
            # DFN3's df_convp at batch 8 x 500 frames, eval forward: 43 -> 31 ms.
            y = _time_taps_fn(self.kt)(x @ w)
            h = self.kt - 1  # the history a stream continues from: x's last frames, zeros before
            state = x[:, -h:] if t >= h else mx.pad(x, [(0, 0), (h - t, 0), (0, 0), (0, 0)])
        else:
            xp, state = self._taps(x, state)
            f_out = (xp.shape[2] - self.kf) // self.fstride + 1
            y = self._conv(xp, t, f_out, w)
        if folded is not None:
            _, pw, bias = folded
            return _bias_act(y if pw is None else y @ pw, bias, self.act), state
        if self.has_pointwise and self.depthwise:  # a dense conv has it merged in
            y = y @ self.pointwise[:, :, 0, 0].T
        return self.bn.activated(y, self.act), state


@mx.compile
def deep_filter(frames: mx.array, coefs: mx.array, order: int) -> mx.array:
    """Complex multi-frame filter: out[t] = sum_n frames[t + n] * coef[t, n].

    frames (batch, time + order - 1, bins, 2): the spectrum padded (or preceded by history) with
    ``order - 1 - lookahead`` frames before and ``lookahead`` after; coefs (batch, time, bins, order*2)
    with (re, im) interleaved per tap. Returns (batch, time, bins, 2).
    """
    b, t, f, _ = coefs.shape
    win = mx.stack([frames[:, n : n + t] for n in range(order)], axis=3)  # (batch, time, bins, order, 2)
    c = coefs.reshape(b, t, f, order, 2)
    sr, si, cr, ci = win[..., 0], win[..., 1], c[..., 0], c[..., 1]
    re = (sr * cr - si * ci).sum(axis=-1)
    im = (sr * ci + si * cr).sum(axis=-1)
    return mx.stack([re, im], axis=-1)


def post_filter(noisy: mx.array, enhanced: mx.array, beta: float, eps: float = 1e-12) -> mx.array:
    """Valin et al.'s perceptual post-filter on the effective mask |enhanced|/|noisy|, as upstream.

    noisy, enhanced (batch, time, freq, 2) -> enhanced scaled per bin.
    """

    def mag(x: mx.array) -> mx.array:  # eps**2 inside: a finite gradient on silent (zero) bins
        return mx.sqrt(mx.sum(x * x, axis=-1) + eps * eps)

    mask = mx.clip(mag(enhanced) / (mag(noisy) + eps), eps, 1.0)
    mask_sin = mask * mx.maximum(mx.sin(math.pi * mask / 2), eps)
    pf = (1 + beta) / (1 + beta * (mask / mask_sin) ** 2)
    return enhanced * pf[..., None]


class HybridEncoder(nn.Module):
    """DFN4's multi-domain input: waveform and phase embeddings fused into the magnitude path.

    Per frame (so streaming stays exact): the frame's waveform (inverse FFT of its spectrum) goes
    through strided conv1d layers, the phase of the lowest ``nb_df`` bins through a linear layer
    (as cos/sin), and cross-domain attention lets the magnitude embedding attend to both.
    """

    def __init__(self, fft_size: int, nb_df: int, dim: int, heads: int = 4, ch: int = 16):
        super().__init__()
        self.fft_size, self.nb_df = fft_size, nb_df
        self.wave_conv1 = nn.Conv1d(1, ch, kernel_size=16, stride=8)
        self.wave_conv2 = nn.Conv1d(ch, 2 * ch, kernel_size=8, stride=4)
        self.wave_fc = nn.Linear(2 * ch, dim)
        self.phase_fc = nn.Linear(2 * nb_df, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiHeadAttention(dim, heads)

    def __call__(self, emb: mx.array, spec: mx.array) -> mx.array:
        """emb (batch, time, dim), spec (batch, time, freq, 2) -> fused emb (batch, time, dim)."""
        b, t, f, _ = spec.shape
        wave = mx.fft.irfft(spec[..., 0] + 1j * spec[..., 1], n=self.fft_size, axis=-1)
        w = nn.relu(self.wave_conv1(wave.reshape(b * t, -1, 1)))
        w = nn.relu(self.wave_conv2(w)).mean(axis=1)
        wave_emb = self.wave_fc(w).reshape(b, t, -1)
        low = spec[:, :, : self.nb_df]
        mag = mx.sqrt(mx.sum(low * low, axis=-1, keepdims=True) + 1e-12)
        phase_emb = nn.relu(self.phase_fc((low / mag).reshape(b, t, -1)))
        tokens = self.norm(mx.stack([emb, wave_emb, phase_emb], axis=2)).reshape(b * t, 3, -1)
        fused = self.attn(tokens[:, :1], tokens, tokens).reshape(b, t, -1)
        return emb + fused
