"""The PyTorch twin (``dfn4lab.torch_ref``) against the MLX model, and torch <-> MLX weight conversion."""

from __future__ import annotations

import math

import dfn4lab  # noqa: F401
from dfn4lab import convert, inference, torch_ref
from dfn4lab.config import preset

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from conftest import model_inputs, tiny_cfg
from mlx.utils import tree_flatten

TOL = 1e-4
BACKBONES = {
    "gru": {"kind": "gru"},
    "mamba": {"kind": "mamba", "chunk": 8},  # several scan chunks, the last one partial
    "attention": {"kind": "attention", "heads": 2, "window": None},
    "attention-window": {"kind": "attention", "heads": 2, "window": 3},
}
CASES = [(p, b) for p in ("dfn3", "dfn4", "dfn4-lite") for b in BACKBONES]


def _cfg(name: str, backbone: str, **extra):
    return tiny_cfg(name, backbone=BACKBONES[backbone], **extra)


def _torch_model(cfg, seed: int = 0) -> torch_ref.DfNet:
    """Random weights, including BatchNorm statistics and every vector (norm gains, biases, D)."""
    torch.manual_seed(seed)
    net = torch_ref.DfNet(cfg)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
        for p in net.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return net.eval()


def _inputs(cfg, t: int = 20, batch: int = 2) -> tuple[np.ndarray, ...]:
    """``model_inputs`` as numpy, for both frameworks."""
    return tuple(np.array(x) for x in model_inputs(cfg, t, batch))


def _both(net: torch_ref.DfNet, model, x: tuple[np.ndarray, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    with torch.no_grad():
        ts = net(*map(torch.from_numpy, x))
    ms = model(*map(mx.array, x))
    return [(np.array(m), t.numpy()) for m, t in zip(ms, ts, strict=True)]


def _mlx_from(net: torch_ref.DfNet):
    model = inference.build(net.cfg)
    convert.load_weights(model, convert.torch_to_mlx(net.state_dict()))  # strict: every parameter
    return model


def _assert_parity(net: torch_ref.DfNet, model, x: tuple[np.ndarray, ...]) -> None:
    for name, (m, t) in zip(("spec", "mask", "lsnr", "coefs"), _both(net, model, x), strict=True):
        assert m.shape == t.shape, name
        np.testing.assert_allclose(m, t, atol=TOL, rtol=0, err_msg=name)


@pytest.mark.parametrize("name,backbone", CASES)
def test_random_weights_parity(name, backbone):
    net = _torch_model(_cfg(name, backbone))
    model = _mlx_from(net)
    model.eval()
    _assert_parity(net, model, _inputs(net.cfg))


@pytest.mark.parametrize(
    "extra",
    [
        {"complex_gain": True, "mask_pf": True, "pf_beta": 0.05},
        {"enc_concat": True, "df_gru_skip": "none"},
        {"df_gru_skip": "identity", "df_hidden_dim": 64},
        {"multires_df": ((48, 3), (24, 2)), "adaptive_order": True, "df_order": 4, "df_lookahead": 1},
    ],
    ids=["gain-pf", "concat", "identity-skip", "multires-adaptive"],
)
def test_parity_other_switches(extra):
    net = _torch_model(_cfg("dfn3", "gru", **extra))
    model = _mlx_from(net)
    model.eval()
    _assert_parity(net, model, _inputs(net.cfg))


def test_training_mode_parity_with_lsnr_dropout():
    """Training mode: BatchNorm on batch statistics and LSNR dropout of low-SNR frames, on both sides."""
    net = _torch_model(_cfg("dfn4", "gru")).train()
    x = _inputs(net.cfg)
    fc = net.enc.lsnr_fc[0]
    with torch.no_grad():  # spread the lsnr and centre its median on the -10 dB dropout threshold
        fc.weight.mul_(30.0)
        logit = torch.logit((net(*map(torch.from_numpy, x))[2] + 15) / 50)
        fc.bias.add_(math.log(0.1 / 0.9) - logit.quantile(0.5))  # between two frames
    model = _mlx_from(net)
    model.train()
    lsnr = _both(net, model, x)[2][1]
    assert (lsnr < -10.01).any() and (lsnr > -9.99).any() and np.abs(lsnr + 10).min() > 1e-3
    _assert_parity(net, model, x)


@pytest.mark.parametrize("name,backbone", CASES)
def test_torch_mlx_torch_round_trip_is_exact(name, backbone):
    state = _torch_model(_cfg(name, backbone), seed=1).state_dict()
    back = convert.mlx_to_torch(convert.torch_to_mlx(state))
    expected = {
        k for k in state if k not in torch_ref.CONSTANT_BUFFERS and not k.endswith("num_batches_tracked")
    }
    assert set(back) == expected
    for k in expected:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]), k


def test_dfn3_state_dict_has_upstream_keys():
    """Key names and shapes from upstream's module definitions (deepfilternet3.py, modules.py)."""
    state = torch_ref.DfNet(preset("dfn3")).state_dict()
    expected = {
        "erb_fb": (481, 32),
        "mask.erb_inv_fb": (32, 481),
        "enc.erb_conv0.1.weight": (64, 1, 3, 3),  # [pad, conv, BatchNorm, ReLU]: groups = 1, no pointwise
        "enc.erb_conv0.2.running_mean": (64,),
        "enc.df_conv0.2.weight": (64, 64, 1, 1),  # [pad, conv (2 groups), pointwise, BatchNorm, ReLU]
        "enc.erb_conv1.0.weight": (64, 1, 1, 3),  # [conv, pointwise, BatchNorm, ReLU]
        "enc.erb_conv1.2.num_batches_tracked": (),
        "enc.df_fc_emb.0.weight": (32, 96, 16),
        "enc.emb_gru.linear_in.0.weight": (16, 32, 16),
        "enc.emb_gru.gru.weight_ih_l0": (768, 256),
        "enc.emb_gru.linear_out.0.weight": (16, 16, 32),
        "enc.lsnr_fc.0.weight": (1, 512),
        "erb_dec.emb_gru.gru.bias_hh_l1": (768,),
        "erb_dec.conv3p.1.running_var": (64,),  # 1x1: [conv, BatchNorm, ReLU]
        "erb_dec.convt2.0.weight": (64, 1, 1, 3),
        "erb_dec.convt2.1.weight": (64, 64, 1, 1),
        "erb_dec.conv0_out.1.bias": (1,),
        "df_dec.df_convp.1.weight": (10, 32, 5, 1),
        "df_dec.df_convp.3.running_mean": (10,),
        "df_dec.df_gru.linear_in.0.weight": (8, 64, 32),
        "df_dec.df_gru.gru.weight_hh_l1": (768, 256),
        "df_dec.df_skip.weight": (16, 32, 16),
        "df_dec.df_out.0.weight": (16, 16, 60),
        "df_dec.df_fc_a.0.weight": (1, 256),
    }
    for key, shape in expected.items():
        assert key in state and tuple(state[key].shape) == shape, key
    assert not any(".core." in k or ".bn." in k for k in state)


def test_official_dfn3_weights_in_torch():
    """The official weights (ONNX -> MLX) converted MLX -> torch: same outputs, same tensors back."""
    model = inference.load_pretrained("dfn3")
    net = torch_ref.from_mlx(model)
    _assert_parity(net, model, _inputs(model.cfg, t=24, batch=1))
    from mlx.utils import tree_flatten

    ours = dict(tree_flatten(model.parameters()))
    back = convert.torch_to_mlx(net.state_dict())
    assert set(back) == set(ours)
    assert all(np.array_equal(back[k], np.array(ours[k])) for k in ours)


@pytest.mark.parametrize("fmt", ["nested.ckpt", "plain.ckpt.best", "weights.safetensors"])
def test_checkpoint_files_load_into_mlx(tmp_path, fmt):
    net = _torch_model(_cfg("dfn4", "mamba"))
    state = net.state_dict()
    path = tmp_path / fmt
    if fmt.startswith("nested"):
        torch.save({"model": state, "epoch": 3}, path)  # upstream-style: the state dict under "model"
    elif fmt.startswith("plain"):
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    flat = convert.load_torch_checkpoint(path)
    model = inference.build(net.cfg)
    convert.load_weights(model, flat)
    model.eval()
    _assert_parity(net, model, _inputs(net.cfg, t=8))


def test_save_torch_checkpoint_loads_into_torch(tmp_path):
    net = _torch_model(_cfg("dfn3", "attention"))
    flat = convert.torch_to_mlx(net.state_dict())
    path = convert.save_torch_checkpoint(tmp_path / "w.pt", flat)
    twin = torch_ref.DfNet(net.cfg)
    torch_ref.load_converted(twin, torch.load(path, weights_only=True))
    x = tuple(map(torch.from_numpy, _inputs(net.cfg, t=8)))
    with torch.no_grad():
        assert torch.equal(twin.eval()(*x)[0], net(*x)[0])


def test_load_converted_is_strict():
    net = torch_ref.DfNet(_cfg("dfn3", "gru"))
    state = convert.mlx_to_torch(convert.torch_to_mlx(net.state_dict()))
    del state["enc.lsnr_fc.0.bias"]
    with pytest.raises(ValueError, match="enc.lsnr_fc.0.bias"):
        torch_ref.load_converted(net, state)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".safetensors"])
def test_corrupt_file_is_a_value_error(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b"\x80\x02 definitely not a checkpoint" * 3)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint") as e:
        convert.load_torch_checkpoint(path)
    assert "\n" not in str(e.value)


def test_file_without_state_dict_is_a_value_error(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="no state dict"):
        convert.load_torch_checkpoint(path)


@pytest.mark.parametrize("backbone", ["gru", "mamba", "attention"])
def test_gradients_match_torch(backbone):
    """Every parameter's gradient of a loss on all four outputs, MLX against PyTorch autograd: the
    hand-written VJPs (fused GRU and scan kernels on the CPU, rational activations, grouped matmuls)
    against an independent implementation of the same network. Eval mode: with batch statistics a
    1x1 depthwise conv's weight before BatchNorm only reaches the loss through BatchNorm's eps, a
    gradient that is float32 noise in both frameworks."""
    net = _torch_model(_cfg("dfn4", backbone))
    model = _mlx_from(net)
    model.eval()
    x = _inputs(net.cfg, t=24)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        weights = [rng.standard_normal(o.shape).astype(np.float32) for o in net(*map(torch.from_numpy, x))]

    def loss(outputs, w):  # a different weight per element of every output
        return sum((o * wi).mean() for o, wi in zip(outputs, w, strict=True))

    loss(net(*map(torch.from_numpy, x)), [torch.from_numpy(w) for w in weights]).backward()
    mw = [mx.array(w) for w in weights]
    _, grads = nn.value_and_grad(model, lambda *a: loss(model(*a), mw))(*map(mx.array, x))
    got = convert.mlx_to_torch(dict(tree_flatten(grads)))
    params = dict(net.named_parameters())
    assert set(got) == set(params)
    for name, p in params.items():
        want = np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy()  # unused: no grad
        scale = float(np.abs(want).max()) + 1e-6
        np.testing.assert_allclose(got[name].numpy() / scale, want / scale, atol=2e-4, err_msg=name)


@pytest.mark.parametrize(
    "in_ch,out_ch,kernel,stride,transposed,act",
    [
        (2, 8, (3, 3), 1, False, "relu"),  # DFN3's df_conv0: grouped, then pointwise (merged in MLX)
        (1, 8, (3, 3), 1, False, "relu"),  # erb_conv0: dense
        (8, 8, (1, 3), 2, False, "relu"),  # erb_conv1: depthwise, strided, then pointwise
        (8, 8, (1, 3), 1, False, "relu"),
        (8, 8, (1, 3), 2, True, "relu"),  # convt1: transposed
        (8, 4, (5, 1), 1, False, None),  # df_convp: time taps, grouped, then pointwise
        (8, 1, (1, 3), 1, False, "sigmoid"),  # conv0_out
    ],
)
def test_conv_block_training_step_matches_torch(in_ch, out_ch, kernel, stride, transposed, act, monkeypatch):
    """One conv block in training mode against upstream's ``Conv2dNormAct`` in PyTorch: output, the
    gradients of the input and of every weight, and BatchNorm's running statistics after the step
    (MLX runs dfn4lab.kernels' batch norm, depthwise conv or time taps here, ``SMALL`` lowered so
    arrays this size do, and merges a grouped conv's pointwise conv into it)."""
    from dfn4lab import kernels
    from dfn4lab.layers import ConvBlock

    monkeypatch.setattr(kernels, "SMALL", 0)

    torch.manual_seed(in_ch + out_ch)
    ref = torch_ref.conv_norm_act(in_ch, out_ch, kernel, stride, transposed, act).train()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    block = ConvBlock(in_ch, out_ch, kernel, fstride=stride, transposed=transposed, act=act)
    convs = [m for m in ref if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    bn = next(m for m in ref if isinstance(m, torch.nn.BatchNorm2d))
    block.weight = mx.array(convs[0].weight.detach().numpy())
    if block.has_pointwise:
        block.pointwise = mx.array(convs[1].weight.detach().numpy())
    block.bn.weight, block.bn.bias = mx.array(bn.weight.detach().numpy()), mx.array(bn.bias.detach().numpy())
    block.train()

    x = torch.randn(2, in_ch, 6, 16) + 0.5  # (batch, ch, time, freq)
    x.requires_grad_(True)
    y = ref(x)
    proj = torch.randn_like(y)
    (y * proj).sum().backward()
    xm, pm = mx.array(x.detach().permute(0, 2, 3, 1).numpy()), mx.array(proj.permute(0, 2, 3, 1).numpy())
    ym = block(xm)[0]
    stats = (block.bn.running_mean, block.bn.running_var)

    def loss(x: mx.array, params: dict) -> mx.array:
        block.update(params)
        return (block(x)[0] * pm).sum()

    dx, grads = mx.grad(loss, argnums=(0, 1))(xm, block.trainable_parameters())

    def near(got: mx.array, want: torch.Tensor, name: str) -> None:
        want = want.detach().numpy()
        np.testing.assert_allclose(np.array(got), want, atol=2e-5 * np.abs(want).max() + 1e-6, err_msg=name)

    near(ym, y.permute(0, 2, 3, 1), "output")
    near(dx, x.grad.permute(0, 2, 3, 1), "input gradient")
    near(stats[0], bn.running_mean, "running mean")
    near(stats[1], bn.running_var, "running var")
    near(grads["weight"], convs[0].weight.grad, "conv weight")
    if block.has_pointwise:
        near(grads["pointwise"], convs[1].weight.grad, "pointwise weight")
    near(grads["bn"]["weight"], bn.weight.grad, "bn weight")
    near(grads["bn"]["bias"], bn.bias.grad, "bn bias")


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="no MPS (Apple GPU) here")
@pytest.mark.parametrize("backbone", ["gru", "mamba", "attention"])
def test_torch_ref_runs_on_mps(backbone):
    """`bench backbones` times torch_ref on MPS beside MLX on Metal: it must run there and agree with
    the CPU (complex deep filter, unfold, RoPE built on the input's device)."""
    net = _torch_model(_cfg("dfn3", backbone))
    x = [torch.from_numpy(a) for a in _inputs(net.cfg)]
    with torch.no_grad():
        cpu = net(*x)
        mps = net.to("mps")(*(a.to("mps") for a in x))
    for name, c, m in zip(("spec", "mask", "lsnr", "coefs"), cpu, mps, strict=True):
        np.testing.assert_allclose(m.cpu().numpy(), c.numpy(), atol=TOL, rtol=0, err_msg=name)
