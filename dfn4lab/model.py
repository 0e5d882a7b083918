"""DfNet4: DeepFilterNet3's topology with a swappable backbone at every recurrent site.

Layout is channels-last throughout: feature maps are ``(batch, time, freq, channels)``,
spectra ``(batch, time, freq, 2)`` (real, imaginary). Module and parameter names follow
upstream DeepFilterNet (``enc.erb_conv0``, ``erb_dec.convt2``, ``df_dec.df_out``...) so
converting a checkpoint is a rename table (``dfn4lab.convert``).

Every module that looks back in time takes and returns a ``state`` (conv history frames,
backbone states), so a stream of one frame at a time computes exactly the offline result.
"""

from __future__ import annotations

import math
from typing import Any

from dfn4lab.backbones import GroupedLinear, SqueezedBackbone
from dfn4lab.config import ModelConfig

import mlx.core as mx
import mlx.nn as nn
import numpy as np

State = dict[str, Any]


def _act(name: str | None, x: mx.array) -> mx.array:
    if name == "relu":
        return nn.relu(x)
    if name == "sigmoid":
        return mx.sigmoid(x)
    return x


class ConvBlock(nn.Module):
    """Upstream ``Conv2dNormAct``/``ConvTranspose2dNormAct``: causal in time, centred in frequency.

    conv (grouped, kernel ``(kt, kf)``, frequency stride) -> optional 1x1 pointwise (the
    "separable" case) -> BatchNorm -> activation. Weights keep PyTorch's layout
    ``(out, in/groups, kt, kf)`` (transposed: ``(in, out/groups, 1, kf)``).
    Input and output ``(batch, time, freq, channels)``; the state is the last ``kt-1`` input frames.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: tuple[int, int] | int,
        fstride: int = 1,
        separable: bool = True,
        transposed: bool = False,
        act: str | None = "relu",
    ):
        super().__init__()
        kt, kf = (kernel, kernel) if isinstance(kernel, int) else kernel
        groups = math.gcd(in_ch, out_ch) if separable else 1
        # Upstream keeps the groups of a 1x1 "separable" conv but drops its pointwise conv.
        self.has_pointwise = groups > 1 and max(kt, kf) > 1
        self.kt, self.kf, self.fstride, self.groups = kt, kf, fstride, groups
        self.in_ch, self.out_ch, self.transposed, self.act = in_ch, out_ch, transposed, act
        if transposed:
            assert kt == 1, "transposed convs are frequency-only"
            self.weight = mx.zeros((in_ch, out_ch // groups, kt, kf))
        else:
            self.weight = mx.zeros((out_ch, in_ch // groups, kt, kf))
        if self.has_pointwise:
            self.pointwise = mx.zeros((out_ch, out_ch, 1, 1))
        self.bn = nn.BatchNorm(out_ch)
        self._init()

    def _init(self) -> None:
        fan_in = self.weight.shape[1] * self.kt * self.kf
        bound = 1 / math.sqrt(fan_in)
        self.weight = mx.random.uniform(-bound, bound, self.weight.shape)
        if self.has_pointwise:
            b = 1 / math.sqrt(self.out_ch)
            self.pointwise = mx.random.uniform(-b, b, self.pointwise.shape)

    def _taps(self, x: mx.array, hist: mx.array | None) -> tuple[mx.array, mx.array]:
        """Causal time padding from history, centred frequency padding. Returns (padded, new hist)."""
        b, t, f, c = x.shape
        if self.kt > 1:
            if hist is None:
                hist = mx.zeros((b, self.kt - 1, f, c), dtype=x.dtype)
            x = mx.concatenate([hist, x], axis=1)
            hist = x[:, -(self.kt - 1) :]
        fp = self.kf // 2
        if fp:
            x = mx.pad(x, [(0, 0), (0, 0), (fp, fp), (0, 0)])
        return x, hist

    def _conv(self, x: mx.array, t: int, f_out: int) -> mx.array:
        """Grouped conv over padded ``x`` (batch, t + kt - 1, padded freq, in) -> (batch, t, f_out, out)."""
        s = self.fstride
        if self.groups == self.in_ch == self.out_ch:
            # Depthwise: a few element-wise taps (strided slices) beat a grouped conv2d here.
            w = self.weight
            y = None
            for i in range(self.kt):
                for j in range(self.kf):
                    term = x[:, i : i + t, j : j + (f_out - 1) * s + 1 : s, :] * w[:, 0, i, j]
                    y = term if y is None else y + term
            return y
        # Few groups: one dense conv2d with a block-diagonal weight (measured far faster than groups=g).
        return mx.conv2d(x, self._dense_weight(), stride=(1, s))

    def _dense_weight(self) -> mx.array:
        """MLX layout (out, kt, kf, in) with zeros outside each group's block."""
        g, cin_g, cout_g = self.groups, self.in_ch // self.groups, self.out_ch // self.groups
        w = self.weight.transpose(0, 2, 3, 1)  # (out, kt, kf, in/g)
        if g == 1:
            return w
        rows = []
        for k in range(g):
            blk = w[k * cout_g : (k + 1) * cout_g]
            left = mx.zeros((cout_g, self.kt, self.kf, k * cin_g), w.dtype)
            right = mx.zeros((cout_g, self.kt, self.kf, (g - k - 1) * cin_g), w.dtype)
            rows.append(mx.concatenate([left, blk, right], axis=-1))
        return mx.concatenate(rows, axis=0)

    def _conv_transposed(self, x: mx.array) -> mx.array:
        """Depthwise transposed conv over frequency with stride s: zero-insert, then correlate."""
        b, t, f, c = x.shape
        s, kf = self.fstride, self.kf
        if s > 1:
            x = mx.concatenate([x[..., None, :], mx.zeros((b, t, f, s - 1, c), x.dtype)], axis=3)
            x = x.reshape(b, t, f * s, c)
        p = kf // 2  # upstream: padding kf//2, output_padding kf//2 (for stride > 1)
        f_out = (f - 1) * s - 2 * p + kf + (p if s > 1 else 0)
        # out[o] = sum_k w[k] * u[o + p - k]; pad u so every index is in range.
        u = mx.pad(x, [(0, 0), (0, 0), (kf - 1 - p, f_out + p - x.shape[2]), (0, 0)])
        w = self.weight[:, 0, 0, :]  # (ch, kf)
        y = None
        for k in range(kf):
            start = kf - 1 - k
            term = u[:, :, start : start + f_out, :] * w[:, k]
            y = term if y is None else y + term
        return y

    def __call__(self, x: mx.array, state: mx.array | None = None) -> tuple[mx.array, mx.array | None]:
        t = x.shape[1]
        if self.transposed:
            y = self._conv_transposed(x)
        else:
            xp, state = self._taps(x, state)
            f_out = (xp.shape[2] - self.kf) // self.fstride + 1
            y = self._conv(xp, t, f_out)
        if self.has_pointwise:
            y = y @ self.pointwise[:, :, 0, 0].T
        return _act(self.act, self.bn(y)), state


class Encoder(nn.Module):
    """ERB and DF conv pathways, DF embedding, combine, embedding backbone, LSNR head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch, nb_erb, nb_df = cfg.conv_ch, cfg.dsp.nb_erb, cfg.dsp.nb_df
        self.erb_conv0 = ConvBlock(1, ch, cfg.conv_kernel_inp)
        self.erb_conv1 = ConvBlock(ch, ch, cfg.conv_kernel, fstride=2)
        self.erb_conv2 = ConvBlock(ch, ch, cfg.conv_kernel, fstride=2)
        self.erb_conv3 = ConvBlock(ch, ch, cfg.conv_kernel, fstride=1)
        self.df_conv0 = ConvBlock(2, ch, cfg.conv_kernel_inp)
        self.df_conv1 = ConvBlock(ch, ch, cfg.conv_kernel, fstride=2)
        emb_dim = ch * nb_erb // 4
        self.df_fc_emb = GroupedLinear(ch * nb_df // 2, emb_dim, cfg.enc_linear_groups)
        self.enc_concat = cfg.enc_concat
        self.emb_gru = SqueezedBackbone(
            emb_dim * (2 if cfg.enc_concat else 1),
            cfg.emb_hidden_dim,
            emb_dim,
            num_layers=1,
            linear_groups=cfg.linear_groups,
            cfg=cfg.backbone,
        )
        self.lsnr_fc = nn.Linear(emb_dim, 1)
        self.lsnr_scale, self.lsnr_offset = cfg.lsnr_max - cfg.lsnr_min, cfg.lsnr_min

    def convs(self, feat_erb: mx.array, feat_spec: mx.array, state: State | None = None):
        """Conv pathways. feat_erb (batch, time, nb_erb, 1), feat_spec (batch, time, nb_df, 2).

        Returns e0..e3, c0, the combined embedding input (batch, time, emb_in) and the conv state.
        """
        st = state or {}
        e0, s0 = self.erb_conv0(feat_erb, st.get("erb_conv0"))
        e1, _ = self.erb_conv1(e0)
        e2, _ = self.erb_conv2(e1)
        e3, _ = self.erb_conv3(e2)
        c0, s1 = self.df_conv0(feat_spec, st.get("df_conv0"))
        c1, _ = self.df_conv1(c0)
        b, t = c1.shape[:2]
        cemb = nn.relu(self.df_fc_emb(c1.reshape(b, t, -1)))
        emb = e3.reshape(b, t, -1)
        emb = mx.concatenate([emb, cemb], axis=-1) if self.enc_concat else emb + cemb
        return e0, e1, e2, e3, c0, emb, {"erb_conv0": s0, "df_conv0": s1}

    def embed(self, emb: mx.array, state: Any = None) -> tuple[mx.array, mx.array, Any]:
        """Backbone and LSNR head: emb (batch, time, emb_in) -> emb, lsnr (batch, time, 1), state."""
        emb, state = self.emb_gru(emb, state)
        lsnr = mx.sigmoid(self.lsnr_fc(emb)) * self.lsnr_scale + self.lsnr_offset
        return emb, lsnr, state

    def __call__(self, feat_erb: mx.array, feat_spec: mx.array, state: State | None = None):
        """Returns e0..e3, emb (batch, time, emb_dim), c0, lsnr (batch, time, 1), state (upstream order)."""
        st = state or {}
        e0, e1, e2, e3, c0, emb, conv_state = self.convs(feat_erb, feat_spec, st.get("convs"))
        emb, lsnr, bb_state = self.embed(emb, st.get("emb_gru"))
        return e0, e1, e2, e3, emb, c0, lsnr, {"convs": conv_state, "emb_gru": bb_state}


class ErbDecoder(nn.Module):
    """Backbone, then a transposed-conv U-Net over the encoder skips; sigmoid ERB mask."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch = cfg.conv_ch
        emb_dim = ch * cfg.dsp.nb_erb // 4
        self.emb_gru = SqueezedBackbone(
            emb_dim,
            cfg.emb_hidden_dim,
            emb_dim,
            num_layers=cfg.emb_num_layers - 1,
            linear_groups=cfg.linear_groups,
            cfg=cfg.backbone,
        )
        self.conv3p = ConvBlock(ch, ch, 1)
        self.convt3 = ConvBlock(ch, ch, cfg.conv_kernel)
        self.conv2p = ConvBlock(ch, ch, 1)
        self.convt2 = ConvBlock(ch, ch, cfg.convt_kernel, fstride=2, transposed=True)
        self.conv1p = ConvBlock(ch, ch, 1)
        self.convt1 = ConvBlock(ch, ch, cfg.convt_kernel, fstride=2, transposed=True)
        self.conv0p = ConvBlock(ch, ch, 1)
        self.conv0_out = ConvBlock(ch, 1, cfg.conv_kernel, act="sigmoid")

    def __call__(self, emb, e3, e2, e1, e0, state: Any = None):
        """Returns the ERB mask (batch, time, nb_erb, 1) and the backbone state."""
        emb, state = self.emb_gru(emb, state)
        b, t, f8, _ = e3.shape
        emb = emb.reshape(b, t, f8, -1)
        e3 = self.convt3(self.conv3p(e3)[0] + emb)[0]
        e2 = self.convt2(self.conv2p(e2)[0] + e3)[0]
        e1 = self.convt1(self.conv1p(e1)[0] + e2)[0]
        m = self.conv0_out(self.conv0p(e0)[0] + e1)[0]
        return m, state


class DfDecoder(nn.Module):
    """Temporal pathway conv, backbone, grouped-linear skip, tanh coefficients, alpha head."""

    def __init__(self, cfg: ModelConfig, nb_df: int | None = None, df_order: int | None = None):
        super().__init__()
        ch = cfg.conv_ch
        emb_dim = ch * cfg.dsp.nb_erb // 4
        self.nb_df = nb_df or cfg.dsp.nb_df
        self.df_order = df_order or cfg.df_order
        out_ch = self.df_order * 2
        self.df_convp = ConvBlock(ch, out_ch, (cfg.df_pathway_kernel_size_t, 1))
        self.df_gru = SqueezedBackbone(
            emb_dim,
            cfg.df_hidden_dim,
            None,
            num_layers=cfg.df_num_layers,
            linear_groups=cfg.df_linear_groups,
            cfg=cfg.backbone,
        )
        self.skip_kind = cfg.df_gru_skip
        if cfg.df_gru_skip == "groupedlinear":
            self.df_skip = GroupedLinear(emb_dim, cfg.df_hidden_dim, cfg.linear_groups)
        self.df_out = GroupedLinear(cfg.df_hidden_dim, self.nb_df * out_ch, cfg.linear_groups)
        self.df_fc_a = nn.Linear(cfg.df_hidden_dim, 1)

    def __call__(self, emb: mx.array, c0: mx.array, state: State | None = None):
        """emb (batch, time, emb_dim), c0 (batch, time, nb_df, conv_ch).

        Returns coefs (batch, time, nb_df, order*2) interleaved (re, im) per tap, alpha, state.
        """
        st = state or {}
        b, t, _ = emb.shape
        c, s_gru = self.df_gru(emb, st.get("df_gru"))
        if self.skip_kind == "groupedlinear":
            c = c + self.df_skip(emb)
        elif self.skip_kind == "identity":
            c = c + emb
        alpha = mx.sigmoid(self.df_fc_a(c))
        c0, s_conv = self.df_convp(c0[:, :, : self.nb_df], st.get("df_convp"))
        coefs = mx.tanh(self.df_out(c)).reshape(b, t, self.nb_df, -1) + c0
        return coefs, alpha, {"df_gru": s_gru, "df_convp": s_conv}


def deep_filter(frames: mx.array, coefs: mx.array, order: int) -> mx.array:
    """Complex multi-frame filter: out[t] = sum_n frames[t + n] * coef[t, n].

    frames (batch, time + order - 1, bins, 2): the spectrum padded (or preceded by history) with
    ``order - 1 - lookahead`` frames before and ``lookahead`` after; coefs (batch, time, bins, order*2)
    with (re, im) interleaved per tap. Returns (batch, time, bins, 2).
    """
    b, t, f, _ = coefs.shape
    c = coefs.reshape(b, t, f, order, 2)
    re = im = None
    for n in range(order):
        s = frames[:, n : n + t]
        sr, si, cr, ci = s[..., 0], s[..., 1], c[..., n, 0], c[..., n, 1]
        r, i = sr * cr - si * ci, sr * ci + si * cr
        re = r if re is None else re + r
        im = i if im is None else im + i
    return mx.stack([re, im], axis=-1)


def post_filter(noisy: mx.array, enhanced: mx.array, beta: float, eps: float = 1e-12) -> mx.array:
    """Valin et al.'s perceptual post-filter on the effective mask |enhanced|/|noisy|, as upstream.

    noisy, enhanced (batch, time, freq, 2) -> enhanced scaled per bin.
    """

    def mag(x: mx.array) -> mx.array:
        return mx.sqrt(mx.sum(x * x, axis=-1))

    mask = mx.clip(mag(enhanced) / (mag(noisy) + eps), eps, 1.0)
    mask_sin = mask * mx.maximum(mx.sin(math.pi * mask / 2), eps)
    pf = (1 + beta) / (1 + beta * (mask / mask_sin) ** 2)
    return enhanced * pf[..., None]


class DfNet(nn.Module):
    """DeepFilterNet3 topology; the backbone at each recurrent site comes from ``cfg.backbone``."""

    def __init__(self, cfg: ModelConfig, erb_inv_fb: np.ndarray):
        super().__init__()
        self.cfg = cfg
        self.enc = Encoder(cfg)
        self.erb_dec = ErbDecoder(cfg)
        self.df_dec = DfDecoder(cfg)
        self._erb_inv = mx.array(erb_inv_fb, dtype=mx.float32)  # (nb_erb, freq), not a parameter

    def apply_mask(self, spec: mx.array, m: mx.array) -> mx.array:
        """spec (batch, time, freq, 2), m (batch, time, nb_erb) -> masked spec."""
        gain = m @ self._erb_inv
        return spec * gain[..., None]

    @property
    def df_history(self) -> int:
        """Past spectrum frames the deep filter reads: order - 1 - lookahead."""
        return self.cfg.df_order - 1 - self.cfg.df_lookahead

    def _decode(self, spec_frames, emb, e3, e2, e1, e0, c0, state: State):
        """Mask and deep filter for the output frames; spec_frames holds df_history frames before them
        and at least df_lookahead after. Returns enhanced spec (batch, time, freq, 2), mask, coefs, state."""
        cfg, t, p = self.cfg, emb.shape[1], self.df_history
        m, s_erb = self.erb_dec(emb, e3, e2, e1, e0, state.get("erb_dec"))
        m = m[..., 0]
        spec = spec_frames[:, p : p + t]
        spec_m = self.apply_mask(spec, m)
        coefs, _, s_df = self.df_dec(emb, c0, state.get("df_dec"))
        nb_df = cfg.dsp.nb_df
        low = deep_filter(spec_frames[:, : t + cfg.df_order - 1, :nb_df], coefs, cfg.df_order)
        spec_e = mx.concatenate([low, spec_m[:, :, nb_df:]], axis=2)
        if cfg.mask_pf:
            spec_e = post_filter(spec, spec_e, cfg.pf_beta)
        return spec_e, m, coefs, {"erb_dec": s_erb, "df_dec": s_df}

    def __call__(
        self, spec: mx.array, feat_erb: mx.array, feat_spec: mx.array
    ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """Offline forward, as upstream ``DfNet.forward``.

        spec (batch, time, freq, 2), feat_erb (batch, time, nb_erb), feat_spec (batch, time, nb_df, 2).
        Returns enhanced spec (batch, time, freq, 2), ERB mask (batch, time, nb_erb),
        lsnr (batch, time), DF coefficients (batch, time, nb_df, order*2).
        """
        cfg = self.cfg
        la = cfg.conv_lookahead
        feat_erb = feat_erb[..., None]
        if la > 0:  # features look ahead: frame t sees features of t + la
            feat_erb = mx.pad(feat_erb[:, la:], [(0, 0), (0, la), (0, 0), (0, 0)])
            feat_spec = mx.pad(feat_spec[:, la:], [(0, 0), (0, la), (0, 0), (0, 0)])
        e0, e1, e2, e3, emb, c0, lsnr, _ = self.enc(feat_erb, feat_spec)
        frames = mx.pad(spec, [(0, 0), (self.df_history, cfg.df_lookahead), (0, 0), (0, 0)])
        spec_e, m, coefs, _ = self._decode(frames, emb, e3, e2, e1, e0, c0, {})
        return spec_e, m, lsnr[..., 0], coefs

    def step(
        self, spec: mx.array, feat_erb: mx.array, feat_spec: mx.array, state: State | None = None
    ) -> tuple[mx.array, State]:
        """Stateful forward over the next frames of a stream; outputs lag inputs by ``conv_lookahead``.

        Same shapes as ``__call__``. Over a whole stream followed by ``flush``, the concatenated
        outputs equal ``__call__(...)[0]`` on the whole input (the tests check it).
        """
        cfg = self.cfg
        la = cfg.conv_lookahead
        assert la >= cfg.df_lookahead, "conv_lookahead must cover df_lookahead"
        b, n = spec.shape[:2]
        if state is None:
            state = {"t": 0, "spec": mx.zeros((b, self.df_history, spec.shape[2], 2), spec.dtype)}
        # Offline, features shift left by `la` frames, so a stream's first `la` feature frames are
        # never seen (the convs start from zero history at frame `la`): drop them.
        skip = min(n, max(0, la - state["t"]))
        conv_state = state.get("convs")
        if skip < n:
            e0, e1, e2, e3, c0, emb, conv_state = self.enc.convs(
                feat_erb[:, skip:, :, None], feat_spec[:, skip:], conv_state
            )
        frames = mx.concatenate([state["spec"], spec], axis=1)
        new = {"t": state["t"] + n, "convs": conv_state}
        m = n - skip
        if m == 0:
            return mx.zeros((b, 0, spec.shape[2], 2), spec.dtype), {**state, **new, "spec": frames}
        emb, _, s_emb = self.enc.embed(emb, state.get("emb_gru"))
        spec_e, _, _, s_dec = self._decode(frames, emb, e3, e2, e1, e0, c0, state)
        return spec_e, {**new, **s_dec, "emb_gru": s_emb, "spec": frames[:, m:]}

    def flush(self, state: State) -> mx.array:
        """The last ``conv_lookahead`` output frames of a stream (zero look-ahead, as offline)."""
        la = self.cfg.conv_lookahead
        b, _, f, _ = state["spec"].shape
        z = mx.zeros((b, la, f, 2))
        y, _ = self.step(
            z, mx.zeros((b, la, self.cfg.dsp.nb_erb)), mx.zeros((b, la, self.cfg.dsp.nb_df, 2)), state
        )
        return y
