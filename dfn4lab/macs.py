"""Multiply-accumulates of MLX models, counted by tracing: ``count_macs(fn)``, ``model_macs(model)``.

While ``fn`` builds its lazy graph, the matmul, einsum, convolution and attention functions of
``mlx.core`` are wrapped to add up ``output size x contracted size`` from their operand shapes;
nothing is evaluated. A ``ConvBlock`` counts as the grouped convolution it computes, not as its
implementation (a dense block-diagonal conv or element-wise taps). Element-wise work (activations,
normalisation, the deep filter, scans) is not counted, as in ptflops and thop. Attention counts the
(query, key) pairs its boolean mask keeps: a causal kernel computes those, not the masked rest. The
GRU time loops run as MLX ops meanwhile (not :mod:`dfn4lab.kernels`), so their matmuls are seen.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

from dfn4lab import backbones, kernels
from dfn4lab.layers import ConvBlock
from dfn4lab.model import DfNet

import mlx.core as mx


def count_macs(fn: Callable[[], object]) -> int:
    """Multiply-accumulates of the matmuls, einsums, convolutions and attention that ``fn`` builds
    (compilation is switched off meanwhile, so compiled functions run as Python and are seen)."""
    total = [0]
    with _counting(total):
        fn()
    return total[0]


@contextlib.contextmanager
def _counting(total: list[int]) -> Iterator[None]:
    depth = [0]  # > 0 inside a ConvBlock: its own ops are not counted again

    def add(n: int) -> None:
        if depth[0] == 0:
            total[0] += int(n)

    def matmul(orig):
        def f(a, b, *args, **kw):
            out = orig(a, b, *args, **kw)
            add(out.size * a.shape[-1])
            return out

        return f

    def addmm(orig):
        def f(c, a, b, *args, **kw):
            out = orig(c, a, b, *args, **kw)
            add(out.size * a.shape[-1])
            return out

        return f

    def conv(orig):
        def f(x, w, *args, **kw):  # MLX weights (out, *kernel, in / groups)
            out = orig(x, w, *args, **kw)
            add(out.size * math.prod(w.shape[1:]))
            return out

        return f

    def conv_transpose(orig):
        def f(x, w, *args, **kw):
            out = orig(x, w, *args, **kw)
            add(x.size // x.shape[-1] * w.size)
            return out

        return f

    def einsum(orig):
        def f(subscripts, *ops, **kw):
            out = orig(subscripts, *ops, **kw)
            add(out.size * _contracted_size(subscripts, ops))
            return out

        return f

    def attention_macs(q: mx.array, k: mx.array, v: mx.array, mask: object) -> int:
        """q (batch, heads, tq, d), k/v (batch, heads, tk, d): d_q + d_v per (query, key) pair the mask
        keeps; a causal mask keeps about half, which a causal kernel computes (not the masked rest)."""
        pairs = q.shape[1] * q.shape[2] * k.shape[2]
        if isinstance(mask, mx.array) and mask.dtype == mx.bool_:
            pairs = int(mx.broadcast_to(mask, (q.shape[1], q.shape[2], k.shape[2])).sum())
        return q.shape[0] * pairs * (q.shape[3] + v.shape[3])

    def sdpa(orig):
        def f(q, k, v, *args, **kw):
            out = orig(q, k, v, *args, **kw)
            add(attention_macs(q, k, v, kw.get("mask", args[1] if len(args) > 1 else None)))
            return out

        return f

    def softmax_attention(orig):  # backbones.attention: its matmuls run over masked pairs too
        def f(q, k, v, scale, mask):
            depth[0] += 1
            try:
                out = orig(q, k, v, scale, mask)
            finally:
                depth[0] -= 1
            add(attention_macs(q, k, v, mask))
            return out

        return f

    orig_block = ConvBlock.__call__

    def block(self, x, state=None):
        depth[0] += 1
        try:
            y, state = orig_block(self, x, state)
        finally:
            depth[0] -= 1
        k = self.kt * self.kf
        if self.transposed:
            add(x.size * (self.out_ch // self.groups) * k)
        else:
            add(y.size * (self.in_ch // self.groups) * k)
        if self.has_pointwise:
            add(y.size * self.out_ch)
        return y, state

    patches = [(mx, n, matmul) for n in ("matmul",)] + [
        (mx.array, "__matmul__", matmul),
        (mx, "addmm", addmm),
    ]
    patches += [(mx, n, conv) for n in ("conv1d", "conv2d", "conv3d", "conv_general")]
    patches += [(mx, n, conv_transpose) for n in ("conv_transpose1d", "conv_transpose2d")]
    patches += [(mx, "einsum", einsum), (mx.fast, "scaled_dot_product_attention", sdpa)]
    patches += [(backbones, "attention", softmax_attention)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    mx.disable_compile()
    try:
        for obj, name, wrap in patches:
            setattr(obj, name, wrap(getattr(obj, name)))
        ConvBlock.__call__ = block
        with kernels.disabled():  # the fused loops are one C++ op each: count the MLX loops' matmuls
            yield
    finally:
        for obj, name, orig in saved:
            setattr(obj, name, orig)
        ConvBlock.__call__ = orig_block
        mx.enable_compile()


def _contracted_size(subscripts: str, operands: Sequence[mx.array]) -> int:
    """Product of the sizes of the indices an einsum sums over (those absent from its output)."""
    inputs, arrow, output = subscripts.replace(" ", "").partition("->")
    if not arrow:  # implicit output: the indices that appear once, in alphabetical order
        output = "".join(sorted(c for c in set(inputs) if c.isalpha() and inputs.count(c) == 1))
    sizes: dict[str, int] = {}
    for spec, op in zip(inputs.split(","), operands, strict=True):
        named = spec.replace("...", "")
        dims = op.shape[len(op.shape) - len(named) :] if spec.startswith("...") else op.shape[: len(named)]
        sizes.update(zip(named, dims, strict=True))
    return math.prod(sizes[c] for c in sizes if c not in output)


def model_macs(model: DfNet, seconds: float = 1.0) -> int:
    """Multiply-accumulates of ``model`` over ``seconds`` of audio (offline forward, ``count_macs``)."""
    d = model.cfg.dsp
    t = round(seconds * d.sr / d.hop_size)
    spec = mx.zeros((1, t, d.freq_bins, 2))
    feat_erb, feat_spec = mx.zeros((1, t, d.nb_erb)), mx.zeros((1, t, d.nb_df, 2))
    return count_macs(lambda: model(spec, feat_erb, feat_spec))
