"""The official DeepFilterNet3 weights in MLX: per-stage parity with onnxruntime on the official graphs."""

from __future__ import annotations

import dfn4lab  # noqa: F401
from dfn4lab import convert
from dfn4lab.backbones import param_count
from dfn4lab.model import DfNet

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import onnxruntime as ort  # a dependency: a broken install fails here, it does not skip the oracle
import pytest

TOL = 1e-4


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    folder = convert.extract_official(tmp_path_factory.mktemp("dfn3"))
    cfg, weights = convert.official_dfn3_weights(folder)
    from dfn4lab import dsp

    model = DfNet(cfg, np.array(dsp.erb_fb(cfg.dsp, inverse=True)))
    convert.load_weights(model, weights)
    model.eval()
    sessions = {s: ort.InferenceSession(str(folder / f"{s}.onnx")) for s in ("enc", "erb_dec", "df_dec")}
    return model, sessions, weights


def _features(t: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Plausible normalised features: ERB in about [-1, 0.5], unit-normed complex around 0."""
    rng = np.random.default_rng(seed)
    erb = (rng.standard_normal((1, t, 32)) * 0.3 - 0.4).astype(np.float32)
    spec = (rng.standard_normal((1, t, 96, 2)) * 0.5).astype(np.float32)
    return erb, spec


def _nchw(x: mx.array) -> np.ndarray:
    """(batch, time, freq, ch) -> (batch, ch, time, freq) as upstream/ONNX lay it out."""
    return np.array(x).transpose(0, 3, 1, 2)


def test_every_parameter_holds_its_official_weight(official):
    model, _, weights = official
    from mlx.utils import tree_flatten

    own = dict(tree_flatten(model.parameters()))
    assert set(own) == set(weights)  # each parameter read from the graphs, none left at its initial value
    for k, v in own.items():
        np.testing.assert_array_equal(np.array(v), weights[k], err_msg=k)
    # DFN3 has ~2.1 M parameters (published); BatchNorm statistics are state, not counted.
    n = sum(v.size for v in own.values())
    assert 2.0e6 < param_count(model) < 2.2e6 and n - param_count(model) == sum(
        m.running_mean.size + m.running_var.size for m in model.modules() if isinstance(m, nn.BatchNorm)
    )


@pytest.mark.parametrize("t", [1, 7, 50])
def test_stages_match_onnxruntime(official, t):
    model, sess, _ = official
    erb, spec = _features(t, seed=t)
    ref = sess["enc"].run(None, {"feat_erb": erb[:, None], "feat_spec": spec.transpose(0, 3, 1, 2)})
    names = ["e0", "e1", "e2", "e3", "emb", "c0", "lsnr"]
    ref = dict(zip(names, ref, strict=True))
    e0, e1, e2, e3, emb, c0, lsnr, _ = model.enc(mx.array(erb)[..., None], mx.array(spec))
    ours = {"e0": e0, "e1": e1, "e2": e2, "e3": e3, "c0": c0}
    for k, v in ours.items():
        np.testing.assert_allclose(_nchw(v), ref[k], atol=TOL, err_msg=k)
    np.testing.assert_allclose(np.array(emb), ref["emb"], atol=TOL, err_msg="emb")
    np.testing.assert_allclose(np.array(lsnr), ref["lsnr"], atol=TOL, err_msg="lsnr")

    m_ref = sess["erb_dec"].run(None, {k: ref[k] for k in ("emb", "e3", "e2", "e1", "e0")})[0]
    m, _ = model.erb_dec(
        mx.array(ref["emb"]), *(mx.array(ref[k].transpose(0, 2, 3, 1)) for k in ("e3", "e2", "e1", "e0"))
    )
    np.testing.assert_allclose(_nchw(m), m_ref, atol=TOL, err_msg="mask")

    coefs_ref, alpha_ref = sess["df_dec"].run(None, {"emb": ref["emb"], "c0": ref["c0"]})
    (coefs,), alpha, _ = model.df_dec(mx.array(ref["emb"]), mx.array(ref["c0"].transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.array(coefs), coefs_ref, atol=TOL, err_msg="coefs")
    np.testing.assert_allclose(np.array(alpha), alpha_ref, atol=TOL, err_msg="alpha")


def test_a_damaged_weights_cache_is_converted_anew(tmp_path, monkeypatch, official):
    """A truncated cached conversion was an error on every run until the cache was found and deleted."""
    from dfn4lab import inference

    monkeypatch.setenv("DFN4LAB_CACHE", str(tmp_path))
    inference.load_pretrained()
    (weights,) = tmp_path.glob("pretrained/*/model.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="cached conversion .* is unreadable .*: converted anew"):
        model = inference.load_pretrained()
    got = dict(nn.utils.tree_flatten(model.parameters()))
    want = dict(nn.utils.tree_flatten(official[0].parameters()))
    assert got.keys() == want.keys() and all(mx.array_equal(got[k], want[k]).item() for k in got)
