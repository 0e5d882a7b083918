"""DFN4 extras: each is a config switch that works offline, streams exactly and trains (finite gradients)."""

from __future__ import annotations

import dfn4lab  # noqa: F401
from dfn4lab import inference
from dfn4lab.config import preset
from dfn4lab.model import DfNet

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import model_inputs, tiny_cfg
from mlx.utils import tree_flatten

T = 12  # frames of the test inputs
EXTRAS = {
    "multires_df": {"multires_df": ((48, 3), (24, 2))},
    "adaptive_order": {"adaptive_order": True},
    "hybrid_encoder": {"hybrid_encoder": True},
    "complex_gain": {"complex_gain": True},
    "mask_pf": {"mask_pf": True, "pf_beta": 0.05},
    "running_stats": {"running_stats": True},
    "lsnr_dropout": {"lsnr_dropout": True},
}


def _model(**extra) -> DfNet:
    model = inference.build(tiny_cfg(backbone={"kind": "gru", "heads": 2}, **extra))
    model.eval()
    return model


@pytest.mark.parametrize("name", sorted(EXTRAS))
def test_extra_changes_output_and_streams_exactly(name):
    mx.random.seed(0)
    base = _model()
    mx.random.seed(0)
    model = _model(**EXTRAS[name])
    x = model_inputs(model.cfg, T)
    if name == "running_stats":  # fresh statistics are the identity: learn some first
        model.train()
        model(*x)
        model.eval()
    offline = model(*x)[0]
    if name != "lsnr_dropout":  # a training-time switch: inference is unchanged by design
        assert not np.allclose(np.array(offline), np.array(base(*x)[0]), atol=1e-6)
    state, outs = None, []
    for t0 in range(0, T, 5):
        y, state = model.step(*(a[:, t0 : t0 + 5] for a in x), state)
        outs.append(y)
    outs.append(model.flush(state))
    np.testing.assert_allclose(np.array(mx.concatenate(outs, axis=1)), np.array(offline), atol=1e-5)


@pytest.mark.parametrize("name", sorted(EXTRAS))
def test_extra_trains(name):
    model = _model(**EXTRAS[name])
    model.train()
    spec, erb, dfs = model_inputs(model.cfg, T)

    def loss(m):
        return mx.mean(mx.abs(m(spec, erb, dfs)[0] - spec))

    value, grads = nn.value_and_grad(model, loss)(model)
    flat = [g for _, g in tree_flatten(grads)]
    assert np.isfinite(value.item()) and all(np.isfinite(np.array(g)).all() for g in flat)


def test_lsnr_dropout_silences_noise_frames_in_training():
    model = _model(lsnr_dropout=True)
    model.enc.lsnr_fc.bias = mx.array([-50.0])  # every frame predicted far below -10 dB
    x = model_inputs(model.cfg, T)
    model.train()
    assert float(mx.abs(model(*x)[0]).max()) == 0.0
    model.eval()
    assert float(mx.abs(model(*x)[0]).max()) > 0.0


def test_adaptive_order_tap_weights():
    model = _model(adaptive_order=True)
    c = mx.array(np.random.default_rng(0).standard_normal((1, 5, 32)).astype(np.float32))
    w = np.array(model.df_dec._tap_weights(c))
    order, la = model.cfg.df_order, model.cfg.df_lookahead
    assert w.shape == (1, 5, order)
    np.testing.assert_allclose(w[..., -1], 1.0, atol=1e-6)  # the newest tap is always used
    assert (np.diff(w, axis=-1) >= -1e-7).all()  # older taps are never kept more than newer ones
    assert la < order
    # tap k (oldest first) is kept with P(order >= order - k), from the softmax over orders 1..N
    fc = model.df_dec.order_fc
    logits = np.array(c) @ np.array(fc.weight).T + np.array(fc.bias)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(
        w, [[[p[0, t, order - k - 1 :].sum() for k in range(order)] for t in range(5)]], atol=1e-6
    )


def test_complex_gain_is_a_one_tap_filter():
    model = _model(complex_gain=True)
    assert model.df_history == 0
    x = model_inputs(model.cfg, T)
    spec_e, _, _, coefs = model(*x)
    assert coefs.shape[-1] == 2
    nb_df = model.cfg.dsp.nb_df

    def cplx(a: mx.array) -> np.ndarray:
        a = np.array(a)
        return a[..., 0] + 1j * a[..., 1]

    # each DF bin is its complex gain times the same frame's bin
    np.testing.assert_allclose(cplx(spec_e[:, :, :nb_df]), cplx(coefs) * cplx(x[0][:, :, :nb_df]), atol=1e-5)


def test_running_stats_update_in_training_only():
    model = _model(running_stats=True)
    x = model_inputs(model.cfg, T)
    before = np.array(model.enc.erb_stats.running_mean)
    model(*x)
    np.testing.assert_array_equal(np.array(model.enc.erb_stats.running_mean), before)
    model.train()
    model(*x)
    assert not np.allclose(np.array(model.enc.erb_stats.running_mean), before)


def test_dfn4_presets_build_and_run():
    for name in ("dfn4", "dfn4-lite"):
        model = inference.build(preset(name))
        model.eval()
        out = model(*model_inputs(model.cfg, 6))[0]
        assert out.shape == (2, 6, 481, 2) and np.isfinite(np.array(out)).all()
