"""DfNet: stateful step == offline forward for every backbone; the ops against upstream's definitions."""

from __future__ import annotations

import json

import dfn4lab  # noqa: F401
from dfn4lab import inference
from dfn4lab.backbones import param_count
from dfn4lab.config import ModelConfig, preset
from dfn4lab.layers import BatchNorm, ConvBlock, deep_filter

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from conftest import model_inputs, tiny_cfg


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"conv_lookahead": 1}, r"df_lookahead=2 must be in .* = 0\.\.1"),
        ({"df_order": 2}, r"df_lookahead=2 must be in .* = 0\.\.1"),
        ({"df_lookahead": -1}, "df_lookahead=-1"),
        ({"convt_kernel": (1, 5)}, r"convt_kernel=\(1, 5\)"),
        # streamed frames kept no history of a longer inner conv: stream and offline differed by 0.07
        ({"conv_kernel": (2, 3)}, r"conv_kernel=\(2, 3\): only one frame"),
        ({"conv_kernel": (1, 2)}, "odd in frequency"),
        ({"dsp": {"nb_erb": 30}}, "nb_erb=30 must divide by 8"),
        ({"emb_num_layers": 1}, r"emb_num_layers >= 2"),  # an ERB decoder of 0 recurrent layers, silently
        ({"df_num_layers": 0, "lsnr_min": 40.0}, r"df_num_layers >= 1.*lsnr_min < lsnr_max"),
        ({"df_gru_skip": "groupedlinaer"}, "none, identity or groupedlinear"),  # a typo: no skip, silently
        ({"df_gru_skip": "identity"}, "df_hidden_dim must equal it"),
        # a ZeroDivisionError, a broadcast error or (d_state 0, pf_beta < 0) a silently useless model, before
        ({"backbone": {"kind": "gur"}}, "backbone kind 'gur': one of gru, mamba, attention"),
        ({"backbone": {"heads": 0}}, r"backbone sizes must be >= 1.*'heads': 0"),
        ({"backbone": {"d_state": 0}}, r"backbone sizes must be >= 1.*'d_state': 0"),
        ({"backbone": {"scan": "parallel"}}, "sequential or chunked"),
        ({"conv_ch": 0}, r"model sizes must be >= 1.*'conv_ch': 0"),
        ({"dsp": {"norm_tau": 0}}, "norm_tau > 0"),
        ({"dsp": {"nb_df": 600}}, r"nb_df \(600\) <= the 481 frequency bins"),
        ({"pf_beta": -1.0}, "pf_beta=-1.0 and atten_lim_db=None must be >= 0"),
        ({"atten_lim_db": -5.0}, "atten_lim_db=-5.0 must be >= 0"),
        ({"conv_kernel_inp": [3, 3, 3]}, r"ModelConfig.conv_kernel_inp must hold 2 values"),
        ({"multires_df": [[48]]}, r"ModelConfig.multires_df(\[0\])? must hold 2 values, got \[48\]"),
    ],
)
def test_config_rejects_what_the_network_cannot_run(overrides, match):
    """One ValueError when the config is made (in code or from a JSON file), not a shape error (or a
    crash of the C++ stream) later."""
    with pytest.raises(ValueError, match=match):
        preset("dfn3", **overrides)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_json(json.dumps({**ModelConfig().to_dict(), **overrides}))
    preset("dfn3", conv_lookahead=0, df_lookahead=0, df_order=1)  # the extremes that are valid


def test_from_ini_reads_dfn3_and_refuses_what_it_cannot_build(tmp_path):
    from dfn4lab import convert
    from dfn4lab.config import from_ini

    ini = (convert.extract_official(tmp_path) / "config.ini").read_text()
    (tmp_path / "ok.ini").write_text(ini.replace("[deepfilternet]", "[deepfilternet]\npf_beta = 0.1"))
    assert from_ini(tmp_path / "ok.ini") == preset("dfn3", pf_beta=0.1)  # the official one, pf_beta read
    (tmp_path / "run.json").write_text('{"preset": "dfn3"}')  # not an INI: configparser's own error, before
    with pytest.raises(ValueError, match=r"run.json: not an INI file \(File contains no section headers"):
        from_ini(tmp_path / "run.json")
    cases = {
        "df_pathway_kernel_size_t = 5\n": (r"\[deepfilternet\] lacks df_pathway_kernel_size_t", ""),
        "model = deepfilternet3": ("only deepfilternet3 configs", "model = deepfilternet2"),
        "emb_gru_skip = none": (
            "emb_gru_skip = groupedlinear is not implemented",
            "emb_gru_skip = groupedlinear",
        ),
        # each was read as the official network, silently
        "dfop_method = df": ("dfop_method = real_unfold is not implemented", "dfop_method = real_unfold"),
        "mask_only = false": ("mask_only = True is not implemented", "mask_only = true"),
        "emb_gru_skip = none\n": (
            "emb_gru_skip_enc = groupedlinear",
            "emb_gru_skip = none\nemb_gru_skip_enc = groupedlinear\n",
        ),
    }
    for i, (old, (message, new)) in enumerate(cases.items()):
        assert old in ini, old
        (tmp_path / f"bad{i}.ini").write_text(ini.replace(old, new))
        with pytest.raises(ValueError, match=message):
            from_ini(tmp_path / f"bad{i}.ini")


def test_summary_leaves_batchnorm_statistics_alone():
    from dfn4lab.model import summary

    from mlx.utils import tree_flatten

    model = inference.build(tiny_cfg())  # fresh: in training mode
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    table = summary(model)
    assert model.training
    lines = table.splitlines()
    counts = [int(line.split()[-1].replace(",", "")) for line in lines[1 : next(
        i for i, line in enumerate(lines) if line.startswith("total")
    ) + 1]]  # fmt: skip
    parts, total = counts[:-1], counts[-1]
    assert sum(parts) == total == param_count(model)  # the rows add up to the total
    for k, v in tree_flatten(model.parameters()):
        np.testing.assert_array_equal(np.array(v), before[k], err_msg=k)


def test_dfn4_heads_keep_their_lookahead_and_sizes_are_checked():
    from dfn4lab.model import df_heads

    cfg = preset("dfn4", complex_gain=True)  # the main head becomes a gain; the extra heads stay filters
    assert df_heads(cfg) == [(96, 1, 0), (48, 3, 2), (24, 2, 1)]
    with pytest.raises(ValueError, match=r"multires_df head \(128, 2\)"):
        preset("dfn3", multires_df=((128, 2),))


@pytest.mark.parametrize("backbone", ["gru", "mamba", "attention"])
@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_step_equals_offline(backbone, chunk):
    cfg = tiny_cfg(backbone=backbone)
    model = inference.build(cfg)
    model.eval()
    spec, erb, dfs = model_inputs(cfg, 16)
    offline = np.array(model(spec, erb, dfs)[0])
    state, outs = None, []
    for t0 in range(0, 16, chunk):
        y, state = model.step(
            spec[:, t0 : t0 + chunk], erb[:, t0 : t0 + chunk], dfs[:, t0 : t0 + chunk], state
        )
        outs.append(y)
    outs.append(model.flush(state))
    streamed = np.array(mx.concatenate(outs, axis=1))
    assert streamed.shape == offline.shape
    np.testing.assert_allclose(streamed, offline, atol=1e-5)


def _random_bn(block: ConvBlock, seed: int) -> None:
    """Trained-looking BatchNorm statistics, so eval mode's folding of them is tested."""
    rng = np.random.default_rng(seed)
    n = block.out_ch
    block.bn.weight = mx.array(rng.uniform(0.5, 2.0, n).astype(np.float32))
    block.bn.bias = mx.array(rng.standard_normal(n).astype(np.float32))
    block.bn.running_mean = mx.array(rng.standard_normal(n).astype(np.float32))
    block.bn.running_var = mx.array(rng.uniform(0.1, 3.0, n).astype(np.float32))


def _torch_bn(y: torch.Tensor, block: ConvBlock) -> torch.Tensor:
    """Eval BatchNorm on (batch, channels, time, freq)."""
    bn = block.bn
    mean, var, w, b = (
        torch.from_numpy(np.array(a)) for a in (bn.running_mean, bn.running_var, bn.weight, bn.bias)
    )
    return torch.nn.functional.batch_norm(y, mean, var, w, b, training=False, eps=bn.eps)


@pytest.mark.parametrize(
    "in_ch,out_ch,kernel,fstride",
    [
        (1, 8, (3, 3), 1),
        (2, 8, (3, 3), 1),
        (8, 8, (1, 3), 2),
        (8, 4, (5, 1), 1),
        (8, 1, (1, 3), 1),
        (2, 8, (1, 3), 2),
        (4, 6, (1, 5), 1),
        (8, 8, 1, 1),
    ],
)
def test_conv_block_matches_torch(in_ch, out_ch, kernel, fstride):
    block = ConvBlock(in_ch, out_ch, kernel, fstride=fstride, act=None)
    _random_bn(block, 0)
    block.eval()
    x = np.random.default_rng(1).standard_normal((2, 6, 16, in_ch)).astype(np.float32)
    y, _ = block(mx.array(x))
    kt, kf = (kernel, kernel) if isinstance(kernel, int) else kernel
    xt = torch.nn.functional.pad(torch.from_numpy(x).permute(0, 3, 1, 2), (0, 0, kt - 1, 0))
    ref = torch.nn.functional.conv2d(
        xt,
        torch.from_numpy(np.array(block.weight)),
        stride=(1, fstride),
        padding=(0, kf // 2),
        groups=block.groups,
    )
    if block.has_pointwise:
        ref = torch.nn.functional.conv2d(ref, torch.from_numpy(np.array(block.pointwise)))
    ref = _torch_bn(ref, block).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.array(y), ref, atol=1e-4, rtol=1e-5)
    block.train()  # the unfolded path (BatchNorm on its running statistics) gives the same
    block.bn.eval()
    np.testing.assert_allclose(np.array(block(mx.array(x))[0]), ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_is_mlx_batch_norm(affine):
    x = mx.array((np.random.default_rng(5).standard_normal((3, 7, 5, 6)) * 2 + 1).astype(np.float32))
    ours, ref = BatchNorm(6, affine=affine), nn.BatchNorm(6, affine=affine)
    if affine:
        ours.weight = ref.weight = mx.linspace(0.5, 2.0, 6)
        ours.bias = ref.bias = mx.linspace(-1.0, 1.0, 6)
    compiled = mx.compile(ours, inputs=ours.state, outputs=ours.state)
    for fn in (ours, compiled, compiled):  # training: batch statistics, running statistics updated
        np.testing.assert_allclose(np.array(fn(x)), np.array(ref(x)), atol=1e-5)
        np.testing.assert_allclose(np.array(ours.running_var), np.array(ref.running_var), atol=1e-6)
        np.testing.assert_allclose(np.array(ours.running_mean), np.array(ref.running_mean), atol=1e-6)
    ours.eval(), ref.eval()
    np.testing.assert_allclose(np.array(ours(x)), np.array(ref(x)), atol=1e-5)
    ours.train()  # one value per channel: refused as MLX's is, not a NaN running variance
    with pytest.raises(ValueError, match="more than one value per channel"):
        ours(x[:1, :1, :1])


def test_conv_block_uses_weights_replaced_after_eval():
    block = ConvBlock(8, 8, (2, 3), act=None)
    block.eval()
    x = mx.array(np.random.default_rng(4).standard_normal((1, 3, 8, 8)).astype(np.float32))
    y = np.array(block(x)[0])
    block.weight = 2 * block.weight  # as load_weights would: a new array, no eval() after it
    np.testing.assert_allclose(np.array(block(x)[0]), 2 * y, atol=1e-5)
    block.bn.running_mean = block.bn.running_mean + 1.0
    assert not np.allclose(np.array(block(x)[0]), 2 * y, atol=1e-3)


@pytest.mark.parametrize("kf,stride", [(3, 2), (3, 1), (5, 1), (5, 3)])
def test_transposed_conv_matches_torch(kf, stride):
    block = ConvBlock(8, 8, (1, kf), fstride=stride, transposed=True, act=None)
    _random_bn(block, 1)
    block.eval()
    x = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    y, _ = block(mx.array(x))
    p = kf // 2  # upstream's padding and output padding
    conv = torch.nn.ConvTranspose2d(
        8, 8, (1, kf), stride=(1, stride), padding=(0, p), output_padding=(0, p if stride > 1 else 0),
        groups=8, bias=False,
    )  # fmt: skip
    conv.weight.data = torch.from_numpy(np.array(block.weight))
    ref = conv(torch.from_numpy(x).permute(0, 3, 1, 2))
    ref = _torch_bn(torch.nn.functional.conv2d(ref, torch.from_numpy(np.array(block.pointwise))), block)
    np.testing.assert_allclose(np.array(y), ref.detach().permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=1e-5)


def test_deep_filter_matches_upstream_einsum():
    rng = np.random.default_rng(3)
    order, la, t, f = 5, 2, 9, 6
    spec = rng.standard_normal((1, t, f, 2)).astype(np.float32)
    coefs = rng.standard_normal((1, t, f, order * 2)).astype(np.float32)
    frames = mx.pad(mx.array(spec), [(0, 0), (order - 1 - la, la), (0, 0), (0, 0)])
    ours = np.array(deep_filter(frames, mx.array(coefs), order))
    # upstream multiframe.DF: pad, unfold over time, einsum "...tfn,...ntf->...tf" with complex coefs
    sc = torch.view_as_complex(torch.from_numpy(spec))
    su = torch.nn.functional.pad(sc, (0, 0, order - 1 - la, la)).unfold(1, order, 1)  # (1, t, f, n)
    cc = torch.view_as_complex(torch.from_numpy(coefs).view(1, t, f, order, 2)).permute(0, 3, 1, 2)
    ref = torch.view_as_real(torch.einsum("btfn,bntf->btf", su, cc)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
