"""dfn4lab's CPU kernels: C++ MLX primitives for work MLX would run op by op, or pass by pass on
one core; each forward and (but eval's bias + activation) backward:

- ``recurrences.cpp``: the time loops of the GRU layer and of Mamba's selective scan;
- ``attention.cpp``: causal softmax attention;
- ``conv.cpp``: depthwise convolution over frequency and its transpose, the time taps of a (K, 1) conv;
- ``linear.cpp``: the grouped linear map;
- ``norm.cpp``: batch norm with its activation (training), and eval's folded ``act(x + bias)``;
- ``stream.cpp``: DeepFilterNet3's whole streaming hop.

``python -m dfn4lab.kernels`` (``make kernels``, part of ``make setup``) builds them into this
package as ``_kernels`` with CMake and nanobind; nothing is downloaded. They are optional: where
they are not built, on the GPU, for dtypes other than float32, or for small arrays (``SMALL``),
:mod:`dfn4lab.backbones`, :mod:`dfn4lab.layers` and :mod:`dfn4lab.stream` run the same work in MLX
ops, which are also the tests' reference. ``DFN4LAB_KERNELS=0`` turns them off, to compare.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import mlx.core as mx


def _load():
    """The built module, or None (not built, or built against another MLX: its arrays don't convert)."""
    try:
        from dfn4lab.kernels import _kernels as module
    except ImportError:
        return None
    try:  # builds a graph node only; nothing is evaluated
        module.gru_forward(mx.zeros((1, 1, 3)), mx.zeros((1, 1)), mx.zeros((3, 1)), mx.zeros((3,)))
    except TypeError:
        warnings.warn("dfn4lab.kernels was built against another MLX: run `make kernels`", stacklevel=2)
        return None
    return module


_kernels = _load()
BUILT = _kernels is not None
ENABLED = BUILT and os.environ.get("DFN4LAB_KERNELS", "1") != "0"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the MLX-op loops inside the block (comparisons, MAC counting). Functions compiled inside
    keep the choice made when they were traced."""
    global ENABLED
    saved, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = saved


def status() -> str:
    """The kernels' state for environment reports: on, idle (MLX on the GPU), off (DFN4LAB_KERNELS=0)
    or not built."""
    if not ENABLED:
        return "off (DFN4LAB_KERNELS=0)" if BUILT else "not built"
    return "on" if active() else "idle (MLX on the GPU)"


def active() -> bool:
    """Whether the kernels run at all: enabled, and MLX's default device the CPU."""
    return ENABLED and mx.default_device().type == mx.DeviceType.cpu


# Below this many elements (of the input) the depthwise conv, the bias + activation and the grouped
# linear leave the work to MLX ops: a streaming hop's arrays, where a primitive's dispatch costs more
# than it saves (the compiled dfn3 hop: 1.1-1.2 ms with them, 1.0-1.1 without; 1.48 while the grouped
# linear also started threads). Batch norm (training only) and the time taps are not gated.
SMALL = 2**15


def usable(*arrays: mx.array, min_size: int = 0) -> bool:
    """Whether the kernels run these arrays: enabled, float32, default device the CPU, and the first
    array at least ``min_size`` elements."""
    return active() and all(a.dtype == mx.float32 for a in arrays) and arrays[0].size >= min_size


def gru_forward(xi: mx.array, h0: mx.array, w_hh: mx.array, b_hh: mx.array) -> mx.array:
    """All hidden states (batch, time, H) of a GRU layer from ``xi = x W_ih^T + b_ih`` (batch, time, 3H)."""
    return _kernels.gru_forward(xi, h0, w_hh, b_hh)


def gru_backward(
    dy: mx.array, xi: mx.array, gh: mx.array, h_prev: mx.array, w_hh: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """``(d xi, d gh, d h0)`` of :func:`gru_forward` from ``dy`` (batch, time, H) and the recurrent
    projections ``gh = h_prev W_hh^T + b_hh`` (batch, time, 3H) of all frames."""
    dxi, dgh, dh0 = _kernels.gru_backward(dy, xi, gh, h_prev, w_hh)
    return dxi, dgh, dh0


def scan_forward(
    u: mx.array, delta: mx.array, a: mx.array, b: mx.array, c: mx.array, h: mx.array
) -> tuple[mx.array, mx.array]:
    """Mamba's selective scan: ``(y (batch, time, D), last state (batch, D, N))`` from ``u``, ``delta``
    (batch, time, D), ``a`` (D, N) <= 0, ``b``, ``c`` (batch, time, N) and the state ``h`` (batch, D, N);
    as :func:`dfn4lab.backbones.selective_scan_sequential`."""
    y, h_last = _kernels.scan_forward(u, delta, a, b, c, h)
    return y, h_last


def scan_backward(
    u: mx.array,
    delta: mx.array,
    a: mx.array,
    b: mx.array,
    c: mx.array,
    h: mx.array,
    dy: mx.array,
    dh_last: mx.array,
) -> tuple[mx.array, ...]:
    """Gradients ``(du, d delta, da, db, dc, dh)`` of :func:`scan_forward` from its outputs' cotangents
    (the states are recomputed, one batch row at a time)."""
    return tuple(_kernels.scan_backward(u, delta, a, b, c, h, dy, dh_last))


def attention_forward(
    q: mx.array, k: mx.array, v: mx.array, scale: float, window: int
) -> tuple[mx.array, mx.array]:
    """Causal softmax attention: ``(o (batch, heads, T, d), lse (batch, heads, T))`` from ``q``
    (batch, heads, T, d) and ``k``, ``v`` (batch, heads, S, d), the queries being the last T of the S
    keys; ``window`` > 0 keeps the last ``window`` keys of each query. ``lse``: base-2 log-sum-exp."""
    o, lse = _kernels.attention_forward(q, k, v, scale, window)
    return o, lse


def attention_backward(
    q: mx.array, k: mx.array, v: mx.array, o: mx.array, lse: mx.array, do: mx.array, scale: float, window: int
) -> tuple[mx.array, mx.array, mx.array]:
    """``(dq, dk, dv)`` of :func:`attention_forward` from its output's cotangent ``do``."""
    dq, dk, dv = _kernels.attention_backward(q, k, v, o, lse, do, scale, window)
    return dq, dk, dv


def depthwise_correlate(x: mx.array, w: mx.array, stride: int, pad: int, n: int) -> mx.array:
    """Depthwise conv over frequency: ``y[r, q] = sum_j w[j] x[r, stride q + j - pad]`` (zero outside
    ``x``), ``x`` (rows, freq, ch), taps ``w`` (K, ch) -> ``y`` (rows, n, ch)."""
    return _kernels.depthwise_correlate(x, w, stride, pad, n)


def depthwise_scatter(y: mx.array, w: mx.array, stride: int, pad: int, size: int) -> mx.array:
    """The transpose of :func:`depthwise_correlate`: ``y`` (rows, n, ch) -> (rows, size, ch), position
    ``stride q + j - pad`` getting ``w[j] y[r, q]``; a transposed depthwise conv."""
    return _kernels.depthwise_scatter(y, w, stride, pad, size)


def depthwise_tap_grad(x: mx.array, y: mx.array, taps: int, stride: int, pad: int) -> mx.array:
    """``dw`` (taps, ch) of :func:`depthwise_correlate` (input ``x``, output cotangent ``y``):
    ``sum over rows and q of x[r, stride q + j - pad] y[r, q]``."""
    return _kernels.depthwise_tap_grad(x, y, taps, stride, pad)


def time_taps(z: mx.array, taps: int) -> mx.array:
    """The time taps of a causal (taps, 1) conv after one matmul of all taps side by side, with zero
    history: ``z`` (batch, time, freq, taps * out) -> ``y`` (batch, time, freq, out),
    ``y[:, t] = sum_i z[:, t + i - (taps - 1), :, i * out : (i + 1) * out]``."""
    return _kernels.time_taps(z, taps)


def time_taps_grad(dy: mx.array, taps: int) -> mx.array:
    """``dz`` (batch, time, freq, taps * out) of :func:`time_taps` from ``dy`` (batch, time, freq, out)."""
    return _kernels.time_taps_grad(dy, taps)


def grouped_linear(x: mx.array, w: mx.array) -> mx.array:
    """``x`` (rows, groups * in) times ``w`` (groups, in, out) group by group -> (rows, groups * out)."""
    return _kernels.grouped_linear(x, w)


def grouped_linear_input_grad(dy: mx.array, w: mx.array) -> mx.array:
    """``dx`` (rows, groups * in) of :func:`grouped_linear` from ``dy`` (rows, groups * out)."""
    return _kernels.grouped_linear_input_grad(dy, w)


def grouped_linear_weight_grad(x: mx.array, dy: mx.array, groups: int) -> mx.array:
    """``dw`` (groups, in, out) of :func:`grouped_linear` from ``x`` and ``dy``."""
    return _kernels.grouped_linear_weight_grad(x, dy, groups)


ACTIVATIONS = {None: 0, "relu": 1, "sigmoid": 2}  # the activations batch_norm_* fuse, by code


def batch_norm_forward(
    x: mx.array, weight: mx.array, bias: mx.array, eps: float, act: str | None
) -> tuple[mx.array, mx.array, mx.array]:
    """Training-mode batch norm over the rows of ``x`` (N, C), then ``act`` (a key of ACTIVATIONS):
    ``(y (N, C), mean (C), biased variance (C))``."""
    y, mean, var = _kernels.batch_norm_forward(x, weight, bias, eps, ACTIVATIONS[act])
    return y, mean, var


def batch_norm_backward(
    x: mx.array,
    weight: mx.array,
    mean: mx.array,
    var: mx.array,
    y: mx.array,
    dy: mx.array,
    eps: float,
    act: str | None,
) -> tuple[mx.array, mx.array, mx.array]:
    """``(dx, dweight, dbias)`` of :func:`batch_norm_forward` from its output ``y`` and cotangent ``dy``."""
    dx, dw, db = _kernels.batch_norm_backward(x, weight, mean, var, y, dy, eps, ACTIVATIONS[act])
    return dx, dw, db


def bias_act(x: mx.array, bias: mx.array, act: str | None) -> mx.array:
    """``act(x + bias)`` over ``x`` (N, C), ``act`` a key of ACTIVATIONS."""
    return _kernels.bias_act(x, bias, ACTIVATIONS[act])


def dfn3_stream(cfg: dict, net: dict, channels: int):
    """DeepFilterNet3's streaming hop for ``channels`` streams, from :func:`dfn4lab.stream.native_net`'s
    ``(cfg, net)``: ``process(x, out)`` one hop (channels, hop) -> whether ``out`` was written (not
    while the look-ahead fills), ``flush(out)`` the last look-ahead hops -> how many, ``reset()``."""
    return _kernels.Dfn3Stream(cfg, net, channels)
