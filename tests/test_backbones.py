"""Backbones: torch oracles for GroupedLinear / GRU / SqueezedGRU_S, scan equivalence, streaming."""

from __future__ import annotations

import dataclasses

import dfn4lab  # noqa: F401  (binds BLAS before mlx.core)
from dfn4lab.backbones import (
    AttentionCore,
    GroupedLinear,
    GRUCore,
    MambaCore,
    SqueezedBackbone,
    attention,
    make_core,
    param_count,
    selective_scan_chunked,
    selective_scan_sequential,
    windowed_attention,
)
from dfn4lab.config import BackboneConfig

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map

KINDS = {
    "gru": BackboneConfig(kind="gru"),
    "mamba": BackboneConfig(kind="mamba", d_state=4, chunk=4),
    "attention": BackboneConfig(kind="attention", heads=2),
    "attention-window": BackboneConfig(kind="attention", heads=2, window=3),
}


def t2m(t: torch.Tensor) -> mx.array:
    return mx.array(t.detach().numpy())


def m2n(a: mx.array) -> np.ndarray:
    return np.array(a)


def randomize(module: nn.Module, seed: int, scale: float = 0.5) -> None:
    """Replace every parameter by noise so no zero-initialised path hides a bug."""
    mx.random.seed(seed)
    module.update(tree_map(lambda p: scale * mx.random.normal(p.shape), module.parameters()))


def test_grouped_linear_matches_einsum():
    mx.random.seed(0)
    lin = GroupedLinear(12, 8, groups=4)
    assert lin.weight.shape == (4, 3, 2)
    x = mx.random.normal((2, 3, 5, 12))  # extra leading dims
    w = m2n(lin.weight)
    ref = np.einsum("...gi,gih->...gh", m2n(x).reshape(2, 3, 5, 4, 3), w).reshape(2, 3, 5, 8)
    np.testing.assert_allclose(m2n(lin(x)), ref, atol=1e-5)


def copy_gru(core: GRUCore, gru: torch.nn.GRU) -> None:
    for k, layer in enumerate(core.layers):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            setattr(layer, name, t2m(getattr(gru, f"{name}_l{k}")))


def test_gru_core_matches_torch():
    torch.manual_seed(0)
    gru = torch.nn.GRU(16, 16, num_layers=2, batch_first=True)
    core = GRUCore(16, num_layers=2)
    copy_gru(core, gru)
    x = torch.randn(3, 9, 16)
    h0 = torch.randn(2, 3, 16)
    ref, ref_h = gru(x, h0)
    y, h = core(t2m(x), [t2m(h0[0]), t2m(h0[1])])
    np.testing.assert_allclose(m2n(y), ref.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(np.stack([m2n(a) for a in h]), ref_h.detach().numpy(), atol=1e-5)
    # gradients (hand-written backward) against torch autograd
    xm, hm = t2m(x), [t2m(h0[0]), t2m(h0[1])]
    wy = torch.randn(ref.shape)

    def loss(model, x, hs):
        y, h = model(x, hs)
        return (y * t2m(wy)).sum() + (h[1] ** 2).sum()

    (gp, gx, gh) = nn.value_and_grad(core, lambda m, x, hs: loss(m, x, hs))(core, xm, hm)[1], None, None
    gx, gh = mx.grad(lambda x, hs: loss(core, x, hs), argnums=(0, 1))(xm, hm)
    x.requires_grad_(True)
    h0.requires_grad_(True)
    ref2, ref2_h = gru(x, h0)
    ((ref2 * wy).sum() + (ref2_h[1] ** 2).sum()).backward()
    np.testing.assert_allclose(m2n(gx), x.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.stack([m2n(a) for a in gh]), h0.grad.numpy(), atol=1e-5)
    for k in range(2):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            want = getattr(gru, f"{name}_l{k}").grad.numpy()
            np.testing.assert_allclose(m2n(gp["layers"][k][name]), want, atol=1e-4, err_msg=f"{name} {k}")
    # the T=1 path (fused cell) against torch too
    y1, _ = core(t2m(x[:, :1]), [t2m(h0[0]), t2m(h0[1])])
    np.testing.assert_allclose(m2n(y1), ref[:, :1].detach().numpy(), atol=1e-5)


class TorchGroupedLinear(torch.nn.Module):
    """Upstream GroupedLinearEinsum's math."""

    def __init__(self, i: int, h: int, g: int):
        super().__init__()
        self.g = g
        self.weight = torch.nn.Parameter(torch.randn(g, i // g, h // g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        x = torch.einsum("btgi,gih->btgh", x.view(b, t, self.g, -1), self.weight)
        return x.flatten(2, 3)


class TorchSqueezedGRU(torch.nn.Module):
    """Upstream SqueezedGRU_S with ReLU activations and a GroupedLinear skip."""

    def __init__(self, i: int, h: int, o: int | None, layers: int, groups: int, skip_groups: int | None):
        super().__init__()
        self.linear_in = TorchGroupedLinear(i, h, groups)
        self.gru = torch.nn.GRU(h, h, num_layers=layers, batch_first=True)
        self.linear_out = TorchGroupedLinear(h, o, groups) if o is not None else None
        self.skip = TorchGroupedLinear(i, o or h, skip_groups) if skip_groups else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.gru(torch.relu(self.linear_in(x)))
        if self.linear_out is not None:
            y = torch.relu(self.linear_out(y))
        return y + self.skip(x) if self.skip is not None else y


@pytest.mark.parametrize("out,skip_groups", [(24, 4), (None, 2), (24, None)])
def test_squeezed_gru_matches_upstream_structure(out, skip_groups):
    torch.manual_seed(1)
    ref = TorchSqueezedGRU(16, 8, out, 2, 4, skip_groups)
    bb = SqueezedBackbone(
        16, 8, out, num_layers=2, linear_groups=4, skip=bool(skip_groups), skip_groups=skip_groups
    )
    bb.linear_in.weight = t2m(ref.linear_in.weight)
    copy_gru(bb.core, ref.gru)
    if out is not None:
        bb.linear_out.weight = t2m(ref.linear_out.weight)
    if skip_groups:
        bb.skip.weight = t2m(ref.skip.weight)
    names = {k for k, _ in tree_flatten(bb.parameters())}
    assert "core.layers.1.weight_hh" in names and ("skip.weight" in names) == bool(skip_groups)
    x = torch.randn(2, 6, 16)
    y, _ = bb(t2m(x))
    np.testing.assert_allclose(m2n(y), ref(x).detach().numpy(), atol=1e-5)


def make_backbone(name: str, seed: int = 0) -> SqueezedBackbone:
    mx.random.seed(seed)
    bb = SqueezedBackbone(8, 16, 12, num_layers=2, linear_groups=2, cfg=KINDS[name], skip=True)
    randomize(bb, seed, 0.3)
    return bb


@pytest.mark.parametrize("name", list(KINDS))
def test_state_continuation_is_exact(name):
    bb = make_backbone(name)
    x = mx.random.normal((2, 11, 8))
    full, _ = bb(x)
    for splits in ([1, 2, 3, 7], [5, 9], [4, 8]):  # frame-by-frame starts, chunk-unaligned cuts
        ys, state, prev = [], None, 0
        for cut in [*splits, x.shape[1]]:
            y, state = bb(x[:, prev:cut], state)
            ys.append(y)
            prev = cut
        np.testing.assert_allclose(m2n(mx.concatenate(ys, axis=1)), m2n(full), atol=1e-5)


def test_streaming_frame_by_frame_matches_offline():
    for name in KINDS:
        bb = make_backbone(name, seed=3)
        x = mx.random.normal((1, 9, 8))
        full, _ = bb(x)
        state, ys = None, []
        for t in range(x.shape[1]):
            y, state = bb(x[:, t : t + 1], state)
            ys.append(y)
        np.testing.assert_allclose(m2n(mx.concatenate(ys, axis=1)), m2n(full), atol=1e-5, err_msg=name)


def scan_inputs(seed: int, b: int, t: int, d: int, n: int, extreme: bool):
    mx.random.seed(seed)
    u = mx.random.normal((b, t, d))
    if extreme:  # huge decays and steps: exponents far below float range, must not overflow
        delta = mx.random.uniform(0.0, 60.0, (b, t, d))
        a = -mx.exp(mx.random.uniform(-2.0, 6.0, (d, n)))
    else:
        delta = mx.random.uniform(0.001, 0.3, (b, t, d))
        a = -mx.exp(mx.random.normal((d, n)))
    return u, delta, a, mx.random.normal((b, t, n)), mx.random.normal((b, t, n)), mx.random.normal((b, d, n))


def torch_scan(u, delta, a, b, c, h):
    """The recurrence in float64 torch (forward and autograd oracle)."""
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, :, None] * a) * h + (delta[:, t] * u[:, t])[..., None] * b[:, t, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, c[:, t]))
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("extreme", [False, True])
def test_sequential_scan_matches_torch(extreme):
    args = scan_inputs(0, 2, 10, 6, 3, extreme)
    wy, wh = mx.random.normal((2, 10, 6)), mx.random.normal((2, 6, 3))

    def loss(*a):
        y, h = selective_scan_sequential(*a, block=4)
        return (y * wy).sum() + (h * wh).sum()

    y, h = selective_scan_sequential(*args, block=4)
    grads = mx.grad(loss, argnums=tuple(range(6)))(*args)
    targs = [torch.tensor(m2n(v), dtype=torch.float64, requires_grad=True) for v in args]
    ref_y, ref_h = torch_scan(*targs)
    ((ref_y * torch.tensor(m2n(wy))).sum() + (ref_h * torch.tensor(m2n(wh))).sum()).backward()
    np.testing.assert_allclose(m2n(y), ref_y.detach().numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(m2n(h), ref_h.detach().numpy(), atol=1e-4, rtol=1e-4)
    for name, g, t in zip("u delta A B C h0".split(), grads, targs, strict=True):
        np.testing.assert_allclose(m2n(g), t.grad.numpy(), atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("t,chunk,extreme", [(13, 4, False), (8, 8, False), (11, 5, True), (3, 8, False)])
def test_chunked_scan_matches_sequential(t, chunk, extreme):
    args = scan_inputs(1, 2, t, 6, 3, extreme)
    y, h = selective_scan_chunked(*args, chunk=chunk)
    ref_y, ref_h = selective_scan_sequential(*args, block=3)
    assert np.isfinite(m2n(y)).all()
    np.testing.assert_allclose(m2n(y), m2n(ref_y), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(m2n(h), m2n(ref_h), atol=1e-4, rtol=1e-4)

    w = mx.random.normal(ref_y.shape)
    wh = mx.random.normal(ref_h.shape)

    def loss(scan, *a):
        y, h = scan(*a)
        return (y * w).sum() + (h * wh).sum()

    argnums = tuple(range(6))
    g = mx.grad(lambda *a: loss(lambda *b: selective_scan_chunked(*b, chunk=chunk), *a), argnums)(*args)
    g_ref = mx.grad(lambda *a: loss(lambda *b: selective_scan_sequential(*b, block=3), *a), argnums)(*args)
    for name, gc, gr in zip("u delta A B C h0".split(), g, g_ref, strict=True):
        assert np.isfinite(m2n(gc)).all(), name
        np.testing.assert_allclose(m2n(gc), m2n(gr), atol=1e-4, rtol=1e-4, err_msg=name)


def test_mamba_core_chunked_equals_sequential_with_params_grads():
    cfg = BackboneConfig(kind="mamba", d_state=4, chunk=4)
    mx.random.seed(2)
    seq = MambaCore(cfg, 8, num_layers=2, scan="sequential")
    chk = MambaCore(cfg, 8, num_layers=2, scan="chunked")
    chk.update(seq.parameters())
    x = mx.random.normal((2, 10, 8))
    np.testing.assert_allclose(m2n(chk(x)[0]), m2n(seq(x)[0]), atol=1e-4)

    def loss(model, x):
        return (model(x)[0] ** 2).sum()

    gs = nn.value_and_grad(seq, loss)(seq, x)[1]
    gc = nn.value_and_grad(chk, loss)(chk, x)[1]
    for (name, a), (_, b) in zip(tree_flatten(gs), tree_flatten(gc), strict=True):
        np.testing.assert_allclose(m2n(a), m2n(b), atol=1e-4, rtol=1e-4, err_msg=name)
    assert any("A_log" in name and np.abs(m2n(a)).max() > 0 for name, a in tree_flatten(gs))


def torch_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(m2n(v), dtype=torch.float64) for k, v in tree_flatten(module.parameters())}


def torch_rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w


def torch_mamba_block(p: dict, pre: str, x: torch.Tensor, d_state: int) -> torch.Tensor:
    """Mamba-1 block written out plainly (float64, per-frame loop)."""
    lin = torch.nn.functional.linear
    xs, z = lin(torch_rms(x, p[pre + "norm.weight"]), p[pre + "in_proj.weight"]).chunk(2, dim=-1)
    w = p[pre + "conv_weight"]
    u = torch.nn.functional.conv1d(
        xs.transpose(1, 2), w[:, None], p[pre + "conv_bias"], padding=w.shape[1] - 1, groups=w.shape[0]
    )
    u = torch.nn.functional.silu(u[..., : x.shape[1]].transpose(1, 2))
    r = p[pre + "dt_proj.weight"].shape[1]
    dt_in, b, c = lin(u, p[pre + "x_proj.weight"]).split([r, d_state, d_state], dim=-1)
    delta = torch.nn.functional.softplus(lin(dt_in, p[pre + "dt_proj.weight"], p[pre + "dt_proj.bias"]))
    a = -torch.exp(p[pre + "A_log"])
    h = torch.zeros(x.shape[0], u.shape[-1], d_state, dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(delta[:, t, :, None] * a) * h + (delta[:, t] * u[:, t])[..., None] * b[:, t, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, c[:, t]))
    y = (torch.stack(ys, 1) + p[pre + "D"] * u) * torch.nn.functional.silu(z)
    return x + lin(y, p[pre + "out_proj.weight"])


def torch_rope(x: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (base 10000) on (batch, heads, time, head_dim) from position 0."""
    half = x.shape[-1] // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=x.dtype) / half)
    ang = torch.arange(x.shape[2], dtype=x.dtype)[:, None] * freqs
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def torch_attention_block(p: dict, pre: str, x: torch.Tensor, heads: int, window: int | None) -> torch.Tensor:
    lin = torch.nn.functional.linear
    b, t, d = x.shape
    qkv = lin(torch_rms(x, p[pre + "norm1.weight"]), p[pre + "qkv.weight"])
    q, k, v = qkv.view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    lag = torch.arange(t)[:, None] - torch.arange(t)[None]
    keep = (lag >= 0) & (lag < (window or t))
    a = torch.nn.functional.scaled_dot_product_attention(torch_rope(q), torch_rope(k), v, attn_mask=keep)
    x = x + lin(a.transpose(1, 2).reshape(b, t, d), p[pre + "out.weight"])
    f = torch.nn.functional.gelu(
        lin(torch_rms(x, p[pre + "norm2.weight"]), p[pre + "ffn_in.weight"], p[pre + "ffn_in.bias"])
    )
    return x + lin(f, p[pre + "ffn_out.weight"], p[pre + "ffn_out.bias"])


@pytest.mark.parametrize("scan", ["sequential", "chunked"])
def test_mamba_core_matches_torch(scan):
    cfg = BackboneConfig(kind="mamba", d_state=4, chunk=4)
    mx.random.seed(6)
    core = MambaCore(cfg, 8, num_layers=2, scan=scan)
    randomize(core, 6, 0.4)
    p = torch_params(core)
    x = mx.random.normal((2, 9, 8))
    ref = torch.tensor(m2n(x), dtype=torch.float64)
    for k in range(2):
        ref = torch_mamba_block(p, f"layers.{k}.", ref, cfg.d_state)
    ref = torch_rms(ref, p["norm.weight"])
    np.testing.assert_allclose(m2n(core(x)[0]), ref.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 3])
def test_attention_core_matches_torch(window):
    cfg = BackboneConfig(kind="attention", heads=2, window=window)
    mx.random.seed(7)
    core = AttentionCore(cfg, 8, num_layers=2)
    randomize(core, 7, 0.4)
    p = torch_params(core)
    x = mx.random.normal((2, 9, 8))
    ref = torch.tensor(m2n(x), dtype=torch.float64)
    for k in range(2):
        ref = torch_attention_block(p, f"layers.{k}.", ref, cfg.heads, window)
    ref = torch_rms(ref, p["norm.weight"])
    np.testing.assert_allclose(m2n(core(x)[0]), ref.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 3])
def test_attention_causal_and_window(window):
    cfg = BackboneConfig(kind="attention", heads=2, window=window)
    mx.random.seed(4)
    core = AttentionCore(cfg, 8, num_layers=2)
    randomize(core, 4)
    x = mx.random.normal((1, 14, 8))
    y = m2n(core(x)[0])
    x2 = x.at[:, 6].add(1.0)  # change frame 6
    y2 = m2n(core(x2)[0])
    np.testing.assert_array_equal(y2[:, :6], y[:, :6])  # the past never sees the future
    assert np.abs(y2[:, 6] - y[:, 6]).max() > 1e-3
    # two layers of window 3 reach back 2 * (3 - 1) = 4 frames: frame 10 sees frame 6, 11 does not
    assert np.abs(y2[:, 10] - y[:, 10]).max() > 1e-4
    later = np.abs(y2[:, 11:] - y[:, 11:]).max()
    if window is None:
        assert later > 1e-4
    else:
        assert later < 1e-6


def test_attention_window_keeps_bounded_cache():
    cfg = BackboneConfig(kind="attention", heads=2, window=3)
    core = AttentionCore(cfg, 8, num_layers=1)
    state = None
    for _ in range(6):
        _, state = core(mx.random.normal((1, 1, 8)), state)
    pos, caches = state
    assert pos.item() == 6 and caches[0][0].shape[2] == 2


@pytest.mark.parametrize("name", list(KINDS))
def test_gradients_are_finite_and_nonzero(name):
    bb = make_backbone(name, seed=5)
    x = mx.random.normal((2, 7, 8))

    def loss(model, x):
        return (model(x)[0] ** 2).mean()

    _, grads = nn.value_and_grad(bb, loss)(bb, x)
    flat = tree_flatten(grads)
    assert flat and all(np.isfinite(m2n(g)).all() for _, g in flat)
    assert np.abs(m2n(dict(flat)["linear_in.weight"])).max() > 0


def test_make_core_and_param_count():
    assert isinstance(make_core(BackboneConfig(kind="gru"), 8, 2), GRUCore)
    with pytest.raises(ValueError):
        make_core(dataclasses.replace(BackboneConfig(), kind="lstm"), 8)
    gru = GRUCore(8, num_layers=2)
    assert param_count(gru) == sum(p.numel() for p in torch.nn.GRU(8, 8, num_layers=2).parameters())


@pytest.mark.parametrize("window", [None, 3])
def test_attention_matches_mlx_fused_values_and_gradients(window):
    """The base-2 softmax attention (CPU, several queries) against mx.fast's, causal and windowed."""
    mx.random.seed(0)
    q, k, v = (mx.random.normal((2, 3, 9, 8)) * 2 for _ in range(3))
    lag = mx.arange(9)[:, None] - mx.arange(9)[None]
    mask = (lag >= 0) & (lag < (window or 9))
    w = mx.random.normal(q.shape)

    def loss(fn, *a):
        return (fn(*a) * w).sum()

    def fused(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=8**-0.5, mask=mask)

    def ours(q, k, v):
        return attention(q, k, v, 8**-0.5, mask)

    np.testing.assert_allclose(m2n(ours(q, k, v)), m2n(fused(q, k, v)), atol=1e-5)
    got = mx.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q, k, v)
    want = mx.grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(m2n(g), m2n(r), atol=1e-4)


@pytest.mark.parametrize("t,cached,window", [(10, 0, 3), (7, 5, 3), (9, 1, 4), (8, 0, 8), (12, 30, 5)])
def test_windowed_attention_in_blocks_equals_masked_full(t, cached, window):
    mx.random.seed(t + cached)
    q = mx.random.normal((2, 3, t, 8))
    k, v = (mx.random.normal((2, 3, cached + t, 8)) for _ in range(2))
    lag = (cached + mx.arange(t))[:, None] - mx.arange(cached + t)[None]
    full = attention(q, k, v, 0.3, (lag >= 0) & (lag < window))
    np.testing.assert_allclose(m2n(windowed_attention(q, k, v, 0.3, window, cached)), m2n(full), atol=1e-5)
