"""DfNet4: DeepFilterNet3's topology with a swappable backbone at every recurrent site.

Layout is channels-last throughout: feature maps are ``(batch, time, freq, channels)``,
spectra ``(batch, time, freq, 2)`` (real, imaginary). Module and parameter names follow
upstream DeepFilterNet (``enc.erb_conv0``, ``erb_dec.convt2``, ``df_dec.df_out``...) so
converting a checkpoint is a rename table (``dfn4lab.convert``).

Every module that looks back in time takes and returns a ``state`` (conv history frames,
backbone states), so a stream of one frame at a time computes exactly the offline result.
The DFN4 extras are config switches (``ModelConfig``): multi-resolution DF heads, an adaptive
DF order, the hybrid (waveform + phase) encoder, LSNR dropout, complex-gain output, the mask
post-filter and running feature statistics. With all of them off (preset ``dfn3``) this is
exactly DeepFilterNet3.
"""

from __future__ import annotations

from typing import Any

from dfn4lab.activations import sigmoid, tanh
from dfn4lab.backbones import GroupedLinear, SqueezedBackbone
from dfn4lab.config import ModelConfig
from dfn4lab.layers import BatchNorm, ConvBlock, HybridEncoder, deep_filter, post_filter

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

State = dict[str, Any]
# lsnr_dropout: frames predicted below this are silenced (zero mask, zero DF coefficients), in training
# only. (Upstream's DfNet drops them from the decoders' input sequences, at inference too; here the
# network runs on every frame and only the training forward zeroes their outputs.)
LSNR_DROPOUT_DB = -10.0


class Encoder(nn.Module):
    """ERB and DF conv pathways, DF embedding, combine, embedding backbone, LSNR head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch, nb_erb, nb_df = cfg.conv_ch, cfg.dsp.nb_erb, cfg.dsp.nb_df
        if cfg.running_stats:  # running mean/variance of the input features, learned in training
            self.erb_stats = BatchNorm(nb_erb, affine=False)
            self.spec_stats = BatchNorm(2 * nb_df, affine=False)
        self.erb_conv0 = ConvBlock(1, ch, cfg.conv_kernel_inp)
        self.erb_conv1 = ConvBlock(ch, ch, cfg.conv_kernel, fstride=2)
        self.erb_conv2 = ConvBlock(ch, ch, cfg.conv_kernel, fstride=2)
        self.erb_conv3 = ConvBlock(ch, ch, cfg.conv_kernel, fstride=1)
        self.df_conv0 = ConvBlock(2, ch, cfg.conv_kernel_inp)
        self.df_conv1 = ConvBlock(ch, ch, cfg.conv_kernel, fstride=2)
        emb_dim = ch * nb_erb // 4
        self.df_fc_emb = GroupedLinear(ch * nb_df // 2, emb_dim, cfg.enc_linear_groups)
        self.enc_concat = cfg.enc_concat
        if cfg.hybrid_encoder:
            self.hybrid = HybridEncoder(cfg.dsp.fft_size, nb_df, emb_dim, heads=cfg.backbone.heads)
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

    def convs(self, feat_erb: mx.array, feat_spec: mx.array, state: State | None = None, spec=None):
        """Conv pathways. feat_erb (batch, time, nb_erb, 1), feat_spec (batch, time, nb_df, 2);
        spec (batch, time, freq, 2) of the same frames, used by the hybrid encoder only.

        Returns e0..e3, c0, the combined embedding input (batch, time, emb_in) and the conv state.
        """
        st = state or {}
        if "erb_stats" in self:
            feat_erb = self.erb_stats(feat_erb[..., 0])[..., None]
            b, t, f, _ = feat_spec.shape
            feat_spec = self.spec_stats(feat_spec.reshape(b, t, -1)).reshape(b, t, f, 2)
        e0, s0 = self.erb_conv0(feat_erb, st.get("erb_conv0"))
        e1, _ = self.erb_conv1(e0)
        e2, _ = self.erb_conv2(e1)
        e3, _ = self.erb_conv3(e2)
        c0, s1 = self.df_conv0(feat_spec, st.get("df_conv0"))
        c1, _ = self.df_conv1(c0)
        b, t = c1.shape[:2]
        cemb = nn.relu(self.df_fc_emb(c1.reshape(b, t, -1)))
        emb = e3.reshape(b, t, -1)
        if "hybrid" in self:
            emb = self.hybrid(emb, spec)
        emb = mx.concatenate([emb, cemb], axis=-1) if self.enc_concat else emb + cemb
        return e0, e1, e2, e3, c0, emb, {"erb_conv0": s0, "df_conv0": s1}

    def embed(self, emb: mx.array, state: Any = None) -> tuple[mx.array, mx.array, Any]:
        """Backbone and LSNR head: emb (batch, time, emb_in) -> emb, lsnr (batch, time, 1), state."""
        emb, state = self.emb_gru(emb, state)
        lsnr = sigmoid(self.lsnr_fc(emb)) * self.lsnr_scale + self.lsnr_offset
        return emb, lsnr, state

    def __call__(self, feat_erb: mx.array, feat_spec: mx.array, state: State | None = None, spec=None):
        """Returns e0..e3, emb (batch, time, emb_dim), c0, lsnr (batch, time, 1), state (upstream order)."""
        st = state or {}
        e0, e1, e2, e3, c0, emb, conv_state = self.convs(feat_erb, feat_spec, st.get("convs"), spec)
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
        return self.unet(emb, e3, e2, e1, e0), state

    def unet(self, emb, e3, e2, e1, e0) -> mx.array:
        """Conv decoder on the backbone output emb (batch, time, emb_dim) -> mask (batch, time, nb_erb, 1)."""
        b, t, f8, _ = e3.shape
        emb = emb.reshape(b, t, f8, -1)
        e3 = self.convt3(self.conv3p(e3)[0] + emb)[0]
        e2 = self.convt2(self.conv2p(e2)[0] + e3)[0]
        e1 = self.convt1(self.conv1p(e1)[0] + e2)[0]
        return self.conv0_out(self.conv0p(e0)[0] + e1)[0]


class DfHead(nn.Module):
    """One set of DF coefficients: temporal pathway conv on c0 plus tanh(grouped linear of the backbone)."""

    def __init__(self, cfg: ModelConfig, bins: int, order: int):
        super().__init__()
        self.bins, self.order = bins, order
        self.df_convp = ConvBlock(cfg.conv_ch, 2 * order, (cfg.df_pathway_kernel_size_t, 1))
        self.df_out = GroupedLinear(cfg.df_hidden_dim, bins * 2 * order, cfg.linear_groups)

    def __call__(self, c: mx.array, c0: mx.array, state: mx.array | None = None):
        """c (batch, time, hidden), c0 (batch, time, nb_df, conv_ch) -> coefs (batch, time, bins, order*2)."""
        b, t, _ = c.shape
        p, state = self.df_convp(c0[:, :, : self.bins], state)
        return tanh(self.df_out(c)).reshape(b, t, self.bins, -1) + p, state


def df_heads(cfg: ModelConfig) -> list[tuple[int, int, int]]:
    """(bins, order, lookahead) of every DF head; the first is the main one.

    ``complex_gain`` replaces the filter by a per-bin complex gain (order 1, no lookahead).
    """
    main = (cfg.dsp.nb_df, 1, 0) if cfg.complex_gain else (cfg.dsp.nb_df, cfg.df_order, cfg.df_lookahead)
    # the extra heads are filters whatever the main head is, with the configured look-ahead
    extra = [(bins, o, min(cfg.df_lookahead, o - 1)) for bins, o in cfg.multires_df]
    return [main, *extra]


class DfDecoder(nn.Module):
    """Backbone, grouped-linear skip, DF heads sharing the backbone, alpha head, adaptive-order head.

    The main head keeps upstream's names (``df_convp``, ``df_out``); extra resolutions live in ``heads``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        emb_dim = cfg.conv_ch * cfg.dsp.nb_erb // 4
        (bins, order, _), *extra = df_heads(cfg)
        main = DfHead(cfg, bins, order)
        self.df_convp, self.df_out = main.df_convp, main.df_out
        self.bins, self.order = bins, order
        self.heads = [DfHead(cfg, b, o) for b, o, _ in extra]
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
        self.df_fc_a = nn.Linear(cfg.df_hidden_dim, 1)
        if cfg.adaptive_order:
            self.order_fc = nn.Linear(cfg.df_hidden_dim, order)

    def __call__(self, emb: mx.array, c0: mx.array, state: State | None = None):
        """emb (batch, time, emb_dim), c0 (batch, time, nb_df, conv_ch).

        Returns a list of coefs per head (batch, time, bins, order*2), (re, im) interleaved per tap,
        alpha (batch, time, 1), and the state.
        """
        st = state or {}
        c, s_gru = self.df_gru(emb, st.get("df_gru"))
        return self.heads_from(c, s_gru, emb, c0, st)

    def heads_from(self, c: mx.array, s_gru: Any, emb: mx.array, c0: mx.array, st: State):
        """Everything after the backbone; c (batch, time, hidden) is its output."""
        b, t, _ = emb.shape
        if self.skip_kind == "groupedlinear":
            c = c + self.df_skip(emb)
        elif self.skip_kind == "identity":
            c = c + emb
        alpha = sigmoid(self.df_fc_a(c))
        p, s_conv = self.df_convp(c0[:, :, : self.bins], st.get("df_convp"))
        coefs = tanh(self.df_out(c)).reshape(b, t, self.bins, -1) + p
        if "order_fc" in self:
            coefs = coefs * mx.repeat(self._tap_weights(c), 2, axis=-1)[:, :, None]
        heads = [coefs]
        s_heads = []
        for i, head in enumerate(self.heads):
            h, s = head(c, c0, (st.get("heads") or [None] * len(self.heads))[i])
            heads.append(h)
            s_heads.append(s)
        return heads, alpha, {"df_gru": s_gru, "df_convp": s_conv, "heads": s_heads}

    def _tap_weights(self, c: mx.array) -> mx.array:
        """Adaptive order: a per-frame distribution over orders 1..N; tap n is kept with the
        probability that the order exceeds n (taps are ordered oldest first, so low orders keep the
        newest frames). c (batch, time, hidden) -> (batch, time, order)."""
        p = mx.softmax(self.order_fc(c), axis=-1)  # p[k]: order k+1
        keep_newest = mx.cumsum(p[..., ::-1], axis=-1)[..., ::-1]  # P(order >= n+1)
        return keep_newest[..., ::-1]  # oldest tap is kept only when the order is the full N


class DfNet(nn.Module):
    """DeepFilterNet3 topology; the backbone at each recurrent site comes from ``cfg.backbone``."""

    def __init__(self, cfg: ModelConfig, erb_inv_fb: np.ndarray):
        super().__init__()
        self.cfg = cfg
        self.enc = Encoder(cfg)
        self.erb_dec = ErbDecoder(cfg)
        self.df_dec = DfDecoder(cfg)
        self._heads = df_heads(cfg)
        self._erb_inv = mx.array(erb_inv_fb, dtype=mx.float32)  # (nb_erb, freq), not a parameter

    @property
    def lookahead(self) -> int:
        """Frames of look-ahead: features (conv) and deep filter; the stream delay in frames."""
        return self.cfg.conv_lookahead

    @property
    def df_history(self) -> int:
        """Past spectrum frames the deep filters read: max(order - 1 - lookahead) over heads."""
        return max(o - 1 - la for _, o, la in self._heads)

    def apply_mask(self, spec: mx.array, m: mx.array) -> mx.array:
        """spec (batch, time, freq, 2), m (batch, time, nb_erb) -> masked spec."""
        gain = m @ self._erb_inv
        return spec * gain[..., None]

    def _filter(self, spec_frames: mx.array, heads: list[mx.array], t: int) -> mx.array:
        """Deep filter of every head over its bins; bins covered by several heads are averaged."""
        p, nb_df = self.df_history, self._heads[0][0]
        acc = count = None
        for (bins, order, la), coefs in zip(self._heads, heads, strict=True):
            start = p - (order - 1 - la)
            y = deep_filter(spec_frames[:, start : start + t + order - 1, :bins], coefs, order)
            y = mx.pad(y, [(0, 0), (0, 0), (0, nb_df - bins), (0, 0)])
            c = (mx.arange(nb_df) < bins).astype(y.dtype)
            acc, count = (y, c) if acc is None else (acc + y, count + c)
        return acc / count[:, None] if len(heads) > 1 else acc

    def _decode(self, spec_frames, emb, e3, e2, e1, e0, c0, lsnr, state: State):
        """Mask and deep filter for the output frames; spec_frames holds df_history frames before them
        and the look-ahead after. Returns enhanced spec (batch, time, freq, 2), mask, coefs, state."""
        cfg, t, p = self.cfg, emb.shape[1], self.df_history
        st_df = state.get("df_dec") or {}
        c_erb, s_erb = self.erb_dec.emb_gru(emb, state.get("erb_dec"))
        c_df, s_gru = self.df_dec.df_gru(emb, st_df.get("df_gru"))
        m = self.erb_dec.unet(c_erb, e3, e2, e1, e0)[..., 0]
        heads, _, s_df = self.df_dec.heads_from(c_df, s_gru, emb, c0, st_df)
        if cfg.lsnr_dropout and self.training:  # frames judged pure noise get no mask nor filter
            keep = mx.stop_gradient(lsnr > LSNR_DROPOUT_DB).astype(m.dtype)
            m = m * keep
            heads = [h * keep[..., None] for h in heads]
        spec = spec_frames[:, p : p + t]
        spec_m = self.apply_mask(spec, m)
        nb_df = cfg.dsp.nb_df
        spec_e = mx.concatenate([self._filter(spec_frames, heads, t), spec_m[:, :, nb_df:]], axis=2)
        if cfg.mask_pf:
            spec_e = post_filter(spec, spec_e, cfg.pf_beta)
        return spec_e, m, heads[0], {"erb_dec": s_erb, "df_dec": s_df}

    def __call__(
        self, spec: mx.array, feat_erb: mx.array, feat_spec: mx.array
    ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """Offline forward, as upstream ``DfNet.forward``.

        spec (batch, time, freq, 2), feat_erb (batch, time, nb_erb), feat_spec (batch, time, nb_df, 2).
        Returns enhanced spec (batch, time, freq, 2), ERB mask (batch, time, nb_erb),
        lsnr (batch, time), DF coefficients of the main head (batch, time, nb_df, order*2).
        """
        la = self.cfg.conv_lookahead

        # The encoder reads every feature frame, and its output for frame t falls on spectrum frame
        # t - la, as in the official runtime (libDF's DfTract): frame t sees features up to t + la. The
        # last la outputs see zero features past the end; the first la (before frame 0) are dropped.
        # (Upstream's Python forward instead drops the first la feature frames; its output differs from
        # the runtime's in the first ~second and the runtime is what DeepFilterNet3 ships.)
        def ahead(x: mx.array) -> mx.array:
            return mx.pad(x, [(0, 0), (0, la)] + [(0, 0)] * (x.ndim - 2))

        e0, e1, e2, e3, emb, c0, lsnr, _ = self.enc(
            ahead(feat_erb[..., None]), ahead(feat_spec), spec=ahead(spec)
        )
        frames = mx.pad(spec, [(0, 0), (self.df_history + la, la), (0, 0), (0, 0)])
        spec_e, m, coefs, _ = self._decode(frames, emb, e3, e2, e1, e0, c0, lsnr, {})
        return spec_e[:, la:], m[:, la:], lsnr[:, la:, 0], coefs[:, la:]

    def step(
        self, spec: mx.array, feat_erb: mx.array, feat_spec: mx.array, state: State | None = None
    ) -> tuple[mx.array, State]:
        """Stateful forward over the next frames of a stream; outputs lag inputs by ``lookahead`` frames.

        Same shapes as ``__call__``. Over a whole stream followed by ``flush``, the concatenated
        outputs equal ``__call__(...)[0]`` on the whole input (the tests check it).
        """
        la = self.cfg.conv_lookahead
        b, n = spec.shape[:2]
        if state is None:  # the spectrum before the stream: the first la outputs fall on it
            state = {"t": 0, "spec": mx.zeros((b, self.df_history + la, spec.shape[2], 2), spec.dtype)}
        if n == 0:
            return mx.zeros((b, 0, spec.shape[2], 2), spec.dtype), state
        e0, e1, e2, e3, c0, emb, conv_state = self.enc.convs(
            feat_erb[..., None], feat_spec, state.get("convs"), spec=spec
        )
        frames = mx.concatenate([state["spec"], spec], axis=1)
        emb, lsnr, s_emb = self.enc.embed(emb, state.get("emb_gru"))
        spec_e, _, _, s_dec = self._decode(frames, emb, e3, e2, e1, e0, c0, lsnr, state)
        new = {"t": state["t"] + n, "convs": conv_state, **s_dec, "emb_gru": s_emb, "spec": frames[:, n:]}
        return spec_e[:, max(0, la - state["t"]) :], new

    def flush(self, state: State) -> mx.array:
        """The last ``lookahead`` output frames of a stream (zero look-ahead, as offline)."""
        la = self.cfg.conv_lookahead
        b, _, f, _ = state["spec"].shape
        dsp = self.cfg.dsp
        zeros = (mx.zeros((b, la, f, 2)), mx.zeros((b, la, dsp.nb_erb)), mx.zeros((b, la, dsp.nb_df, 2)))
        return self.step(*zeros, state)[0]


def summary(model: DfNet, frames: int = 10) -> str:
    """Parameters per module and tensor shapes through the network, as a text table."""
    rows = [("module", "parameters")]
    for name, child in [("enc", model.enc), ("erb_dec", model.erb_dec), ("df_dec", model.df_dec)]:
        for sub, mod in child.children().items():
            mods = mod if isinstance(mod, list) else [mod]
            n = sum(v.size for m in mods for _, v in tree_flatten(m.trainable_parameters()))
            if n:
                rows.append((f"{name}.{sub}", f"{n:,}"))
    total = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    rows.append(("total (trainable; BatchNorm statistics not counted)", f"{total:,}"))
    d = model.cfg.dsp
    spec = mx.zeros((1, frames, d.freq_bins, 2))
    feat_erb, feat_spec = mx.zeros((1, frames, d.nb_erb)), mx.zeros((1, frames, d.nb_df, 2))
    training = model.training
    model.eval()  # a training-mode forward would update BatchNorm's running statistics
    e0, e1, e2, e3, emb, c0, lsnr, _ = model.enc(feat_erb[..., None], feat_spec, spec=spec)
    out, m, _, coefs = model(spec, feat_erb, feat_spec)
    model.train(training)
    shapes = {
        "spec": spec,
        "feat_erb": feat_erb,
        "feat_spec": feat_spec,
        "e0": e0,
        "e1": e1,
        "e2": e2,
        "e3": e3,
        "c0": c0,
        "emb": emb,
        "lsnr": lsnr,
        "mask": m,
        "coefs": coefs,
        "enhanced": out,
    }
    rows.append(("", ""))
    rows.append(("tensor", "shape (batch, time, ...)"))
    rows += [(k, str(tuple(v.shape))) for k, v in shapes.items()]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)
