"""dfn4lab.kernels: the C++ primitives (GRU, selective scan, attention, the conv blocks' convolutions,
grouped linear, batch norm) against the MLX-op code, float64 references and torch.nn.GRU."""

from __future__ import annotations

import os
import platform

import dfn4lab  # noqa: F401  (binds BLAS before mlx.core)
from dfn4lab import backbones, kernels
from dfn4lab.config import BackboneConfig

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_unflatten

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
needs_kernels = pytest.mark.skipif(not kernels.BUILT, reason="dfn4lab.kernels not built (make kernels)")


@pytest.fixture(autouse=True)
def _on_the_cpu():
    """The kernels are CPU primitives: on a Mac, whose default device is the GPU, they are tested on the
    CPU (the MLX-op reference with them)."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


def test_kernels_are_built_on_linux():
    """`make setup` builds them; on Linux (where CI runs) a missing build must fail, not fall back."""
    if platform.system() != "Linux":
        pytest.skip("the build is only required on Linux")
    assert kernels.BUILT, "dfn4lab/kernels/_kernels is missing: see .venv/dfn4lab-kernels-build-*/build.log"


def _gru_inputs(batch: int, frames: int, hidden: int, seed: int):
    mx.random.seed(seed)
    k = 1 / np.sqrt(hidden)
    xi = mx.random.normal((batch, frames, 3 * hidden))
    h0 = 0.5 * mx.random.normal((batch, hidden))
    w = mx.random.uniform(-k, k, (3 * hidden, hidden))
    b = mx.random.uniform(-k, k, (3 * hidden,))
    return xi, h0, w, b


@needs_kernels
@pytest.mark.parametrize(
    "batch,frames,hidden",
    # below kPackFrames (4) frames w_hh is read as it is, from 4 on it is packed: rows per core 1 to 7
    # (the 4-, 2- and 1-row products on any core count), 3H and H not multiples of the 64-column panels
    [(1, 1, 4), (5, 3, 24), (5, 4, 24), (1, 40, 20), (3, 7, 16), (8, 60, 64), (7 * CORES, 9, 40)],
)
def test_gru_forward_and_backward_match_mlx_loops(batch, frames, hidden):
    xi, h0, w, b = _gru_inputs(batch, frames, hidden, seed=frames)
    ys = kernels.gru_forward(xi, h0, w, b)
    ref = backbones.gru_forward_loop(xi, h0, w, b)
    np.testing.assert_allclose(np.array(ys), np.array(ref), atol=1e-5)
    dy = mx.random.normal(ys.shape)
    h_prev = mx.concatenate([h0[:, None], ref[:, :-1]], axis=1)
    gh = mx.addmm(b, h_prev, w.T)
    got = kernels.gru_backward(dy, xi, gh, h_prev, w)
    want = backbones.gru_backward_loop(dy, xi, gh, h_prev, w)
    for name, g, r in zip(("dxi", "dgh", "dh0"), got, want, strict=True):
        assert g.shape == r.shape, name
        np.testing.assert_allclose(np.array(g), np.array(r), atol=1e-5, err_msg=name)


@needs_kernels
def test_gru_kernel_takes_strided_inputs_and_compiles():
    xi, h0, w, b = _gru_inputs(2, 9, 8, seed=1)
    xi_t = mx.contiguous(xi.swapaxes(0, 1)).swapaxes(0, 1)  # same values, not row-contiguous
    ref = backbones.gru_forward_loop(xi, h0, w, b)
    np.testing.assert_allclose(np.array(kernels.gru_forward(xi_t, h0, w, b)), np.array(ref), atol=1e-5)
    compiled = mx.compile(lambda *a: kernels.gru_forward(*a) * 2)
    np.testing.assert_allclose(np.array(compiled(xi, h0, w, b)), 2 * np.array(ref), atol=1e-5)


@needs_kernels
def test_gru_kernel_rejects_bad_input_in_one_line():
    xi, h0, w, b = _gru_inputs(2, 5, 8, seed=2)
    with pytest.raises(ValueError, match="float32"):
        kernels.gru_forward(xi.astype(mx.float16), h0, w, b)
    with pytest.raises(ValueError, match="shapes"):
        kernels.gru_forward(xi, h0[:, :4], w, b)
    assert not kernels.usable(xi.astype(mx.bfloat16))  # other dtypes take the MLX loops


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "mlx-loops"])
def test_gru_recurrence_matches_torch_both_ways(use_kernels, monkeypatch):
    """Forward and all gradients of a GRU layer against torch.nn.GRU, through either implementation."""
    if use_kernels and not kernels.BUILT:
        pytest.skip("dfn4lab.kernels not built")
    monkeypatch.setattr(kernels, "ENABLED", use_kernels)
    torch.manual_seed(0)
    gru = torch.nn.GRU(12, 12, batch_first=True)
    x, h0 = torch.randn(3, 11, 12, requires_grad=True), torch.randn(1, 3, 12, requires_grad=True)
    wy = torch.randn(3, 11, 12)
    ref, _ = gru(x, h0)
    (ref * wy).sum().backward()
    p = {
        n: mx.array(getattr(gru, f"{n}_l0").detach().numpy())
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    }

    def loss(xm, hm, w_ih, w_hh, b_ih, b_hh):
        ys = backbones.gru_recurrence(mx.addmm(b_ih, xm, w_ih.T), hm, w_hh, b_hh)
        return (ys * mx.array(wy.numpy())).sum(), ys

    args = (mx.array(x.detach().numpy()), mx.array(h0[0].detach().numpy()), *p.values())
    (_, ys), grads = mx.value_and_grad(loss, argnums=tuple(range(6)))(*args)
    np.testing.assert_allclose(np.array(ys), ref.detach().numpy(), atol=1e-5)
    want = [x.grad, h0.grad[0]] + [getattr(gru, f"{n}_l0").grad for n in p]
    for name, g, w in zip(["x", "h0", *p], grads, want, strict=True):
        np.testing.assert_allclose(np.array(g), w.numpy(), atol=1e-4, err_msg=name)


def _scan_inputs(batch: int, frames: int, d: int, n: int, seed: int):
    mx.random.seed(seed)
    u = mx.random.normal((batch, frames, d))
    delta = mx.log1p(mx.exp(mx.random.normal((batch, frames, d)) - 1))  # softplus: > 0, some large
    a = -mx.arange(1, n + 1, dtype=mx.float32)[None] * mx.random.uniform(0.5, 1.5, (d, n))
    b, c = mx.random.normal((batch, frames, n)), mx.random.normal((batch, frames, n))
    return u, delta, a, b, c, mx.random.normal((batch, d, n))


@needs_kernels
@pytest.mark.parametrize("batch,frames,d,n", [(1, 1, 4, 3), (3, 9, 12, 5), (2, 70, 32, 16)])
def test_selective_scan_kernel_matches_mlx_ops(batch, frames, d, n):
    """Forward and all six gradients (both outputs weighted) against the MLX-op sequential scan."""
    args = _scan_inputs(batch, frames, d, n, seed=frames)
    y, h = kernels.scan_forward(*args)
    ref_y, ref_h = backbones.selective_scan_sequential(*args, block=4)
    np.testing.assert_allclose(np.array(y), np.array(ref_y), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(h), np.array(ref_h), rtol=1e-5, atol=1e-5)
    wy, wh = mx.random.normal(y.shape), mx.random.normal(h.shape)

    def loss(scan, *a):
        y, h = scan(*a)
        return (y * wy).sum() + (h * wh).sum()

    argnums = tuple(range(6))
    got = mx.grad(lambda *a: loss(backbones.selective_scan, *a), argnums)(*args)
    want = mx.grad(lambda *a: loss(lambda *b: backbones.selective_scan_sequential(*b, block=4), *a), argnums)(
        *args
    )
    for name, g, w in zip(("u", "delta", "a", "b", "c", "h"), got, want, strict=True):
        scale = float(mx.abs(w).max()) + 1e-6
        np.testing.assert_allclose(np.array(g) / scale, np.array(w) / scale, atol=1e-5, err_msg=name)


@needs_kernels
def test_selective_scan_kernel_long_memory_against_float64():
    """3000 frames of decays near 1 (delta ~ 0.01): the state is a product of thousands of 2^x, so a
    biased 2^x drifts (a floor-based polynomial gave 7e-5 here); float64 recurrence as the oracle."""
    mx.random.seed(1)
    u, b = mx.random.normal((2, 3000, 8)), mx.random.normal((2, 3000, 4))
    delta = mx.abs(mx.random.normal((2, 3000, 8))) * 0.01
    a, h = -mx.abs(mx.random.normal((8, 4))), mx.zeros((2, 8, 4))
    y = np.array(kernels.scan_forward(u, delta, a, b, b, h)[0])
    U, D, A, B = (np.array(x, dtype=np.float64) for x in (u, delta, a, b))
    hs, want = np.zeros((2, 8, 4)), np.zeros(U.shape)
    for t in range(U.shape[1]):
        hs = np.exp(D[:, t, :, None] * A) * hs + (D[:, t] * U[:, t])[..., None] * B[:, t, None, :]
        want[:, t] = (hs * B[:, t, None, :]).sum(-1)
    assert np.abs(y - want).max() < 5e-6 * np.abs(want).max()


@needs_kernels
def test_selective_scan_kernel_gradient_with_unused_state():
    """Only ``y`` feeds the loss (the usual case): the last state's cotangent arrives as zeros."""
    args = _scan_inputs(2, 6, 8, 4, seed=3)
    got = mx.grad(lambda u: backbones.selective_scan(u, *args[1:])[0].sum())(args[0])
    want = mx.grad(lambda u: backbones.selective_scan_sequential(u, *args[1:])[0].sum())(args[0])
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_selective_scan_kernel_rejects_bad_shapes():
    u, delta, a, b, c, h = _scan_inputs(2, 5, 8, 4, seed=4)
    with pytest.raises(ValueError, match="shapes"):
        kernels.scan_forward(u, delta, a, b[:, :, :3], c, h)


def _attention_inputs(batch: int, heads: int, t: int, cached: int, d: int, seed: int):
    mx.random.seed(seed)
    q = 2 * mx.random.normal((batch, heads, t, d))
    k, v = (2 * mx.random.normal((batch, heads, cached + t, d)) for _ in range(2))
    return q, k, v


def _masked_attention(q, k, v, scale: float, window: int):
    """The MLX-op reference: full scores, masked to what query i (key index cached + i) may see."""
    t, s = q.shape[2], k.shape[2]
    lag = (s - t + mx.arange(t))[:, None] - mx.arange(s)[None]
    keep = (lag >= 0) & (lag < window) if window else lag >= 0
    return backbones.attention(q, k, v, scale, keep)


@needs_kernels
@pytest.mark.parametrize(
    "batch,heads,t,cached,d,window",
    [
        (1, 1, 1, 0, 4, 0),
        (2, 3, 70, 0, 16, 0),
        (1, 2, 130, 5, 8, 0),
        (2, 2, 150, 9, 16, 10),
        (1, 1, 200, 0, 8, 1),
        (2, 1, 65, 64, 8, 64),
        (1, 2, 5, 3, 4, 40),
    ],
)
def test_attention_kernel_matches_masked_mlx_attention(batch, heads, t, cached, d, window):
    """Forward and the three gradients, causal and windowed, with cached keys, over block edges (64)."""
    q, k, v = _attention_inputs(batch, heads, t, cached, d, seed=t + cached)
    scale = d**-0.5
    o, lse = kernels.attention_forward(q, k, v, scale, window)
    np.testing.assert_allclose(np.array(o), np.array(_masked_attention(q, k, v, scale, window)), atol=1e-5)
    assert lse.shape == (batch, heads, t)
    w = mx.random.normal(q.shape)
    got = mx.grad(lambda *a: (backbones._fused_attention(scale, window)(*a)[0] * w).sum(), (0, 1, 2))(q, k, v)
    want = mx.grad(lambda *a: (_masked_attention(*a, scale, window) * w).sum(), (0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", got, want, strict=True):
        np.testing.assert_allclose(np.array(g), np.array(r), atol=2e-5, err_msg=name)


@needs_kernels
def test_attention_kernel_takes_strided_inputs_and_compiles():
    q, k, v = _attention_inputs(2, 2, 20, 0, 8, seed=5)
    ref = _masked_attention(q, k, v, 0.4, 0)
    q_t = mx.contiguous(q.swapaxes(1, 2)).swapaxes(1, 2)  # same values, heads and time strided
    np.testing.assert_allclose(
        np.array(kernels.attention_forward(q_t, k, v, 0.4, 0)[0]), np.array(ref), atol=1e-5
    )
    grad = mx.compile(mx.grad(lambda q: backbones._fused_attention(0.4, 0)(q, k, v)[0].sum()))
    want = mx.grad(lambda q: _masked_attention(q, k, v, 0.4, 0).sum())(q)
    np.testing.assert_allclose(np.array(grad(q)), np.array(want), atol=2e-5)


@needs_kernels
def test_attention_kernel_rejects_bad_input_in_one_line():
    q, k, v = _attention_inputs(1, 2, 6, 2, 4, seed=6)
    with pytest.raises(ValueError, match="float32"):
        kernels.attention_forward(q.astype(mx.float16), k, v, 0.5, 0)
    with pytest.raises(ValueError, match="shapes"):
        kernels.attention_forward(q, k[:, :, :3], v[:, :, :3], 0.5, 0)  # fewer keys than queries


@needs_kernels
@pytest.mark.parametrize("window", [None, 3])
def test_attention_core_same_with_and_without_kernels(window):
    """The whole attention core, forward and every parameter's gradient: kernel vs MLX ops."""
    core = backbones.AttentionCore(BackboneConfig(kind="attention", heads=2, window=window), 16, num_layers=2)
    x = mx.random.normal((2, 40, 16))
    proj = mx.random.normal((2, 40, 16))  # a random projection: the final RMSNorm makes (y**2).mean() ~ 1

    def run():
        return nn.value_and_grad(core, lambda x: (core(x)[0] * proj).mean())(x)

    (y1, g1) = run()
    with kernels.disabled():
        (y2, g2) = run()
    np.testing.assert_allclose(np.array(y1), np.array(y2), rtol=1e-5)
    for (name, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2), strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6, err_msg=name)


def _batch_norm_f64(x: np.ndarray, w: np.ndarray, b: np.ndarray, dy: np.ndarray, act: str | None):
    """Training-mode batch norm + act in float64 over the rows of x (N, C): y, dx, the terms of dw and
    db (summed over rows), z."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    n, mean, var = x.shape[0], x.mean(0), x.var(0)
    inv = 1 / np.sqrt(var + 1e-5)
    xh = (x - mean) * inv
    z = xh * w + b
    y = {None: z, "relu": np.maximum(z, 0), "sigmoid": 1 / (1 + np.exp(-z))}[act]
    g = dy * {None: 1.0, "relu": z > 0, "sigmoid": y * (1 - y)}[act]
    dx = w * inv / n * (n * g - g.sum(0) - xh * (g * xh).sum(0))
    return y, dx, g * xh, g, z


@needs_kernels
@pytest.mark.parametrize("act", [None, "relu", "sigmoid"])
@pytest.mark.parametrize("rows,channels,offset", [(2, 3, 0.0), (105, 1, 0.0), (40_000, 16, 10.0)])
def test_batch_norm_kernel_against_float64(act, rows, channels, offset):
    """Forward, statistics and the three gradients against float64, with a mean far from zero (10 x
    the spread: the kernel's shifted sums keep float32 accuracy there) and threads (the last size)."""
    rng = np.random.default_rng(rows)
    x = (rng.standard_normal((rows, channels)) * 3 + offset * 3).astype(np.float32)
    w, b = (
        rng.uniform(0.5, 1.5, channels).astype(np.float32),
        rng.standard_normal(channels).astype(np.float32),
    )
    dy = rng.standard_normal((rows, channels)).astype(np.float32)
    y_ref, dx_ref, dw_ref, db_ref, z = _batch_norm_f64(x, w, b, dy, act)
    y, mean, var = kernels.batch_norm_forward(*map(mx.array, (x, w, b)), 1e-5, act)
    np.testing.assert_allclose(np.array(y), y_ref, atol=1e-5 * np.abs(y_ref).max())
    np.testing.assert_allclose(np.array(mean), x.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(np.array(var), x.astype(np.float64).var(0), rtol=1e-5)
    dx, dw, db = kernels.batch_norm_backward(*map(mx.array, (x, w)), mean, var, y, mx.array(dy), 1e-5, act)
    away = np.abs(z) > 1e-4  # at ReLU's kink either side is right
    scale = np.abs(dy * w / np.sqrt(x.var(0) + 1e-5)).max()  # dx's terms (two rows: they cancel to ~0)
    np.testing.assert_allclose(np.array(dx)[away], dx_ref[away], atol=1e-5 * scale)
    for got, terms in ((dw, dw_ref), (db, db_ref)):  # sums that cancel: error bound by the terms' sizes
        np.testing.assert_allclose(np.array(got), terms.sum(0), atol=1e-6 * np.abs(terms).sum(0).max())


@needs_kernels
def test_batch_norm_kernel_rejects_bad_input_in_one_line():
    x, c = mx.random.normal((4, 3)), mx.ones((3,))
    with pytest.raises(ValueError, match="float32"):
        kernels.batch_norm_forward(x.astype(mx.float16), c, c, 1e-5, "relu")
    with pytest.raises(ValueError, match="more than one row"):
        kernels.batch_norm_forward(x[:1], c, c, 1e-5, "relu")
    with pytest.raises(ValueError, match="per-channel"):
        kernels.batch_norm_forward(x, c[:2], c, 1e-5, None)


@needs_kernels
@pytest.mark.parametrize(
    "rows,f,ch,taps,stride,pad",
    [(6, 9, 4, 3, 2, 1), (6, 8, 4, 3, 1, 1), (6, 17, 4, 5, 3, 2), (6, 5, 4, 2, 2, 0), (400, 96, 64, 3, 2, 1)],
)
def test_depthwise_kernels_are_a_conv_its_transpose_and_its_tap_gradient(rows, f, ch, taps, stride, pad):
    """``correlate`` and ``tap_grad`` against direct numpy sums in float64; ``scatter`` is correlate's
    adjoint (<Ax, y> = <x, A^T y>). The last size runs on several threads."""
    rng = np.random.default_rng(f)
    n = (f + 2 * pad - taps) // stride + 1
    x = rng.standard_normal((rows, f, ch)).astype(np.float32)
    w = rng.standard_normal((taps, ch)).astype(np.float32)
    y = rng.standard_normal((rows, n, ch)).astype(np.float32)
    want, dw_want = np.zeros((rows, n, ch)), np.zeros((taps, ch))
    for q in range(n):
        for j in range(taps):
            if 0 <= stride * q + j - pad < f:
                src = x[:, stride * q + j - pad].astype(np.float64)
                want[:, q] += w[j] * src
                dw_want[j] += (src * y[:, q]).sum(0)
    ax = kernels.depthwise_correlate(mx.array(x), mx.array(w), stride, pad, n)
    np.testing.assert_allclose(np.array(ax), want, atol=1e-5)
    aty = np.array(kernels.depthwise_scatter(mx.array(y), mx.array(w), stride, pad, f), np.float64)
    np.testing.assert_allclose((want * y).sum(), (x * aty).sum(), rtol=1e-5)
    dw = np.array(kernels.depthwise_tap_grad(mx.array(x), mx.array(y), taps, stride, pad))
    np.testing.assert_allclose(dw, dw_want, atol=1e-5 * np.abs(dw_want).max() + 1e-5)


@needs_kernels
@pytest.mark.parametrize(
    "in_ch,out_ch,kernel,stride,transposed,act,freq",
    [
        (8, 8, (1, 3), 2, False, "relu", 32),
        (8, 8, (1, 3), 1, False, "relu", 8),
        (8, 8, (1, 3), 2, True, "relu", 8),
        (8, 8, (1, 3), 1, True, None, 8),
        (8, 8, (1, 5), 3, False, "sigmoid", 17),
        (8, 8, (2, 3), 2, False, "relu", 9),  # depthwise with time taps: the MLX-op path either way
        (8, 4, (5, 1), 1, False, None, 6),  # grouped time taps (df_convp): time_taps
        (2, 8, (3, 3), 1, False, "relu", 12),  # grouped dense: batch norm only (the merge: test_torch_ref)
    ],
)
def test_conv_block_training_same_with_and_without_kernels(
    in_ch, out_ch, kernel, stride, transposed, act, freq, monkeypatch
):
    """A conv block's training forward and returned history, BatchNorm statistics, input and parameter
    gradients, and eval forward: kernels (depthwise conv, time taps, batch norm, bias + activation)
    against MLX ops. ``SMALL`` lowered: arrays this size would stay on MLX ops."""
    from dfn4lab.layers import ConvBlock

    monkeypatch.setattr(kernels, "SMALL", 0)

    mx.random.seed(freq)
    block = ConvBlock(in_ch, out_ch, kernel, fstride=stride, transposed=transposed, act=act)
    x = mx.random.normal((2, 3, freq, in_ch)) + 1.0  # fewer frames than a (5, 1) kernel's history
    proj = mx.random.normal(block(x)[0].shape)
    start = {k: v for k, v in tree_flatten(block.parameters())}

    def run() -> list[mx.array]:
        block.update(tree_unflatten(list(start.items())))
        block.train()
        loss = nn.value_and_grad(block, lambda x: (block(x)[0] * proj).sum())
        (value, grads), dx = loss(x), mx.grad(lambda x: (block(x)[0] * proj).sum())(x)
        stats = [block.bn.running_mean, block.bn.running_var]
        history = block(x)[1]
        block.eval()
        out = [value, dx, *stats, block(x)[0], *(g for _, g in tree_flatten(grads))]
        return out + ([history] if history is not None else [])

    with_kernels = run()
    with kernels.disabled():
        reference = run()
    for got, want in zip(with_kernels, reference, strict=True):
        np.testing.assert_allclose(
            np.array(got), np.array(want), atol=2e-5 * float(mx.abs(want).max()) + 1e-7
        )


@needs_kernels
@pytest.mark.parametrize("batch,frames,freq", [(2, 1, 5), (2, 3, 5), (2, 9, 5), (8, 120, 96)])
def test_time_taps_kernel_against_numpy(batch, frames, freq):
    """``y[t] = sum_i z[t + i - (K - 1), tap i]`` with zero history, and its gradient as the adjoint
    (the last size runs on several threads)."""
    rng = np.random.default_rng(frames)
    taps, out = 4, 3
    z = rng.standard_normal((batch, frames, freq, taps * out)).astype(np.float32)
    want = np.zeros((batch, frames, freq, out))
    for t in range(frames):
        for i in range(taps):
            if t + i - (taps - 1) >= 0:
                want[:, t] += z[:, t + i - (taps - 1), :, i * out : (i + 1) * out]
    np.testing.assert_allclose(np.array(kernels.time_taps(mx.array(z), taps)), want, atol=1e-6)
    dy = rng.standard_normal(want.shape).astype(np.float32)
    dz = np.array(kernels.time_taps_grad(mx.array(dy), taps))
    np.testing.assert_allclose((want * dy).sum(), (z * dz.astype(np.float64)).sum(), rtol=1e-5)  # adjoint
    assert dz.shape == z.shape


@needs_kernels
@pytest.mark.parametrize("act", [None, "relu", "sigmoid"])
def test_bias_act_kernel_matches_mlx_ops(act):
    """Eval mode's ``act(x + bias)``: value and both gradients, kernel (threads: 2^16 elements) against
    MLX ops."""
    from dfn4lab.layers import _bias_act

    x, bias, proj = (
        mx.random.normal((2, 64, 16, 32)),
        mx.random.normal((32,)),
        mx.random.normal((2, 64, 16, 32)),
    )

    def run():
        return mx.value_and_grad(lambda x, b: (_bias_act(x, b, act) * proj).sum(), argnums=(0, 1))(x, bias)

    got = run()
    with kernels.disabled():
        want = run()
    for g, w in zip(tree_flatten(got), tree_flatten(want), strict=True):
        np.testing.assert_allclose(np.array(g[1]), np.array(w[1]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bias"):
        kernels.bias_act(x.reshape(-1, 32), bias[:3], act)


@needs_kernels
@pytest.mark.parametrize("rows,groups,inp,out", [(7, 4, 3, 5), (50, 1, 8, 6), (300, 32, 12, 4)])
def test_grouped_linear_kernel_against_numpy(rows, groups, inp, out, monkeypatch):
    """Forward and both gradients of the grouped linear map (strided SGEMMs per group; one group: the
    BLAS's threads) against an einsum in float64. ``SMALL`` lowered: these sizes would stay on MLX ops."""
    monkeypatch.setattr(kernels, "SMALL", 0)
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, groups, inp)).astype(np.float32)
    w = rng.standard_normal((groups, inp, out)).astype(np.float32)
    dy = rng.standard_normal((rows, groups, out)).astype(np.float32)
    xd, wd, dyd = (a.astype(np.float64) for a in (x, w, dy))
    y, (dx, dw) = mx.value_and_grad(
        lambda x, w: (backbones.grouped_matmul(x, w) * mx.array(dy)).sum(), argnums=(0, 1)
    )(mx.array(x), mx.array(w))
    np.testing.assert_allclose(float(y), np.einsum("rgi,gio,rgo->", xd, wd, dyd), rtol=1e-4)
    np.testing.assert_allclose(
        np.array(backbones.grouped_matmul(mx.array(x), mx.array(w))),
        np.einsum("rgi,gio->rgo", xd, wd),
        atol=1e-4,
    )
    np.testing.assert_allclose(np.array(dx), np.einsum("rgo,gio->rgi", dyd, wd), atol=1e-4)
    np.testing.assert_allclose(np.array(dw), np.einsum("rgi,rgo->gio", xd, dyd), atol=1e-3)
    with pytest.raises(ValueError, match="groups"):
        kernels.grouped_linear(mx.array(x).reshape(rows, -1)[:, :-1], mx.array(w))
