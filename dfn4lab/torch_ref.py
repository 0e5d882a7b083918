"""DfNet4 in PyTorch: the MLX model (``dfn4lab.model``) op for op, for parity tests and benchmarks.

Laid out as upstream DeepFilterNet: conv blocks are channels-first ``(batch, ch, time, freq)``
``nn.Sequential`` s (``[causal pad], conv, [1x1 pointwise], BatchNorm2d, act``), GRU sites hold an
``nn.GRU`` named ``gru``, single layers with an activation are ``Sequential(layer, act)``. With
``preset("dfn3")`` ``state_dict()`` therefore has upstream's keys (``enc.erb_conv0.1.weight``...)
and an upstream ``.ckpt`` loads with ``load_state_dict``. Mamba/attention cores and the DFN4 extras
use the MLX names. ``dfn4lab.convert.torch_to_mlx``/``mlx_to_torch`` map between the two.

``DfNet.forward`` takes and returns the MLX layouts (channels-last spectra), so outputs compare
directly; it is the offline forward only (no streaming state).
"""

from __future__ import annotations

import math

from dfn4lab import convert, dsp
from dfn4lab.config import BackboneConfig, ModelConfig

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Written here from upstream, not imported from dfn4lab.model: the twin checks the model.
LSNR_DROPOUT_DB = -10.0  # upstream deepfilternet3.py: training drops frames with lsnr <= -10 dB


def df_heads(cfg: ModelConfig) -> list[tuple[int, int, int]]:
    """(bins, order, lookahead) of the DF heads, main first: a complex gain is a one-tap filter without
    look-ahead; the extra heads of ``multires_df`` filter with the look-ahead their order allows."""
    main = (cfg.dsp.nb_df, 1, 0) if cfg.complex_gain else (cfg.dsp.nb_df, cfg.df_order, cfg.df_lookahead)
    return [main] + [(bins, order, min(cfg.df_lookahead, order - 1)) for bins, order in cfg.multires_df]


NORM_EPS = 1e-5  # RMSNorm/LayerNorm/BatchNorm eps, as in dfn4lab.backbones and mlx.nn
CONSTANT_BUFFERS = ("erb_fb", "mask.erb_inv_fb")  # upstream's filterbank buffers, rebuilt from the config


def conv_norm_act(
    in_ch: int,
    out_ch: int,
    kernel: tuple[int, int] | int,
    fstride: int = 1,
    transposed: bool = False,
    act: str | None = "relu",
) -> nn.Sequential:
    """Upstream ``Conv2dNormAct``/``ConvTranspose2dNormAct`` (``separable=True, bias=False``).

    Causal in time (zero pad of ``kt - 1`` past frames), centred in frequency; grouped with
    ``gcd(in, out)`` groups, followed by a 1x1 pointwise conv when grouped and the kernel is not 1x1.
    ``(batch, in_ch, time, freq)`` -> ``(batch, out_ch, time, freq')``.
    """
    kt, kf = (kernel, kernel) if isinstance(kernel, int) else kernel
    groups, fp = math.gcd(in_ch, out_ch), kf // 2
    layers: list[nn.Module] = []
    if kt > 1:
        layers.append(nn.ConstantPad2d((0, 0, kt - 1, 0), 0.0))
    if transposed:
        assert kt == 1, "transposed convs are frequency-only"
        out_pad = fp if fstride > 1 else 0  # torch requires output_padding < stride
        conv = nn.ConvTranspose2d(
            in_ch, out_ch, (kt, kf), (1, fstride), (0, fp), (0, out_pad), groups=groups, bias=False
        )
    else:
        conv = nn.Conv2d(in_ch, out_ch, (kt, kf), (1, fstride), (0, fp), groups=groups, bias=False)
    layers.append(conv)
    if groups > 1 and max(kt, kf) > 1:
        layers.append(nn.Conv2d(out_ch, out_ch, 1, bias=False))
    layers.append(nn.BatchNorm2d(out_ch, eps=NORM_EPS))
    if act is not None:
        layers.append({"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[act]())
    return nn.Sequential(*layers)


class GroupedLinear(nn.Module):
    """Upstream ``GroupedLinearEinsum``: block-diagonal, no bias; weight (groups, in/groups, out/groups)."""

    def __init__(self, input_size: int, hidden_size: int, groups: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, input_size // groups, hidden_size // groups))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        """``(..., input_size)`` -> ``(..., hidden_size)``."""
        g, i, _ = self.weight.shape
        return torch.einsum("...gi,gih->...gh", x.unflatten(-1, (g, i)), self.weight).flatten(-2)


# --------------------------------------------------------------------------------------------- Mamba


def linear_scan(a: Tensor, b: Tensor, h: Tensor) -> Tensor:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` in ceil(log2(time)) vectorised steps (Hillis-Steele).

    ``a``, ``b``: (batch, time, ...), ``h``: (batch, ...) -> (batch, time, ...). After the step with
    shift ``s``, ``(a_t, b_t)`` compose the last ``2s`` frames; decays only multiply (no exp of sums).
    """
    s = 1
    while s < a.shape[1]:
        b = torch.cat([b[:, :s], torch.addcmul(b[:, s:], a[:, s:], b[:, :-s])], dim=1)
        a = torch.cat([a[:, :s], a[:, s:] * a[:, :-s]], dim=1)
        s *= 2
    return torch.addcmul(b, a, h[:, None])


def selective_scan(
    u: Tensor, delta: Tensor, a: Tensor, b: Tensor, c: Tensor, h: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """``backbones.selective_scan_sequential``, vectorised over time within chunks of ``chunk`` frames.

    ``u``, ``delta``: (batch, time, d_inner); ``a``: (d_inner, d_state); ``b``, ``c``: (batch, time,
    d_state); ``h``: (batch, d_inner, d_state). Returns ``y`` (batch, time, d_inner) and the last ``h``.
    """
    ys = []
    for s in range(0, u.shape[1], chunk):
        sl = slice(s, s + chunk)
        da = torch.exp(delta[:, sl, :, None] * a)  # (batch, q, d_inner, d_state)
        dbu = (delta[:, sl] * u[:, sl])[..., None] * b[:, sl, None, :]
        hs = linear_scan(da, dbu, h)
        h = hs[:, -1]
        ys.append(torch.einsum("bqdn,bqn->bqd", hs, c[:, sl]))
    return torch.cat(ys, dim=1), h


class MambaBlock(nn.Module):
    """``backbones.MambaBlock`` (same names and init): pre-norm residual Mamba-1 selective SSM."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, chunk: int = 32):
        super().__init__()
        d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.d_state, self.d_conv, self.chunk = d_state, d_conv, chunk
        self.norm = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        k = 1.0 / math.sqrt(d_conv)
        self.conv_weight = nn.Parameter(torch.empty(d_inner, d_conv).uniform_(-k, k))  # last tap = now
        self.conv_bias = nn.Parameter(torch.empty(d_inner).uniform_(-k, k))
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        r = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -r, r)
        dt = torch.empty(d_inner).uniform_(math.log(1e-3), math.log(1e-1)).exp()
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.arange(1, d_state + 1, dtype=torch.float32).log().repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, time, d_model)`` from zero state -> same shape."""
        xs, z = self.in_proj(self.norm(x)).chunk(2, dim=-1)
        d_inner = xs.shape[-1]
        # causal depthwise conv over time: pad d_conv - 1 past frames
        xp = F.pad(xs.transpose(1, 2), (self.d_conv - 1, 0))
        u = F.silu(F.conv1d(xp, self.conv_weight[:, None], self.conv_bias, groups=d_inner).transpose(1, 2))
        dt_in, bm, cm = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt_in))
        h0 = x.new_zeros(x.shape[0], d_inner, self.d_state)
        y, _ = selective_scan(u, delta, -torch.exp(self.A_log), bm, cm, h0, self.chunk)
        return x + self.out_proj((y + self.D * u) * F.silu(z))


class MambaCore(nn.Module):
    """Stacked :class:`MambaBlock` s and a final RMSNorm on ``(batch, time, hidden)``."""

    def __init__(self, cfg: BackboneConfig, hidden_size: int, num_layers: int = 1):
        super().__init__()
        self.layers = nn.ModuleList(
            MambaBlock(hidden_size, cfg.d_state, cfg.d_conv, cfg.expand, cfg.chunk) for _ in range(num_layers)
        )
        self.norm = nn.RMSNorm(hidden_size, eps=NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


# ----------------------------------------------------------------------------------------- Attention


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on halves, as ``mx.fast.rope(traditional=False)``: x (..., time, d), cos/sin (time, d/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class AttentionBlock(nn.Module):
    """``backbones.AttentionBlock``: pre-norm causal MHSA with RoPE, then a GELU FFN; both residual."""

    def __init__(self, d_model: int, heads: int = 4, ffn_mult: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.ffn_in = nn.Linear(d_model, ffn_mult * d_model)
        self.ffn_out = nn.Linear(ffn_mult * d_model, d_model)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        """x (batch, time, d); mask (time, time) bool (True = attend) or None for full causal."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.ffn_out(F.gelu(self.ffn_in(self.norm2(x))))


class AttentionCore(nn.Module):
    """Stacked :class:`AttentionBlock` s and a final RMSNorm; positions start at 0."""

    def __init__(self, cfg: BackboneConfig, hidden_size: int, num_layers: int = 1):
        super().__init__()
        self.window, self.head_dim = cfg.window, hidden_size // cfg.heads
        self.layers = nn.ModuleList(
            AttentionBlock(hidden_size, cfg.heads, cfg.ffn_mult) for _ in range(num_layers)
        )
        self.norm = nn.RMSNorm(hidden_size, eps=NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        t, hd = x.shape[1], self.head_dim
        inv_freq = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float32, device=x.device) / hd)
        ang = torch.arange(t, dtype=torch.float32, device=x.device)[:, None] * inv_freq
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        mask = None
        if self.window is not None:
            lag = torch.arange(t, device=x.device)[:, None] - torch.arange(t, device=x.device)
            mask = (lag >= 0) & (lag < self.window)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


# ------------------------------------------------------------------------------------------- DfNet


class SqueezedBackbone(nn.Module):
    """Upstream ``SqueezedGRU_S`` (``relu(linear_out(core(relu(linear_in(x)))))``), any core.

    The GRU core is an ``nn.GRU`` named ``gru`` (upstream's keys); other cores live in ``core``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int | None,
        num_layers: int,
        linear_groups: int,
        cfg: BackboneConfig,
    ):
        super().__init__()
        self.linear_in = nn.Sequential(GroupedLinear(input_size, hidden_size, linear_groups), nn.ReLU())
        self.kind = cfg.kind
        if cfg.kind == "gru":
            self.gru = nn.GRU(hidden_size, hidden_size, num_layers, batch_first=True)
        elif cfg.kind == "mamba":
            self.core = MambaCore(cfg, hidden_size, num_layers)
        elif cfg.kind == "attention":
            self.core = AttentionCore(cfg, hidden_size, num_layers)
        else:
            raise ValueError(f"unknown backbone kind {cfg.kind!r}; choose gru, mamba or attention")
        self.linear_out = (
            nn.Identity()
            if output_size is None
            else nn.Sequential(GroupedLinear(hidden_size, output_size, linear_groups), nn.ReLU())
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, time, input_size)`` -> ``(batch, time, output_size or hidden_size)``."""
        y = self.linear_in(x)
        y = self.gru(y)[0] if self.kind == "gru" else self.core(y)
        return self.linear_out(y)


class HybridEncoder(nn.Module):
    """``layers.HybridEncoder``: per-frame waveform and phase embeddings fused by cross-domain attention."""

    def __init__(self, fft_size: int, nb_df: int, dim: int, heads: int = 4, ch: int = 16):
        super().__init__()
        self.fft_size, self.nb_df, self.heads = fft_size, nb_df, heads
        self.wave_conv1 = nn.Conv1d(1, ch, kernel_size=16, stride=8)
        self.wave_conv2 = nn.Conv1d(ch, 2 * ch, kernel_size=8, stride=4)
        self.wave_fc = nn.Linear(2 * ch, dim)
        self.phase_fc = nn.Linear(2 * nb_df, dim)
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = nn.Module()  # mlx.nn.MultiHeadAttention's names, no biases
        for name in ("query_proj", "key_proj", "value_proj", "out_proj"):
            setattr(self.attn, name, nn.Linear(dim, dim, bias=False))

    def forward(self, emb: Tensor, spec: Tensor) -> Tensor:
        """emb (batch, time, dim), spec (batch, time, freq, 2) -> fused emb (batch, time, dim)."""
        b, t, _, _ = spec.shape
        wave = torch.fft.irfft(torch.complex(spec[..., 0], spec[..., 1]), n=self.fft_size)
        w = F.relu(self.wave_conv1(wave.reshape(b * t, 1, -1)))
        wave_emb = self.wave_fc(F.relu(self.wave_conv2(w)).mean(dim=-1)).view(b, t, -1)
        low = spec[:, :, : self.nb_df]
        mag = (low.square().sum(dim=-1, keepdim=True) + 1e-12).sqrt()
        phase_emb = F.relu(self.phase_fc((low / mag).flatten(2)))
        tokens = self.norm(torch.stack([emb, wave_emb, phase_emb], dim=2)).flatten(0, 1)  # (b*t, 3, dim)
        attn = self.attn

        def split(x: Tensor) -> Tensor:  # (b*t, n, dim) -> (b*t, heads, n, head_dim)
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = (
            split(attn.query_proj(tokens[:, :1])),
            split(attn.key_proj(tokens)),
            split(attn.value_proj(tokens)),
        )
        fused = attn.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return emb + fused.view(b, t, -1)


class Encoder(nn.Module):
    """Upstream ``deepfilternet3.Encoder`` plus the DFN4 running statistics and hybrid encoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch, nb_erb, nb_df = cfg.conv_ch, cfg.dsp.nb_erb, cfg.dsp.nb_df
        self.erb_stats = self.spec_stats = None
        if cfg.running_stats:
            self.erb_stats = nn.BatchNorm1d(nb_erb, eps=NORM_EPS, affine=False)
            self.spec_stats = nn.BatchNorm1d(2 * nb_df, eps=NORM_EPS, affine=False)
        self.erb_conv0 = conv_norm_act(1, ch, cfg.conv_kernel_inp)
        self.erb_conv1 = conv_norm_act(ch, ch, cfg.conv_kernel, fstride=2)
        self.erb_conv2 = conv_norm_act(ch, ch, cfg.conv_kernel, fstride=2)
        self.erb_conv3 = conv_norm_act(ch, ch, cfg.conv_kernel, fstride=1)
        self.df_conv0 = conv_norm_act(2, ch, cfg.conv_kernel_inp)
        self.df_conv1 = conv_norm_act(ch, ch, cfg.conv_kernel, fstride=2)
        emb_dim = ch * nb_erb // 4
        self.df_fc_emb = nn.Sequential(
            GroupedLinear(ch * nb_df // 2, emb_dim, cfg.enc_linear_groups), nn.ReLU()
        )
        self.enc_concat = cfg.enc_concat
        self.hybrid = None
        if cfg.hybrid_encoder:
            self.hybrid = HybridEncoder(cfg.dsp.fft_size, nb_df, emb_dim, heads=cfg.backbone.heads)
        emb_in = emb_dim * (2 if cfg.enc_concat else 1)
        self.emb_gru = SqueezedBackbone(
            emb_in, cfg.emb_hidden_dim, emb_dim, 1, cfg.linear_groups, cfg.backbone
        )
        self.lsnr_fc = nn.Sequential(nn.Linear(emb_dim, 1), nn.Sigmoid())
        self.lsnr_scale, self.lsnr_offset = cfg.lsnr_max - cfg.lsnr_min, cfg.lsnr_min

    def forward(self, feat_erb: Tensor, feat_spec: Tensor, spec: Tensor) -> tuple[Tensor, ...]:
        """feat_erb (batch, 1, time, nb_erb), feat_spec (batch, 2, time, nb_df), spec (batch, time, freq, 2)
        of the same frames (hybrid encoder only).

        Returns e0..e3 (batch, ch, time, f), emb (batch, time, emb_dim), c0 (batch, ch, time, nb_df),
        lsnr (batch, time, 1), in upstream's order.
        """
        if self.erb_stats is not None:
            b, _, t, f = feat_spec.shape
            feat_erb = self.erb_stats(feat_erb.flatten(0, 2)).view_as(feat_erb)
            # the MLX model normalises (freq, re/im) interleaved per frame
            s = self.spec_stats(feat_spec.permute(0, 2, 3, 1).reshape(b * t, 2 * f))
            feat_spec = s.view(b, t, f, 2).permute(0, 3, 1, 2)
        e0 = self.erb_conv0(feat_erb)
        e1 = self.erb_conv1(e0)
        e2 = self.erb_conv2(e1)
        e3 = self.erb_conv3(e2)
        c0 = self.df_conv0(feat_spec)
        c1 = self.df_conv1(c0)
        cemb = self.df_fc_emb(c1.permute(0, 2, 3, 1).flatten(2))  # (batch, time, freq * ch)
        emb = e3.permute(0, 2, 3, 1).flatten(2)
        if self.hybrid is not None:
            emb = self.hybrid(emb, spec)
        emb = torch.cat([emb, cemb], dim=-1) if self.enc_concat else emb + cemb
        emb = self.emb_gru(emb)
        lsnr = self.lsnr_fc(emb) * self.lsnr_scale + self.lsnr_offset
        return e0, e1, e2, e3, emb, c0, lsnr


class ErbDecoder(nn.Module):
    """Upstream ``deepfilternet3.ErbDecoder``: backbone, transposed-conv U-Net, sigmoid ERB mask."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch = cfg.conv_ch
        emb_dim = ch * cfg.dsp.nb_erb // 4
        self.emb_gru = SqueezedBackbone(
            emb_dim, cfg.emb_hidden_dim, emb_dim, cfg.emb_num_layers - 1, cfg.linear_groups, cfg.backbone
        )
        self.conv3p = conv_norm_act(ch, ch, 1)
        self.convt3 = conv_norm_act(ch, ch, cfg.conv_kernel)
        self.conv2p = conv_norm_act(ch, ch, 1)
        self.convt2 = conv_norm_act(ch, ch, cfg.convt_kernel, fstride=2, transposed=True)
        self.conv1p = conv_norm_act(ch, ch, 1)
        self.convt1 = conv_norm_act(ch, ch, cfg.convt_kernel, fstride=2, transposed=True)
        self.conv0p = conv_norm_act(ch, ch, 1)
        self.conv0_out = conv_norm_act(ch, 1, cfg.conv_kernel, act="sigmoid")

    def forward(self, emb: Tensor, e3: Tensor, e2: Tensor, e1: Tensor, e0: Tensor) -> Tensor:
        """Returns the ERB mask (batch, 1, time, nb_erb)."""
        b, _, t, f8 = e3.shape
        emb = self.emb_gru(emb).view(b, t, f8, -1).permute(0, 3, 1, 2)
        e3 = self.convt3(self.conv3p(e3) + emb)
        e2 = self.convt2(self.conv2p(e2) + e3)
        e1 = self.convt1(self.conv1p(e1) + e2)
        return self.conv0_out(self.conv0p(e0) + e1)


def _coefs(convp: nn.Module, out: nn.Module, bins: int, c: Tensor, c0: Tensor) -> Tensor:
    """One DF head: c (batch, time, hidden), c0 (batch, ch, time, nb_df) -> (batch, time, bins, order*2)."""
    b, t, _ = c.shape
    return out(c).view(b, t, bins, -1) + convp(c0[..., :bins]).permute(0, 2, 3, 1)


class DfHead(nn.Module):
    """An extra-resolution DF head (``df_dec.heads.i``): pathway conv and tanh grouped linear."""

    def __init__(self, cfg: ModelConfig, bins: int, order: int):
        super().__init__()
        self.bins = bins
        self.df_convp = conv_norm_act(cfg.conv_ch, 2 * order, (cfg.df_pathway_kernel_size_t, 1))
        self.df_out = nn.Sequential(
            GroupedLinear(cfg.df_hidden_dim, bins * 2 * order, cfg.linear_groups), nn.Tanh()
        )

    def forward(self, c: Tensor, c0: Tensor) -> Tensor:
        return _coefs(self.df_convp, self.df_out, self.bins, c, c0)


class DfDecoder(nn.Module):
    """Upstream ``deepfilternet3.DfDecoder`` plus extra DF heads and the adaptive-order head.

    ``df_fc_a`` (upstream's alpha head) is kept for checkpoint compatibility; as upstream, unused.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        emb_dim = cfg.conv_ch * cfg.dsp.nb_erb // 4
        (bins, order, _), *extra = df_heads(cfg)
        self.bins = bins
        main = DfHead(cfg, bins, order)
        self.df_convp, self.df_out = main.df_convp, main.df_out
        self.heads = nn.ModuleList(DfHead(cfg, b, o) for b, o, _ in extra)
        self.df_gru = SqueezedBackbone(
            emb_dim, cfg.df_hidden_dim, None, cfg.df_num_layers, cfg.df_linear_groups, cfg.backbone
        )
        self.skip_kind = cfg.df_gru_skip
        if cfg.df_gru_skip == "groupedlinear":
            self.df_skip = GroupedLinear(emb_dim, cfg.df_hidden_dim, cfg.linear_groups)
        self.df_fc_a = nn.Sequential(nn.Linear(cfg.df_hidden_dim, 1), nn.Sigmoid())
        self.order_fc = nn.Linear(cfg.df_hidden_dim, order) if cfg.adaptive_order else None

    def forward(self, emb: Tensor, c0: Tensor) -> list[Tensor]:
        """emb (batch, time, emb_dim), c0 (batch, ch, time, nb_df) -> coefs per head
        (batch, time, bins, order*2)."""
        c = self.df_gru(emb)
        if self.skip_kind == "groupedlinear":
            c = c + self.df_skip(emb)
        elif self.skip_kind == "identity":
            c = c + emb
        coefs = _coefs(self.df_convp, self.df_out, self.bins, c, c0)
        if self.order_fc is not None:
            # tap n (oldest first) is kept with P(order >= order_max - n): model.DfDecoder._tap_weights
            p = torch.softmax(self.order_fc(c), dim=-1)  # p[k]: order k + 1
            keep = p.flip(-1).cumsum(-1)
            coefs = coefs * keep.repeat_interleave(2, dim=-1)[:, :, None]
        return [coefs, *(head(c, c0) for head in self.heads)]


class Mask(nn.Module):
    """Upstream ``modules.Mask`` without post-filter: ERB gains spread to bins by ``erb_inv_fb``."""

    def __init__(self, erb_inv_fb: Tensor):
        super().__init__()
        self.register_buffer("erb_inv_fb", erb_inv_fb)  # (nb_erb, freq)

    def forward(self, spec: Tensor, m: Tensor) -> Tensor:
        """spec (batch, time, freq, 2), m (batch, time, nb_erb) -> masked spec."""
        return spec * (m @ self.erb_inv_fb)[..., None]


def deep_filter(frames: Tensor, coefs: Tensor, order: int) -> Tensor:
    """``layers.deep_filter``: frames (batch, time + order - 1, bins, 2), coefs (batch, time, bins,
    order*2) -> (batch, time, bins, 2); complex multiply-accumulate over unfolded frames."""
    b, t, f, _ = coefs.shape
    x = torch.view_as_complex(frames.contiguous()).unfold(1, order, 1)  # (batch, time, bins, order)
    w = torch.view_as_complex(coefs.reshape(b, t, f, order, 2))
    return torch.view_as_real((x * w).sum(dim=-1))


def post_filter(noisy: Tensor, enhanced: Tensor, beta: float, eps: float = 1e-12) -> Tensor:
    """``layers.post_filter``: noisy, enhanced (batch, time, freq, 2) -> enhanced scaled per bin."""
    mask = (
        (enhanced.square().sum(-1) + eps * eps).sqrt() / ((noisy.square().sum(-1) + eps * eps).sqrt() + eps)
    ).clamp(eps, 1.0)
    mask_sin = mask * torch.sin(math.pi * mask / 2).clamp_min(eps)
    return enhanced * ((1 + beta) / (1 + beta * (mask / mask_sin) ** 2))[..., None]


class DfNet(nn.Module):
    """DfNet4 for ``cfg``; with ``preset("dfn3")`` exactly upstream's ``deepfilternet3.DfNet``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        fb = torch.from_numpy(np.array(dsp.erb_fb(cfg.dsp), np.float32))
        self.register_buffer("erb_fb", fb)  # (freq, nb_erb): unused here, as upstream; kept for its keys
        self.enc = Encoder(cfg)
        self.erb_dec = ErbDecoder(cfg)
        self.mask = Mask(torch.from_numpy(np.array(dsp.erb_fb(cfg.dsp, inverse=True), np.float32)))
        self.df_dec = DfDecoder(cfg)
        self._heads = df_heads(cfg)
        self.df_history = max(o - 1 - la for _, o, la in self._heads)

    def _filter(self, frames: Tensor, heads: list[Tensor], t: int) -> Tensor:
        """Deep filter of every head over its bins; bins covered by several heads are averaged."""
        p, nb_df = self.df_history, self._heads[0][0]
        ys, count = [], torch.zeros(nb_df, dtype=frames.dtype, device=frames.device)
        for (bins, order, la), coefs in zip(self._heads, heads, strict=True):
            start = p - (order - 1 - la)
            y = deep_filter(frames[:, start : start + t + order - 1, :bins], coefs, order)
            ys.append(F.pad(y, (0, 0, 0, nb_df - bins)))
            count[:bins] += 1
        return torch.stack(ys).sum(0) / count[:, None] if len(ys) > 1 else ys[0]

    def forward(
        self, spec: Tensor, feat_erb: Tensor, feat_spec: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """As ``model.DfNet.__call__``: spec (batch, time, freq, 2), feat_erb (batch, time, nb_erb),
        feat_spec (batch, time, nb_df, 2) -> enhanced spec (batch, time, freq, 2), ERB mask (batch,
        time, nb_erb), lsnr (batch, time), main-head DF coefficients (batch, time, nb_df, order*2).
        """
        cfg, la = self.cfg, self.cfg.conv_lookahead
        t = spec.shape[1] + la
        # As the MLX model and the official runtime: frame t sees features up to t + la; the first la
        # outputs (before frame 0) are dropped. Upstream's Python forward drops the first la features.
        feat_erb = F.pad(feat_erb[:, None], (0, 0, 0, la))
        feat_spec = F.pad(feat_spec.permute(0, 3, 1, 2), (0, 0, 0, la))
        e0, e1, e2, e3, emb, c0, lsnr = self.enc(feat_erb, feat_spec, F.pad(spec, (0, 0, 0, 0, 0, la)))
        m = self.erb_dec(emb, e3, e2, e1, e0)[:, 0]
        heads = self.df_dec(emb, c0)
        if cfg.lsnr_dropout and self.training:  # frames judged pure noise get no mask nor filter
            keep = (lsnr > LSNR_DROPOUT_DB).to(m.dtype)
            m = m * keep
            heads = [h * keep[..., None] for h in heads]
        nb_df = cfg.dsp.nb_df
        frames = F.pad(spec, (0, 0, 0, 0, self.df_history + la, la))
        spec_d = frames[:, self.df_history : self.df_history + t]
        spec_e = torch.cat([self._filter(frames, heads, t), self.mask(spec_d, m)[:, :, nb_df:]], dim=2)
        if cfg.mask_pf:
            spec_e = post_filter(spec_d, spec_e, cfg.pf_beta)
        return spec_e[:, la:], m[:, la:], lsnr[:, la:, 0], heads[0][:, la:]


def load_converted(model: DfNet, state: dict[str, Tensor]) -> None:
    """Load a state dict from ``convert.mlx_to_torch``: strict, except that the filterbank buffers
    (rebuilt from the config) and BatchNorm ``num_batches_tracked`` counters may be absent."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in CONSTANT_BUFFERS and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )


def from_mlx(mlx_model) -> DfNet:
    """The PyTorch twin of an MLX ``model.DfNet``: same config and weights, in eval mode."""
    from mlx.utils import tree_flatten

    net = DfNet(mlx_model.cfg)
    load_converted(net, convert.mlx_to_torch(dict(tree_flatten(mlx_model.parameters()))))
    return net.eval()
