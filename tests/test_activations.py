"""The rational tanh, sigmoid and GELU and the base-2 softplus against float64 references: values,
derivatives, dtypes."""

from dfn4lab import activations as act

import mlx.core as mx
import numpy as np
import pytest

X = np.concatenate([np.linspace(-30, 30, 600_001), [0.0, 1e-8, -1e-8, 1e4, -1e4]]).astype(np.float32)


def _ref(name: str, x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return np.tanh(x) if name == "tanh" else 0.5 + 0.5 * np.tanh(0.5 * x)  # no overflow


@pytest.mark.parametrize("name,tol", [("tanh", 4e-7), ("sigmoid", 3e-7)])
@pytest.mark.parametrize("fuse", [False, True])
def test_values_match_float64(name, tol, fuse):
    y = np.array(getattr(act, name)(mx.array(X), fuse=fuse))
    err = np.abs(y - _ref(name, X))
    assert err.max() < tol, (X[err.argmax()], err.max())
    # bounded as the functions are
    lo, hi = (-1.0, 1.0) if name == "tanh" else (0.0, 1.0)
    assert y.min() >= lo and y.max() <= hi


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_gradient_is_the_exact_derivative(name):
    x = mx.array(X[::7])
    g = np.array(mx.grad(lambda v: getattr(act, name)(v).sum())(x))
    r = _ref(name, X[::7])
    want = 1 - r * r if name == "tanh" else r * (1 - r)
    np.testing.assert_allclose(g, want, atol=1e-6)
    gc = np.array(mx.compile(mx.grad(lambda v: getattr(act, name)(v).sum()))(x))
    np.testing.assert_allclose(gc, want, atol=1e-6)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_low_precision_keeps_its_dtype(dtype):
    x = mx.array(X[::97]).astype(dtype)
    for name in ("tanh", "sigmoid"):
        y = getattr(act, name)(x)
        assert y.dtype == dtype
        g = mx.grad(lambda v, n=name: getattr(act, n)(v).astype(mx.float32).sum())(x)
        assert g.dtype == dtype
        tol = 1e-2 if dtype == mx.bfloat16 else 2e-3
        ref = _ref(name, np.array(x.astype(mx.float32)))
        assert np.abs(np.array(y.astype(mx.float32)) - ref).max() < tol


def test_small_arrays_use_mlx_own():
    x = mx.array(X[: act.SMALL - 1])
    np.testing.assert_array_equal(np.array(act.tanh(x)), np.array(mx.tanh(x)))
    np.testing.assert_array_equal(np.array(act.sigmoid(x)), np.array(mx.sigmoid(x)))


def test_softplus_matches_float64_with_the_sigmoid_as_derivative():
    x = X[::3]
    ref = np.logaddexp(x.astype(np.float64), 0.0)
    y = np.array(act.softplus(mx.array(x)))
    assert np.all(np.abs(y - ref) <= 2e-6 * np.maximum(1.0, np.abs(ref)))
    g = np.array(mx.grad(lambda v: act.softplus(v).sum())(mx.array(x)))
    np.testing.assert_allclose(g, _ref("sigmoid", x), atol=1e-6)
    half = act.softplus(mx.array(x[::50]).astype(mx.float16))
    assert half.dtype == mx.float16


def test_gelu_matches_float64_with_its_exact_derivative():
    from scipy.special import erf

    x = X[::3]
    x64 = x.astype(np.float64)
    cdf = 0.5 * (1 + erf(x64 / np.sqrt(2)))
    y = np.array(act.gelu(mx.array(x)))
    assert np.all(np.abs(y - x64 * cdf) <= 3e-7 * np.maximum(1.0, np.abs(x64)))
    want = cdf + x64 * np.exp(-0.5 * x64 * x64) / np.sqrt(2 * np.pi)
    for grad in (mx.grad(lambda v: act.gelu(v).sum()), mx.compile(mx.grad(lambda v: act.gelu(v).sum()))):
        np.testing.assert_allclose(np.array(grad(mx.array(x))), want, atol=1e-6)
    half = act.gelu(mx.array(x[::50]).astype(mx.bfloat16))
    assert half.dtype == mx.bfloat16
