"""Temporal backbones: the model at every recurrent site of DfNet4 (encoder, ERB decoder, DF decoder).

Every core and :class:`SqueezedBackbone` share one interface on ``(batch, time, features)``::

    y, state = module(x, state=None)

Feeding the returned ``state`` into the next call continues the sequence exactly, so a stream
processed one frame at a time (``time == 1``) gives the same output as the whole sequence at once.
``state=None`` means the start of a sequence (zero memory). States are pytrees of ``mx.array``.

Cores, chosen by ``BackboneConfig.kind``:

- ``gru``: stacked ``torch.nn.GRU``-compatible layers (DeepFilterNet3's choice).
- ``mamba``: pre-norm residual selective-SSM (Mamba) blocks.
- ``attention``: pre-norm causal multi-head self-attention blocks with RoPE and an optional window.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

from dfn4lab import kernels
from dfn4lab.activations import gelu, sigmoid, silu, softplus, tanh
from dfn4lab.config import BackboneConfig
from dfn4lab.layers import EvalConstants

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

State = Any  # a pytree of mx.array; None = start of a sequence
_NORM_EPS = 1e-5
LOG2E = math.log2(math.e)


class GroupedLinear(nn.Module):
    """Block-diagonal linear map without bias, exactly upstream's ``GroupedLinearEinsum``.

    The input ``(..., input_size)`` is viewed as ``(..., groups, input_size // groups)``; group ``g``
    is multiplied by ``weight[g]`` of shape ``(input_size // groups, hidden_size // groups)``.
    """

    def __init__(self, input_size: int, hidden_size: int, groups: int = 1):
        super().__init__()
        if input_size % groups or hidden_size % groups:
            raise ValueError(f"sizes {input_size}, {hidden_size} not divisible by groups={groups}")
        self.groups = groups
        i, h = input_size // groups, hidden_size // groups
        # torch's kaiming_uniform_(a=sqrt(5)) on a (G, I/G, H/G) tensor: fan_in = (I/G) * (H/G)
        bound = 1.0 / math.sqrt(i * h)
        self.weight = mx.random.uniform(-bound, bound, (groups, i, h))

    def __call__(self, x: mx.array) -> mx.array:
        """``(..., input_size)`` -> ``(..., hidden_size)``."""
        lead = x.shape[:-1]
        g, i, h = self.weight.shape
        return grouped_matmul(x.reshape(-1, g, i), self.weight).reshape(*lead, g * h)


@mx.custom_function
def grouped_matmul(x: mx.array, w: mx.array) -> mx.array:
    """``x`` (rows, groups, in) times ``w`` (groups, in, out) per group -> (rows, groups, out).

    On the CPU one :mod:`dfn4lab.kernels` SGEMM per group on strided rows, no copies (DFN3's
    df_fc_emb at batch 8 x 500 frames: forward 16 -> 5 ms, forward+backward 28 -> 15 ms). Else a
    batched matmul over groups on contiguous operands, forward and backward: autograd of the einsum
    it replaces multiplied strided views, and its weight gradient ran at ~5 GFLOP/s (120 -> 41 ms).
    """
    rows, g, i = x.shape
    if kernels.usable(x, w, min_size=kernels.SMALL):
        return kernels.grouped_linear(x.reshape(rows, g * i), w).reshape(rows, g, w.shape[2])
    return (mx.contiguous(x.swapaxes(0, 1)) @ w).swapaxes(0, 1)


@grouped_matmul.vjp
def _grouped_matmul_vjp(
    primals: tuple[mx.array, mx.array], dy: mx.array, y: mx.array
) -> tuple[mx.array, mx.array]:
    x, w = primals
    rows, g, i = x.shape
    if kernels.usable(x, w, dy, min_size=kernels.SMALL):
        x2, dy2 = x.reshape(rows, g * i), dy.reshape(rows, g * w.shape[2])
        dx = kernels.grouped_linear_input_grad(dy2, w).reshape(x.shape)
        return dx, kernels.grouped_linear_weight_grad(x2, dy2, g)
    dyg = mx.contiguous(dy.swapaxes(0, 1))  # (groups, rows, out)
    xg = mx.contiguous(x.swapaxes(0, 1))  # (groups, rows, in)
    return (dyg @ w.swapaxes(1, 2)).swapaxes(0, 1), xg.swapaxes(1, 2) @ dyg


# ----------------------------------------------------------------------------------------------- GRU


@mx.compile
def _gru_recur(xi: mx.array, h: mx.array, w_hh: mx.array, b_hh: mx.array) -> mx.array:
    """One GRU step from the precomputed input projection ``xi = x W_ih^T + b_ih``.

    ``xi``: (batch, 3H), ``h``: (batch, H); gate order r, z, n as in ``torch.nn.GRU``.
    Compiled so the gate arithmetic fuses into one kernel: ``split`` is one graph node where three
    slices were three, and the rational activations cost ~2 ns per element against MLX's ~14
    (batch 8: 172 -> 110 us per step).
    """
    xr, xz, xn = mx.split(xi, 3, axis=-1)
    hr, hz, hn = mx.split(mx.addmm(b_hh, h, w_hh.T), 3, axis=-1)
    r, z = sigmoid(xr + hr, fuse=True), sigmoid(xz + hz, fuse=True)
    n = tanh(xn + r * hn, fuse=True)
    return n + z * (h - n)  # == (1 - z) * n + z * h


@mx.compile
def _gru_cell(
    x: mx.array, h: mx.array, w_ih: mx.array, b_ih: mx.array, w_hh: mx.array, b_hh: mx.array
) -> mx.array:
    """A whole GRU step for one frame ``x``: (batch, in) -> new ``h``: (batch, H)."""
    return _gru_recur(mx.addmm(b_ih, x, w_ih.T), h, w_hh, b_hh)


@mx.compile
def _gru_recur_back(
    dh: mx.array, h_prev: mx.array, xi: mx.array, gh: mx.array, w_hh: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """Backward of one GRU step: ``dh`` (batch, H) -> (dh_prev, d xi (batch, 3H), d gh (batch, 3H))."""
    xr, xz, xn = mx.split(xi, 3, axis=-1)
    hr, hz, hn = mx.split(gh, 3, axis=-1)
    r, z = sigmoid(xr + hr, fuse=True), sigmoid(xz + hz, fuse=True)
    n = tanh(xn + r * hn, fuse=True)
    dn = dh * (1 - z) * (1 - n * n)
    dz = dh * (h_prev - n) * z * (1 - z)
    dr = dn * hn * r * (1 - r)
    dgh = mx.concatenate([dr, dz, dn * r], axis=-1)
    return dh * z + dgh @ w_hh, mx.concatenate([dr, dz, dn], axis=-1), dgh


@mx.custom_function
def gru_recurrence(xi: mx.array, h: mx.array, w_hh: mx.array, b_hh: mx.array) -> mx.array:
    """All hidden states ``(batch, time, H)`` of a GRU from input projections ``xi`` (batch, time, 3H).

    On the CPU in float32 the time loops run in :mod:`dfn4lab.kernels` (fused C++ primitives; one
    layer at batch 8 x 500 frames: forward 68 -> 16 ms, compiled forward+backward 333 -> 51 ms);
    elsewhere in MLX ops, frame by frame. Hand-written backward either way: autograd would build a
    (3H, H) weight gradient and a zero-padded copy of ``xi`` per frame; here the per-frame work is
    one matmul and the weight gradient is a single matmul over all frames.
    """
    if kernels.usable(xi, h, w_hh, b_hh):
        return kernels.gru_forward(xi, h, w_hh, b_hh)
    return gru_forward_loop(xi, h, w_hh, b_hh)


def gru_forward_loop(xi: mx.array, h: mx.array, w_hh: mx.array, b_hh: mx.array) -> mx.array:
    """:func:`gru_recurrence`'s forward in MLX ops, one frame at a time (GPU, other dtypes)."""
    ys = []
    for t in range(xi.shape[1]):
        h = _gru_recur(xi[:, t], h, w_hh, b_hh)
        ys.append(h)
    return mx.stack(ys, axis=1)


def gru_backward_loop(
    dy: mx.array, xi: mx.array, gh: mx.array, h_prev: mx.array, w_hh: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """``(d xi, d gh, d h0)`` in MLX ops, one frame at a time; as :func:`dfn4lab.kernels.gru_backward`."""
    dh = mx.zeros_like(h_prev[:, 0])
    dxis, dghs = [], []
    for t in reversed(range(xi.shape[1])):
        dh, dxi, dgh = _gru_recur_back(dh + dy[:, t], h_prev[:, t], xi[:, t], gh[:, t], w_hh)
        dxis.append(dxi)
        dghs.append(dgh)
    return mx.stack(dxis[::-1], axis=1), mx.stack(dghs[::-1], axis=1), dh


def _gru_recurrence_vjp(
    primals: tuple[mx.array, ...], dy: mx.array, ys: mx.array
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    xi, h0, w_hh, b_hh = primals
    h_prev = mx.concatenate([h0[:, None], ys[:, :-1]], axis=1)
    gh = mx.addmm(b_hh, h_prev, w_hh.T)  # the recurrent projections of all frames at once
    backward = kernels.gru_backward if kernels.usable(dy, xi, gh, h_prev, w_hh) else gru_backward_loop
    dxi, dgh, dh = backward(dy, xi, gh, h_prev, w_hh)
    hid = h0.shape[-1]
    dw = dgh.reshape(-1, 3 * hid).T @ h_prev.reshape(-1, hid)
    return dxi, dh, dw, dgh.sum(axis=(0, 1))


gru_recurrence.vjp(_gru_recurrence_vjp)


class GRULayer(nn.Module):
    """One ``torch.nn.GRU`` layer (same parameter names, shapes, gate order and init)."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        k = 1.0 / math.sqrt(hidden_size)
        self.weight_ih = mx.random.uniform(-k, k, (3 * hidden_size, input_size))
        self.weight_hh = mx.random.uniform(-k, k, (3 * hidden_size, hidden_size))
        self.bias_ih = mx.random.uniform(-k, k, (3 * hidden_size,))
        self.bias_hh = mx.random.uniform(-k, k, (3 * hidden_size,))

    def __call__(self, x: mx.array, h: mx.array) -> tuple[mx.array, mx.array]:
        """``x``: (batch, time, in), ``h``: (batch, H) -> (outputs (batch, time, H), last h)."""
        if x.shape[1] == 1:
            h = _gru_cell(x[:, 0], h, self.weight_ih, self.bias_ih, self.weight_hh, self.bias_hh)
            return h[:, None], h
        # the input projection is one matmul over all frames; only h @ W_hh^T is sequential
        xi = mx.addmm(self.bias_ih, x, self.weight_ih.T)
        ys = gru_recurrence(xi, h, self.weight_hh, self.bias_hh)
        return ys, ys[:, -1]


class GRUCore(nn.Module):
    """Stacked GRU layers on ``(batch, time, hidden)``; state: list of ``(batch, hidden)`` per layer."""

    def __init__(self, hidden_size: int, num_layers: int = 1):
        super().__init__()
        self.hidden_size = hidden_size
        self.layers = [GRULayer(hidden_size, hidden_size) for _ in range(num_layers)]

    def __call__(self, x: mx.array, state: State = None) -> tuple[mx.array, State]:
        if state is None:
            state = [mx.zeros((x.shape[0], self.hidden_size), x.dtype) for _ in self.layers]
        new = []
        for layer, h in zip(self.layers, state, strict=True):
            x, h = layer(x, h)
            new.append(h)
        return x, new


# --------------------------------------------------------------------------------------------- Mamba


@mx.custom_function
def linear_recurrence(a: mx.array, b: mx.array, h: mx.array) -> mx.array:
    """All states of ``h_t = a_t * h_{t-1} + b_t``: ``a``, ``b`` (batch, time, ...), ``h`` (batch, ...).

    Hand-written backward (the same recurrence run in reverse): autograd of a per-frame
    ``a[:, t]`` would build a zero-padded copy of all of ``a`` per frame (quadratic in time).
    """
    hs = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        hs.append(h)
    return mx.stack(hs, axis=1)


def _linear_recurrence_vjp(
    primals: tuple[mx.array, mx.array, mx.array], dhs: mx.array, hs: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    a, _, h0 = primals
    carry, gs = mx.zeros_like(h0), []  # carry = a_{t+1} * dL/dh_{t+1}
    for t in reversed(range(a.shape[1])):
        g = dhs[:, t] + carry  # dL/dh_t
        gs.append(g)
        carry = a[:, t] * g
    g = mx.stack(gs[::-1], axis=1)
    h_prev = mx.concatenate([h0[:, None], hs[:, :-1]], axis=1)
    return g * h_prev, g, carry


linear_recurrence.vjp(_linear_recurrence_vjp)


def selective_scan(
    u: mx.array, delta: mx.array, a: mx.array, b: mx.array, c: mx.array, h: mx.array, block: int = 32
) -> tuple[mx.array, mx.array]:
    """Mamba's selective scan, frame by frame: :func:`selective_scan_sequential`'s result.

    On the CPU in float32 it runs in :mod:`dfn4lab.kernels` (one fused C++ loop, forward and
    backward; 512 channels x 16 states, batch 8 x 500 frames: forward 160 -> 4 ms, compiled
    forward+backward 344 -> 19 ms); elsewhere as :func:`selective_scan_sequential`'s MLX ops.
    """
    if kernels.usable(u, delta, a, b, c, h):
        return _selective_scan_fused(u, delta, a, b, c, h)
    return selective_scan_sequential(u, delta, a, b, c, h, block)


@mx.custom_function
def _selective_scan_fused(
    u: mx.array, delta: mx.array, a: mx.array, b: mx.array, c: mx.array, h: mx.array
) -> tuple[mx.array, mx.array]:
    return kernels.scan_forward(u, delta, a, b, c, h)


@_selective_scan_fused.vjp
def _selective_scan_fused_vjp(
    primals: tuple[mx.array, ...], cotangents: tuple[mx.array, mx.array], outputs: tuple[mx.array, mx.array]
) -> tuple[mx.array, ...]:
    return kernels.scan_backward(*primals, *cotangents)


def selective_scan_sequential(
    u: mx.array, delta: mx.array, a: mx.array, b: mx.array, c: mx.array, h: mx.array, block: int = 32
) -> tuple[mx.array, mx.array]:
    """The selective-scan recurrence in MLX ops, one frame at a time (the reference; GPU, other dtypes).

    ``u``, ``delta``: (batch, time, d_inner); ``a``: (d_inner, d_state), non-positive;
    ``b``, ``c``: (batch, time, d_state); ``h``: (batch, d_inner, d_state).
    Returns ``y`` (batch, time, d_inner) with ``y_t = C_t . h_t`` (no D skip) and the last ``h``.
    The decays and inputs are computed for ``block`` frames at once, so the loop itself is one
    multiply-add per frame; forward-only, nothing of size (time, d_inner, d_state) is live at once.
    """
    ys = []
    a2 = a * LOG2E  # exp(x) as 2**(x log2 e): measured 2-3x faster on CPU, where this exp dominated
    for s in range(0, u.shape[1], block):
        sl = slice(s, s + block)
        da = mx.power(2.0, delta[:, sl, :, None] * a2)  # (batch, q, d_inner, d_state)
        dbu = (delta[:, sl] * u[:, sl])[..., None] * b[:, sl, None, :]
        hs = linear_recurrence(da, dbu, h)
        h = hs[:, -1]
        ys.append((hs @ c[:, sl, :, None])[..., 0])
    return mx.concatenate(ys, axis=1), h


def selective_scan_chunked(
    u: mx.array, delta: mx.array, a: mx.array, b: mx.array, c: mx.array, h: mx.array, chunk: int = 32
) -> tuple[mx.array, mx.array]:
    """Same result as :func:`selective_scan_sequential`, in SSD-style closed form per chunk.

    Within a chunk of ``q`` frames, with ``S_t = sum_{k<=t} delta_k`` (per channel), the state is
    ``h_t = sum_{s<=t} exp(A (S_t - S_s)) * delta_s B_s x_s + exp(A S_t) * h_0``: a few large
    parallel ops, no time loop; the state is carried between chunks. Exponents are masked to
    ``s <= t`` before ``exp`` so every exponent is ``<= 0`` (no overflow for any delta or A).
    Costs ``(batch, q, q, d_inner, d_state)`` memory and ~q/2 times the recurrence's arithmetic:
    a trade of work for fewer, larger ops.
    """
    ys = []
    for s in range(0, u.shape[1], chunk):
        sl = slice(s, s + chunk)
        d_c = delta[:, sl]
        q = d_c.shape[1]
        # segment sums S_t - S_s = sum_{s<k<=t} delta_k summed directly, not as a difference of
        # cumsums: that difference (and its gradient) cancels badly when the sums grow large
        ks = mx.arange(q)
        after = (ks[:, None] > ks[None])[None, :, :, None]  # k > s, laid out (1, k, s, 1)
        seg = mx.cumsum(mx.where(after, d_c[:, :, None], 0.0), axis=1)  # (batch, t, s, d_inner)
        causal = (ks[:, None] >= ks[None])[:, :, None, None]
        decay = mx.exp(mx.where(causal, seg[..., None] * a, -mx.inf))  # (batch, t, s, d_inner, d_state)
        cum = seg[:, :, 0] + d_c[:, :1]  # S_t = (S_t - S_0) + delta_0
        dbu = (d_c * u[:, sl])[..., None] * b[:, sl, None, :]  # (batch, s, d_inner, d_state)
        hs = (decay * dbu[:, None]).sum(axis=2) + mx.exp(cum[..., None] * a) * h[:, None]
        ys.append((hs @ c[:, sl, :, None])[..., 0])
        h = hs[:, -1]
    return mx.concatenate(ys, axis=1), h


def _base2_decay(a_log: mx.array) -> mx.array:
    return -mx.exp(a_log) * LOG2E


@mx.compile
def _mamba_step(
    x: mx.array,
    conv_buf: mx.array,
    h: mx.array,
    norm: mx.array,
    w_in: mx.array,
    conv_w: mx.array,
    conv_b: mx.array,
    w_x: mx.array,
    w_dt: mx.array,
    b_dt: mx.array,
    a2: mx.array,
    d: mx.array,
    w_out: mx.array,
) -> tuple[mx.array, mx.array, mx.array]:
    """One frame of :class:`MambaBlock`: x (batch, d_model), conv_buf (batch, d_conv - 1, d_inner),
    h (batch, d_inner, d_state) -> (y, conv_buf, h). The streaming path: one fused graph, no loops.

    ``a2`` is ``A`` in base 2 (``-exp(A_log) * log2(e)``): the decay ``exp(delta A)`` is computed as
    ``2 ** (delta a2)``, measured 2-3x faster than ``exp`` on CPU, where it was the step's largest cost.
    """
    d_state, dt_rank = h.shape[-1], w_dt.shape[1]
    xs, z = mx.split(mx.fast.rms_norm(x, norm, _NORM_EPS) @ w_in.T, 2, axis=-1)
    xp = mx.concatenate([conv_buf, xs[:, None]], axis=1)  # (batch, d_conv, d_inner)
    u = silu(conv_b + (xp * conv_w.T).sum(axis=1))
    dt_in, bm, cm = mx.split(u @ w_x.T, [dt_rank, dt_rank + d_state], axis=-1)
    delta = softplus(mx.addmm(b_dt, dt_in, w_dt.T))
    h = mx.power(2.0, delta[..., None] * a2) * h + (delta * u)[..., None] * bm[:, None]
    y = ((h @ cm[..., None])[..., 0] + d * u) * silu(z)
    return x + y @ w_out.T, xp[:, 1:], h


class MambaBlock(nn.Module):
    """Pre-norm residual Mamba block (Mamba-1 selective SSM) on ``(batch, time, d_model)``.

    State: ``(conv_buf (batch, d_conv - 1, d_inner), h (batch, d_inner, d_state))``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        chunk: int = 32,
        scan: str = "sequential",
    ):
        super().__init__()
        if scan not in ("sequential", "chunked"):
            raise ValueError(f"unknown scan {scan!r}")
        d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.d_state, self.d_conv, self.chunk, self.scan = d_state, d_conv, chunk, scan
        self.norm = nn.RMSNorm(d_model, eps=_NORM_EPS)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        k = 1.0 / math.sqrt(d_conv)
        self.conv_weight = mx.random.uniform(-k, k, (d_inner, d_conv))  # depthwise, last tap = now
        self.conv_bias = mx.random.uniform(-k, k, (d_inner,))
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        r = self.dt_rank**-0.5
        self.dt_proj.weight = mx.random.uniform(-r, r, (d_inner, self.dt_rank))
        # Mamba's init: softplus(bias) log-uniform in [1e-3, 1e-1]; bias = softplus^-1(dt)
        dt = mx.exp(mx.random.uniform(math.log(1e-3), math.log(1e-1), (d_inner,)))
        self.dt_proj.bias = dt + mx.log(-mx.expm1(-dt))
        self.A_log = mx.log(mx.broadcast_to(mx.arange(1, d_state + 1, dtype=mx.float32), (d_inner, d_state)))
        self.D = mx.ones((d_inner,))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self._a2_cache: EvalConstants | None = None

    def _set_training_mode(self, mode: bool) -> None:
        super()._set_training_mode(mode)
        self._a2_cache = None if mode else EvalConstants.of((self.A_log,), _base2_decay(self.A_log))

    def a2(self) -> mx.array:
        """``A`` in base 2 (d_inner, d_state) for the one-frame step (:func:`_mamba_step`, and
        ``kernels/stream.cpp``); computed once per ``eval()`` (it is 8192 exps)."""
        cache = self._a2_cache
        if not self.training and cache is not None and cache.valid_for((self.A_log,)):
            return cache.value
        return _base2_decay(self.A_log)

    def init_state(self, batch: int, dtype: mx.Dtype = mx.float32) -> tuple[mx.array, mx.array]:
        d_inner = self.D.shape[0]
        return (
            mx.zeros((batch, self.d_conv - 1, d_inner), dtype),
            mx.zeros((batch, d_inner, self.d_state), dtype),
        )

    def __call__(self, x: mx.array, state: tuple[mx.array, mx.array]) -> tuple[mx.array, tuple]:
        conv_buf, h = state
        t = x.shape[1]
        if t == 1:
            y, conv_buf, h = _mamba_step(
                x[:, 0], conv_buf, h, self.norm.weight, self.in_proj.weight, self.conv_weight,
                self.conv_bias, self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias, self.a2(),
                self.D, self.out_proj.weight,
            )  # fmt: skip
            return y[:, None], (conv_buf, h)
        xs, z = mx.split(self.in_proj(self.norm(x)), 2, axis=-1)
        # causal depthwise conv: prepend the previous d_conv - 1 inputs carried in the state
        xp = mx.concatenate([conv_buf, xs], axis=1)  # (batch, d_conv - 1 + time, d_inner)
        u = self.conv_bias
        for j in range(self.d_conv):
            u = u + xp[:, j : j + t] * self.conv_weight[:, j]
        u = silu(u)
        dt_in, bm, cm = mx.split(self.x_proj(u), [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
        delta = softplus(self.dt_proj(dt_in))
        a = -mx.exp(self.A_log)
        if self.scan == "sequential":
            y, h = selective_scan(u, delta, a, bm, cm, h, self.chunk)
        else:
            y, h = selective_scan_chunked(u, delta, a, bm, cm, h, self.chunk)
        y = (y + self.D * u) * silu(z)
        return x + self.out_proj(y), (xp[:, xp.shape[1] - (self.d_conv - 1) :], h)


class MambaCore(nn.Module):
    """Stacked :class:`MambaBlock` s and a final RMSNorm; state: list of per-block states.

    ``scan`` picks the multi-frame scan; both give the same result. ``"sequential"`` (default) does
    the recurrence's work and memory; ``"chunked"`` (SSD-style closed form) does ~chunk/2 times more
    arithmetic and memory in fewer, larger ops. Measured on CPU (hidden 256, batch 1, 256 frames,
    forward / forward+backward): sequential 39 / 70 ms (49 MB peak); chunked 370 / 310 ms at
    chunk 8 up to 910 / 2430 ms (750 MB) at chunk 32. Mamba-1's per-(channel, state) decay keeps
    the closed form from reducing to matmuls as in Mamba-2.
    """

    def __init__(self, cfg: BackboneConfig, hidden_size: int, num_layers: int = 1, scan: str = "sequential"):
        super().__init__()
        self.layers = [
            MambaBlock(hidden_size, cfg.d_state, cfg.d_conv, cfg.expand, cfg.chunk, scan)
            for _ in range(num_layers)
        ]
        self.norm = nn.RMSNorm(hidden_size)

    def __call__(self, x: mx.array, state: State = None) -> tuple[mx.array, State]:
        if state is None:
            state = [layer.init_state(x.shape[0], x.dtype) for layer in self.layers]
        new = []
        for layer, s in zip(self.layers, state, strict=True):
            x, s = layer(x, s)
            new.append(s)
        return self.norm(x), new


# ----------------------------------------------------------------------------------------- Attention


# the parts before and after the attention proper are compiled: ~10 small ops each per frame
@mx.compile
def _attention_qkv(
    x: mx.array, norm: mx.array, w_qkv: mx.array, pos: mx.array, heads: int
) -> tuple[mx.array, mx.array, mx.array]:
    """Pre-norm, projection and RoPE: x (batch, time, d) -> q, k, v (batch, heads, time, d // heads)."""
    b, t, d = x.shape
    qkv = (mx.fast.rms_norm(x, norm, _NORM_EPS) @ w_qkv.T).reshape(b, t, 3, heads, d // heads)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    rope = dict(dims=d // heads, traditional=False, base=10000.0, scale=1.0, offset=pos)
    return mx.fast.rope(q, **rope), mx.fast.rope(k, **rope), v


@mx.compile
def _attention_out(
    x: mx.array,
    a: mx.array,
    w_out: mx.array,
    norm: mx.array,
    w_in: mx.array,
    b_in: mx.array,
    w_ffn: mx.array,
    b_ffn: mx.array,
) -> mx.array:
    """Output projection and residual, then the pre-norm GELU FFN and residual; ``a``: (b, heads, t, hd)."""
    b, t, d = x.shape
    x = x + a.transpose(0, 2, 1, 3).reshape(b, t, d) @ w_out.T
    f = gelu(mx.addmm(b_in, mx.fast.rms_norm(x, norm, _NORM_EPS), w_in.T))
    return x + mx.addmm(b_ffn, f, w_ffn.T)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None) -> mx.array:
    """Softmax attention: q (batch, heads, tq, d), k, v (batch, heads, tk, d), boolean ``mask`` (tq, tk)
    or None (every row must keep a key) -> (batch, heads, tq, d).

    On the CPU MLX's fused attention falls back to matmuls and a softmax whose ``exp`` costs ~10 ns
    per element; the same softmax in base 2 (``power(2, .)``) measured 94 -> 51 ms forward and
    154 -> 109 ms compiled forward+backward (batch 8, 4 heads, 500 frames, causal). A single query
    (streaming) and other devices keep the fused kernel.
    """
    if q.shape[2] == 1 or mx.default_device().type != mx.DeviceType.cpu:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    s = (q * (scale * LOG2E)) @ k.swapaxes(-1, -2)
    if mask is not None:
        s = mx.where(mask, s, -mx.inf)
    p = mx.power(2.0, s - mx.stop_gradient(s.max(axis=-1, keepdims=True)))
    return (p / p.sum(axis=-1, keepdims=True)) @ v


def windowed_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, window: int, cached: int
) -> mx.array:
    """Causal attention over the last ``window`` keys, computed in blocks: O(time x window), not
    O(time^2) as a masked full attention is.

    ``q`` (batch, heads, t, d) sits at key indices ``cached ..`` of ``k``, ``v`` (batch, heads,
    cached + t, d); query i sees keys ``cached + i - window < j <= cached + i``. Each block of
    ``window`` queries meets the ``2 window`` keys that hold all it can see (masked to them).
    """
    b, h, t, d = q.shape
    w = window
    nb = -(-t // w)
    qb = mx.pad(q, [(0, 0), (0, 0), (0, nb * w - t), (0, 0)]).reshape(b, h * nb, w, d)
    # key position p sits at padded index p + w - 1; block j needs positions cached + (j - 1) w + 1 ..
    pads = [(0, 0), (0, 0), (w - 1, nb * w + 1 - t), (0, 0)]

    def blocks(a: mx.array) -> mx.array:
        a = mx.pad(a, pads)[:, :, cached : cached + (nb + 1) * w].reshape(b, h, nb + 1, w, d)
        return mx.concatenate([a[:, :, :-1], a[:, :, 1:]], axis=3).reshape(b, h * nb, 2 * w, d)

    r, c, j = mx.arange(w)[:, None], mx.arange(2 * w)[None], mx.arange(nb)[:, None, None]
    keep = (c >= r) & (c < r + w) & (cached + (j - 1) * w + 1 + c >= 0)  # (nb, w, 2w)
    mask = mx.broadcast_to(keep[None], (h, nb, w, 2 * w)).reshape(h * nb, w, 2 * w)
    out = attention(qb, blocks(k), blocks(v), scale, mask)
    return out.reshape(b, h, nb * w, d)[:, :, :t]


@functools.cache
def _fused_attention(scale: float, window: int) -> Callable[[mx.array, mx.array, mx.array], tuple]:
    """:mod:`dfn4lab.kernels`' causal attention as a differentiable function of ``(q, k, v)`` returning
    ``(o, lse)``; ``lse`` is kept for the backward and carries no gradient (use ``o`` only)."""

    @mx.custom_function
    def fused(q: mx.array, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        return kernels.attention_forward(q, k, v, scale, window)

    @fused.vjp
    def fused_vjp(primals: tuple, cotangents: tuple, outputs: tuple) -> tuple[mx.array, ...]:
        return kernels.attention_backward(*primals, outputs[0], outputs[1], cotangents[0], scale, window)

    return fused


class AttentionBlock(nn.Module):
    """Pre-norm causal multi-head self-attention with RoPE, then a GELU FFN; both residual.

    State: the rotated keys and values ``(batch, heads, cached, head_dim)`` of past frames.
    Several frames at once on the CPU in float32 run :mod:`dfn4lab.kernels`' attention (batch 8,
    4 heads, 500 frames, causal: forward 50 -> 7.5 ms, forward+backward 100 -> 23 ms); a single
    frame (streaming) and other devices run MLX ops.
    """

    def __init__(self, d_model: int, heads: int = 4, window: int | None = None, ffn_mult: int = 2):
        super().__init__()
        if d_model % heads or (d_model // heads) % 2:
            raise ValueError(f"d_model={d_model} needs an even head size with heads={heads}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 frame, got {window}")
        self.heads, self.window = heads, window
        self.head_dim = d_model // heads
        self.norm1 = nn.RMSNorm(d_model, eps=_NORM_EPS)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = nn.RMSNorm(d_model, eps=_NORM_EPS)
        self.ffn_in = nn.Linear(d_model, ffn_mult * d_model)
        self.ffn_out = nn.Linear(ffn_mult * d_model, d_model)

    def init_state(self, batch: int, dtype: mx.Dtype = mx.float32) -> tuple[mx.array, mx.array]:
        empty = mx.zeros((batch, self.heads, 0, self.head_dim), dtype)
        return empty, empty

    def _mask(self, t: int, cached: int) -> mx.array | None:
        """Boolean (t, cached + t) mask: query i sits at key index cached + i."""
        if t == 1 and (self.window is None or cached < self.window):
            return None  # the cache is already trimmed to the window
        lag = (cached + mx.arange(t))[:, None] - mx.arange(cached + t)[None]  # query pos - key pos
        keep = lag >= 0
        if self.window is not None:
            keep = keep & (lag < self.window)
        return keep

    def __call__(
        self, x: mx.array, state: tuple[mx.array, mx.array], pos: mx.array
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """``x``: (batch, time, d_model); ``pos``: absolute index of ``x[:, 0]`` (int32 scalar)."""
        k_cache, v_cache = state
        q, k, v = _attention_qkv(x, self.norm1.weight, self.qkv.weight, pos, self.heads)
        k = mx.concatenate([k_cache, k], axis=2)
        v = mx.concatenate([v_cache, v], axis=2)
        t, cached = x.shape[1], k_cache.shape[2]
        if t > 1 and kernels.usable(q, k, v):
            a = _fused_attention(self.head_dim**-0.5, self.window or 0)(q, k, v)[0]
        elif self.window is not None and t > self.window:
            a = windowed_attention(q, k, v, self.head_dim**-0.5, self.window, cached)
        else:
            a = attention(q, k, v, self.head_dim**-0.5, self._mask(t, cached))
        ffn_in, ffn_out = self.ffn_in, self.ffn_out
        x = _attention_out(
            x, a, self.out.weight, self.norm2.weight, ffn_in.weight, ffn_in.bias, ffn_out.weight, ffn_out.bias
        )
        if self.window is not None:  # the next frame sees at most window - 1 past frames
            start = max(k.shape[2] - (self.window - 1), 0)
            k, v = k[:, :, start:], v[:, :, start:]
        return x, (k, v)


class AttentionCore(nn.Module):
    """Stacked :class:`AttentionBlock` s and a final RMSNorm.

    State: ``(pos, [(k, v) per block])`` with ``pos`` the absolute index (int32 scalar) of the next
    frame, so RoPE positions continue across calls.
    """

    def __init__(self, cfg: BackboneConfig, hidden_size: int, num_layers: int = 1):
        super().__init__()
        self.layers = [
            AttentionBlock(hidden_size, cfg.heads, cfg.window, cfg.ffn_mult) for _ in range(num_layers)
        ]
        self.norm = nn.RMSNorm(hidden_size)

    def __call__(self, x: mx.array, state: State = None) -> tuple[mx.array, State]:
        if state is None:
            state = (mx.array(0, mx.int32), [layer.init_state(x.shape[0], x.dtype) for layer in self.layers])
        pos, caches = state
        new = []
        for layer, s in zip(self.layers, caches, strict=True):
            x, s = layer(x, s, pos)
            new.append(s)
        return self.norm(x), (pos + x.shape[1], new)


# -------------------------------------------------------------------------------------------- public


def make_core(cfg: BackboneConfig, hidden_size: int, num_layers: int = 1) -> nn.Module:
    """The temporal core on ``(batch, time, hidden_size)`` chosen by ``cfg.kind``."""
    if cfg.kind == "gru":
        return GRUCore(hidden_size, num_layers)
    if cfg.kind == "mamba":
        return MambaCore(cfg, hidden_size, num_layers, scan=cfg.scan)
    if cfg.kind == "attention":
        return AttentionCore(cfg, hidden_size, num_layers)
    raise ValueError(f"backbone kind {cfg.kind!r} is in config.BACKBONES but make_core builds no such core")


class SqueezedBackbone(nn.Module):
    """DeepFilterNet3's ``SqueezedGRU_S`` with the GRU generalised to any core.

    ``y = linear_out(core(linear_in(x))) + skip(x)`` on ``(batch, time, input_size)``, where
    ``linear_in``/``linear_out`` are :class:`GroupedLinear` + ReLU (``linear_out`` is the identity
    when ``output_size`` is None) and ``skip`` is an optional :class:`GroupedLinear` (no activation)
    with ``skip_groups`` groups (default ``linear_groups``; DFN3's DF decoder uses 8 vs 16).
    The state is the core's state.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int | None = None,
        num_layers: int = 1,
        linear_groups: int = 8,
        cfg: BackboneConfig | None = None,
        skip: bool = False,
        skip_groups: int | None = None,
    ):
        super().__init__()
        out = hidden_size if output_size is None else output_size
        self.linear_in = GroupedLinear(input_size, hidden_size, linear_groups)
        self.core = make_core(cfg or BackboneConfig(), hidden_size, num_layers)
        if output_size is not None:
            self.linear_out = GroupedLinear(hidden_size, output_size, linear_groups)
        if skip:
            self.skip = GroupedLinear(input_size, out, skip_groups or linear_groups)

    def __call__(self, x: mx.array, state: State = None) -> tuple[mx.array, State]:
        y, state = self.core(nn.relu(self.linear_in(x)), state)
        if "linear_out" in self:
            y = nn.relu(self.linear_out(y))
        if "skip" in self:
            y = y + self.skip(x)
        return y, state


def param_count(module: nn.Module) -> int:
    """Number of trainable scalar parameters in ``module`` (BatchNorm's running statistics are state, not
    parameters, as PyTorch counts them)."""
    return sum(v.size for _, v in tree_flatten(module.trainable_parameters()))
