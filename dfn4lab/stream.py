"""Real-time enhancement: ``StreamingEnhancer`` turns audio chunks of any length into enhanced audio.

The whole pipeline runs one hop at a time with every piece of state carried between calls: the
STFT analysis and overlap-add memories, both feature-normalisation means, and ``DfNet.step``'s
state (conv histories for the look-ahead, each backbone's state, the deep filter's past frames).
Over a whole stream followed by ``flush()`` the output equals offline ``inference.enhance``.

Delay: a hop's output frame comes ``conv_lookahead`` hops after its input frame, and overlap-add
adds ``fft_size - hop_size`` samples, so output sample ``k`` is enhanced input sample
``k - delay_samples`` (1440 samples, 30 ms, for DeepFilterNet3). Collecting a hop before it can be
processed adds up to ``hop_size`` more: ``latency_ms`` (40 ms for DeepFilterNet3, as published).
With ``compensate_delay`` (the default) the first ``delay_samples`` output samples are dropped
and ``flush()`` supplies the tail, so output aligns with input sample for sample.

Engines (``StreamingEnhancer.engine``): on the CPU, DeepFilterNet3's topology with any backbone runs
each hop as one C++ call (``native``: ``kernels/stream.cpp``, the folded weights of
:func:`native_net`): 0.2-0.3 ms a hop here, the official runtime 0.4 ms. Everything else (the DFN4
extras, the GPU) runs ``compiled``: once the look-ahead is full (``conv_lookahead + 1`` hops) one
hop is a single ``mx.compile``d function of (hop, state) -> (hop, state), ~3x faster than eager,
with the BLAS on one thread (``blas.threads``). MLX traces it once per state shape (once, or
``window`` times for windowed attention; ``warmup()`` does it ahead of time). On the CPU that hop
costs 1-3 ms: a few hundred graph nodes, each with ~2 us of dispatch on MLX's CPU stream.
Unwindowed attention's caches grow every hop, so it runs ``eager`` (or native). The MLX hop is the
reference the native one is tested against.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dfn4lab import audio, blas, data, dsp, inference, kernels
from dfn4lab.audio import AudioError
from dfn4lab.config import BACKBONES, preset
from dfn4lab.inference import _to_complex, _to_ri
from dfn4lab.layers import ConvBlock
from dfn4lab.model import DfNet

import mlx.core as mx
import numpy as np
import soxr
from mlx.utils import tree_flatten

State = dict[str, Any]
ENGINES = ("auto", "native", "compiled", "eager")
_DFN4_EXTRAS = ("enc_concat", "running_stats", "hybrid_encoder", "adaptive_order", "complex_gain", "mask_pf")
# The modules kernels/stream.cpp runs, by upstream name.
_NATIVE_CONVS = (
    *(f"enc.{n}" for n in ("erb_conv0", "erb_conv1", "erb_conv2", "erb_conv3", "df_conv0", "df_conv1")),
    *(f"erb_dec.{n}" for n in ("conv3p", "convt3", "conv2p", "convt2", "conv1p", "convt1", "conv0p")),
    "erb_dec.conv0_out",
    "df_dec.df_convp",
)
_NATIVE_LINEARS = ("enc.df_fc_emb", "df_dec.df_skip", "df_dec.df_out")
_NATIVE_BACKBONES = ("enc.emb_gru", "erb_dec.emb_gru", "df_dec.df_gru")
_NATIVE_KINDS = ("gru", "mamba", "attention")  # the cores kernels/stream.cpp runs


def _attr(obj: Any, path: str) -> Any:
    """``obj.a.b`` for ``"a.b"``."""
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def native_unsupported(model: DfNet) -> str | None:
    """Why the native (C++) hop cannot run ``model``, or None when it can: DeepFilterNet3's topology
    (no DFN4 extras) with any backbone, float32, on the CPU, kernels built."""
    c = model.cfg
    extras = [n for n in _DFN4_EXTRAS if getattr(c, n)] + (["multires_df"] if c.multires_df else [])
    if not kernels.ENABLED:
        return f"the C++ kernels are {kernels.status()}"
    if c.backbone.kind not in _NATIVE_KINDS:
        return f"it runs {', '.join(_NATIVE_KINDS)} cores, not {c.backbone.kind}"
    if mx.default_device().type != mx.DeviceType.cpu:
        return "it runs on the CPU only"
    if extras or c.df_gru_skip != "groupedlinear":
        return f"it runs DeepFilterNet3's topology (this model has {', '.join(extras) or c.df_gru_skip})"
    if c.dsp.fft_size % 2:
        return "it runs even FFT sizes"
    if c.conv_kernel[0] != 1 or c.convt_kernel[0] != 1:
        return "it runs conv kernels of one frame past the input layers"
    if any(v.dtype != mx.float32 for _, v in tree_flatten(model.parameters())):
        return "it runs float32 weights"
    return None


def native_net(model: DfNet, lim: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(cfg, net)`` for ``kernels.dfn3_stream``: the DSP constants and the eval-mode weights (BatchNorm
    folded, ``ConvBlock.folded``) as float32 numpy arrays. ``lim``: the attenuation limit's noisy-mix
    gain (None: no limit)."""
    acts = {"relu": 0, "sigmoid": 1, None: 3}

    def arr(a: Any) -> np.ndarray:
        return np.ascontiguousarray(np.array(a, dtype=np.float32))

    def conv(block: ConvBlock) -> tuple:
        w, pw, bias = block.folded()
        meta = [not block.depthwise, block.transposed, block.kt, block.kf, block.fstride]
        meta += [block.in_ch, block.out_ch, acts[block.act]]
        w = mx.stack(w) if block.depthwise else w  # taps (kt*kf, channels) or dense (out, kt, kf, in)
        return [int(m) for m in meta], arr(w), None if pw is None else arr(pw), arr(bias)

    bb = model.cfg.backbone

    def core(c: Any) -> tuple:
        """The core's layers as kernels/stream.cpp reads them (GruCore, MambaCore, AttentionCore)."""
        if bb.kind == "gru":
            return "gru", [
                tuple(map(arr, (g.weight_ih, g.bias_ih, g.weight_hh, g.bias_hh))) for g in c.layers
            ]
        if bb.kind == "mamba":
            layers = [
                (m.norm.weight, m.in_proj.weight, m.conv_weight, m.conv_bias, m.x_proj.weight)
                + (m.dt_proj.weight, m.dt_proj.bias, m.a2(), m.D, m.out_proj.weight)
                for m in c.layers
            ]
            extra: tuple = ()
        elif bb.kind == "attention":
            layers = [
                (a.norm1.weight, a.qkv.weight, a.out.weight, a.norm2.weight)
                + (a.ffn_in.weight, a.ffn_in.bias, a.ffn_out.weight, a.ffn_out.bias)
                for a in c.layers
            ]
            extra = (bb.heads, bb.window or 0)
        else:
            raise ValueError(f"the native hop has no {bb.kind} core")
        return bb.kind, [tuple(map(arr, layer)) for layer in layers], arr(c.norm.weight), *extra

    def squeezed(s: Any) -> tuple:
        out = (arr(s.linear_out.weight),) if "linear_out" in s else None
        return (arr(s.linear_in.weight),), core(s.core), out

    net: dict[str, Any] = {p: conv(_attr(model, p)) for p in _NATIVE_CONVS}
    net |= {p: (arr(_attr(model, p).weight),) for p in _NATIVE_LINEARS}
    net |= {p: squeezed(_attr(model, p)) for p in _NATIVE_BACKBONES}
    d, c = model.cfg.dsp, model.cfg
    cfg = {
        "fft_size": d.fft_size,
        "hop_size": d.hop_size,
        "conv_lookahead": c.conv_lookahead,
        "nb_df": d.nb_df,
        "df_order": c.df_order,
        "df_lookahead": c.df_lookahead,
        "alpha": float(np.float32(d.alpha)),
        "wnorm": dsp.wnorm(d),
        "lim": -1.0 if lim is None else float(lim),
        "window": dsp.window(d),
        "erb_init": arr(dsp.erb_norm_init(d)),
        "df_init": arr(dsp.df_norm_init(d)),
        "erb_widths": [int(w) for w in dsp.erb_widths(d)],
    }
    return cfg, net


class StreamingEnhancer:
    """Enhance a live stream: ``process(chunk)`` any number of times, then ``flush()``.

    ``model``: a :class:`DfNet` (put in eval mode). ``channels`` independent streams are enhanced
    as a batch; chunks are ``(samples,)`` (one channel) or ``(channels, samples)`` at ``model``'s
    rate (48 kHz for the presets). ``atten_lim_db`` limits the noise attenuation as
    ``inference.enhance`` does (default: the model config's). ``engine``: ``auto`` runs ``native``
    where :func:`native_unsupported` allows and ``compiled`` elsewhere; ``native`` raises ValueError
    where it cannot run; ``eager`` runs every hop op by op (same numbers; for debugging and for
    measuring what compilation buys). The enhancer runs the model's weights as they are when it is
    made (the compiled and native hops hold them as constants): make a new one after changing them.
    An enhancer holds one stream's state without a lock: one thread at a time (one enhancer per thread).
    """

    def __init__(
        self,
        model: DfNet,
        channels: int = 1,
        compensate_delay: bool = True,
        atten_lim_db: float | None = None,
        engine: str = "auto",
    ):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        model.eval()
        self.model, self.channels, self.compensate_delay = model, channels, compensate_delay
        self.cfg = model.cfg.dsp
        lim_db = model.cfg.atten_lim_db if atten_lim_db is None else atten_lim_db
        self._lim = 10 ** (-abs(lim_db) / 20) if lim_db else None
        why = native_unsupported(model) if engine in ("auto", "native") else "not asked for"
        if engine == "native" and why:
            raise ValueError(f"the native streaming hop cannot run this model: {why}")
        bb = model.cfg.backbone
        # Compiled hops are traced once per state shape. Unwindowed attention's caches grow every hop,
        # so every hop would be a new trace: it runs eagerly.
        grows = bb.kind == "attention" and bb.window is None
        self.engine = "native" if why is None else ("eager" if engine == "eager" or grows else "compiled")
        self._native = kernels.dfn3_stream(*native_net(model, self._lim), channels) if why is None else None
        self._compiled = mx.compile(self._full_hop) if self.engine == "compiled" else None
        self.reset()

    @property
    def hop_size(self) -> int:
        return self.cfg.hop_size

    @property
    def sr(self) -> int:
        return self.cfg.sr

    @property
    def delay_samples(self) -> int:
        """Output lags input by this many samples: ``fft - hop`` (overlap-add) + look-ahead hops."""
        return self.cfg.fft_size - self.cfg.hop_size + self.model.cfg.conv_lookahead * self.cfg.hop_size

    @property
    def latency_ms(self) -> float:
        """Algorithmic latency: ``delay_samples`` plus the hop collected before it is processed."""
        return 1000.0 * (self.delay_samples + self.cfg.hop_size) / self.cfg.sr

    def warmup(self) -> None:
        """Trace the compiled hop for every state shape a stream goes through, on silence, then reset.

        Without it the first compiled hops of the first stream pay for tracing (~10-20 ms each).
        The native engine has nothing to trace.
        """
        if self._native is not None:
            return
        bb = self.model.cfg.backbone
        fill = (bb.window or 0) if bb.kind == "attention" else 0  # hops until attention caches are full
        silence = np.zeros((self.channels, self.cfg.hop_size), np.float32)
        for _ in range(self.model.cfg.conv_lookahead + fill + 2):
            self.process(silence)
        self.reset()

    def reset(self) -> None:
        """Start a new stream (all state cleared; compiled traces are kept and reused)."""
        b, cfg = self.channels, self.cfg
        if self._native is not None:  # the native engine keeps its state in C++
            self._native.reset()
        else:
            mem = cfg.fft_size - cfg.hop_size
            self._state: State = {
                "analysis": mx.zeros((b, mem)),
                "synthesis": mx.zeros((b, mem)),
                "erb": mx.broadcast_to(dsp.erb_norm_init(cfg), (b, cfg.nb_erb)),
                "df": mx.broadcast_to(dsp.df_norm_init(cfg), (b, cfg.nb_df)),
                "net": None,
            }
            if self._lim is not None:  # the noisy frames of the look-ahead, for mixing back
                la = self.model.cfg.conv_lookahead
                self._state["noisy"] = mx.zeros((b, la, cfg.freq_bins), mx.complex64)
            # evaluated here: a lazy array belongs to this thread's stream (MLX >= 0.31.2), and the
            # hops may run on another thread (the microphone's audio callback)
            mx.eval(self._state)
        self._pending = np.zeros((b, 0), np.float32)  # input samples short of a whole hop
        self._samples_in = 0
        self._samples_out = 0  # raw (delayed) output samples produced, including dropped ones
        self._mono = self.channels == 1  # return (samples,) like the last chunk given

    # --- one hop -------------------------------------------------------------------------------

    def _hop(self, x: mx.array, state: State) -> tuple[mx.array | None, State]:
        """One hop ``(batch, hop)`` through analysis, features, ``model.step`` and synthesis.

        Returns the output hop (None while the model's look-ahead fills) and the new state. Pure in
        ``(x, state)`` so it can be compiled; ``state["net"]["t"]`` is the only Python number in it.
        """
        cfg, model = self.cfg, self.model
        spec, analysis = dsp.analysis_step(x, state["analysis"], cfg)
        frame = spec[:, None]  # (batch, 1, freq)
        erb, erb_state = dsp.erb_feature(frame, cfg, state["erb"], return_state=True)
        dfs, df_state = dsp.df_feature(frame, cfg, state["df"], return_state=True)
        y, net = model.step(_to_ri(frame), erb, _to_ri(dfs), state["net"])
        new = {**state, "analysis": analysis, "erb": erb_state, "df": df_state, "net": net}
        if self._lim is not None:
            noisy = mx.concatenate([state["noisy"], frame], axis=1)  # [0] is the output frame's input
            new["noisy"] = noisy[:, 1:]
        if y.shape[1] == 0:
            return None, new
        out = _to_complex(y[:, 0])
        if self._lim is not None:
            out = noisy[:, 0] * self._lim + out * (1 - self._lim)
        hop, new["synthesis"] = dsp.synthesis_step(out, state["synthesis"], cfg)
        return hop, new

    def _full_hop(self, x: mx.array, state: State) -> tuple[mx.array, State]:
        """``_hop`` once the look-ahead is full: the frame counter is fixed, so the graph is too."""
        la = self.model.cfg.conv_lookahead
        out, new = self._hop(x, {**state, "net": {**state["net"], "t": la + 1}})
        new["net"].pop("t")
        return out, new

    def _step(self, x: mx.array) -> mx.array | None:
        """Advance the stream by one hop: compiled once the look-ahead is full, eager before."""
        state = self._state
        with blas.threads(1):  # batch-1 rows: BLAS threads only add wake-up latency
            net = state["net"]
            if self._compiled is not None and net is not None and net["t"] > self.model.cfg.conv_lookahead:
                out, new = self._compiled(x, {**state, "net": {k: v for k, v in net.items() if k != "t"}})
                new["net"]["t"] = net["t"] + 1
            else:
                out, new = self._hop(x, state)
            mx.eval(out, new)
        self._state = new
        return out

    # --- public --------------------------------------------------------------------------------

    def _as_channels(self, chunk: np.ndarray) -> np.ndarray:
        x = audio.as_float(chunk)  # integer PCM scaled to [-1, 1)
        x = x[None] if x.ndim == 1 else x
        if x.ndim != 2 or x.shape[0] != self.channels:
            raise AudioError(f"expected a ({self.channels}, samples) chunk, got shape {np.shape(chunk)}")
        if not np.isfinite(x).all():
            raise AudioError("audio chunk contains NaN or inf")
        return x

    def _emit(self, hops: list[np.ndarray], limit: int | None = None) -> np.ndarray:
        """Raw output hops -> the samples to hand out (drops the compensated delay, stops at limit)."""
        raw = np.concatenate(hops, axis=1) if hops else np.zeros((self.channels, 0), np.float32)
        start = self._samples_out
        self._samples_out += raw.shape[1]
        skip = max(0, (self.delay_samples if self.compensate_delay else 0) - start)
        end = raw.shape[1] if limit is None else max(0, limit - start)
        return raw[:, skip:end]

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        """Feed whole hops of ``x`` (batch, k*hop); returns their raw output hops."""
        hop, hops = self.cfg.hop_size, []
        for i in range(0, x.shape[1], hop):
            if self._native is not None:  # zeros while the look-ahead fills, as below
                hops.append(np.zeros((self.channels, hop), np.float32))
                self._native.process(np.ascontiguousarray(x[:, i : i + hop]), hops[-1])
                continue
            out = self._step(mx.array(x[:, i : i + hop]))
            hops.append(np.zeros((self.channels, hop), np.float32) if out is None else np.array(out))
        return hops

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Enhance the next ``chunk`` ``(samples,)`` or ``(channels, samples)``, any length.

        Returns the enhanced samples now available (same layout as ``chunk``): whole hops, fewer at
        the start of a delay-compensated stream.
        """
        x = self._as_channels(chunk)
        self._samples_in += x.shape[1]
        buf = np.concatenate([self._pending, x], axis=1)
        whole = buf.shape[1] - buf.shape[1] % self.cfg.hop_size
        self._pending = buf[:, whole:]
        y = self._emit(self._run(buf[:, :whole]))
        self._mono = np.ndim(chunk) == 1
        return y[0] if self._mono else y

    def flush(self) -> np.ndarray:
        """End the stream: returns the remaining output and resets for the next stream.

        Pads the input with zeros as ``inference.enhance`` does, so over the whole stream the output
        has as many samples as the input (delay-compensated) or ``delay_samples`` more.
        """
        cfg = self.cfg
        total_frames = (self._samples_in + cfg.fft_size) // cfg.hop_size
        zeros = np.zeros((self.channels, total_frames * cfg.hop_size - self._samples_in), np.float32)
        hops = self._run(np.concatenate([self._pending, zeros], axis=1))
        # a stream shorter than the look-ahead got fewer than la placeholder hops: complete them
        la = self.model.cfg.conv_lookahead
        hops += [np.zeros((self.channels, cfg.hop_size), np.float32)] * max(0, la - total_frames)
        if self._native is not None:
            tail = np.zeros((self.channels, la * cfg.hop_size), np.float32)
            hops.append(tail[:, : self._native.flush(tail) * cfg.hop_size])
        elif self._state["net"] is not None:
            y = _to_complex(self.model.flush(self._state["net"]))  # (batch, <= la, freq)
            noisy = self._state.get("noisy")
            syn = self._state["synthesis"]
            k = y.shape[1]
            for i in range(k):
                out = y[:, i]
                if self._lim is not None:  # the last k noisy frames are the flushed frames' inputs
                    out = noisy[:, noisy.shape[1] - k + i] * self._lim + out * (1 - self._lim)
                h, syn = dsp.synthesis_step(out, syn, cfg)
                hops.append(np.array(h))
        limit = self._samples_in + self.delay_samples
        y = self._emit(hops, limit)
        mono = self._mono
        self.reset()
        return y[0] if mono else y


# --- files, microphone, benchmark ----------------------------------------------------------------


def stream_array(enh: StreamingEnhancer, x: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Feed ``x`` (samples,) at the model rate through ``enh`` in ``chunk``-sample pieces, then flush.

    Returns the output (delay compensated if ``enh`` is) and, for every ``process`` call that ran
    whole hops, its wall time per hop (s). With chunks of at most a hop (a live source's usual
    blocks) that is each hop's processing time; a chunk of several hops is timed as a whole and
    shared out, though a live source waits for all of it.
    """
    outs, times, hop = [], [], enh.hop_size
    for i in range(0, x.size, chunk):
        hops = min(i + chunk, x.size) // hop - i // hop  # hops this call completes
        t = time.perf_counter()
        outs.append(enh.process(x[i : i + chunk]))
        if hops:
            times.append((time.perf_counter() - t) / hops)
    outs.append(enh.flush())
    return np.concatenate(outs), np.asarray(times)


def stream_file(src: str | Path, dest: str | Path, model: DfNet, chunk_ms: float = 10.0) -> Path:
    """Enhance a file as a live source would deliver it: ``chunk_ms`` chunks, streaming resampling.

    Any rate and channel count; the output keeps both, the length (delay compensated) and the input's
    sample format (``audio.save_like``). Written atomically, so a failure leaves no partial file.
    """
    if not 0 < chunk_ms < math.inf:
        raise ValueError(f"chunk_ms must be a positive number, got {chunk_ms}")
    audio.check_not_input(src, dest)
    audio.check_output(dest)  # before the stream, not after it
    x, sr = audio.load(src)
    chunk = max(1, round(sr * chunk_ms / 1000))
    ch, msr = x.shape[0], model.cfg.dsp.sr
    enh = StreamingEnhancer(model, channels=ch)
    if sr == msr:
        outs = [enh.process(x[:, i : i + chunk]) for i in range(0, x.shape[1], chunk)] + [enh.flush()]
        y = np.concatenate(outs, axis=1)
    else:  # soxr's streaming resamplers, delay compensated: the same numbers as audio.resample
        down, up = soxr.ResampleStream(sr, msr, ch), soxr.ResampleStream(msr, sr, ch)
        outs = []
        for i in range(0, x.shape[1], chunk):
            last = i + chunk >= x.shape[1]
            z = enh.process(down.resample_chunk(x[:, i : i + chunk].T, last=last).T)
            outs.append(up.resample_chunk(z.T).T)
        outs.append(up.resample_chunk(enh.flush().T, last=True).T)
        y = np.concatenate(outs, axis=1)[:, : x.shape[1]]
        y = np.pad(y, [(0, 0), (0, x.shape[1] - y.shape[1])])
    audio.save_like(src, dest, y, sr)  # the input's sample format, as enhance_file
    return Path(dest)


def microphone(model: DfNet, seconds: float | None = None, dest: str | Path | None = None) -> None:
    """Enhance the default microphone to the default speakers live (needs ``sounddevice``).

    Runs until Ctrl-C (or SIGTERM, from the command line) or ``seconds``; ``dest`` records the enhanced
    audio, checked before the session starts. Delay is not compensated (``delay_samples`` of output
    latency, one hop out for every hop in).
    """
    try:
        import sounddevice as sd
    except ImportError:
        raise RuntimeError("live input needs sounddevice: pip install sounddevice") from None
    if dest is not None:  # a recording refused after the session, before: lost
        audio.check_output(dest)
    enh = StreamingEnhancer(model, compensate_delay=False)
    enh.warmup()
    recorded: list[np.ndarray] = []

    def callback(indata: np.ndarray, outdata: np.ndarray, frames: int, _time: Any, status: Any) -> None:
        y = enh.process(indata[:, 0])
        outdata[:, 0] = np.pad(y, (0, frames - y.size))
        recorded.append(y)

    with sd.Stream(samplerate=enh.sr, blocksize=enh.hop_size, channels=1, dtype="float32", callback=callback):
        print(f"streaming at {enh.sr} Hz, latency {enh.latency_ms:.0f} ms; Ctrl-C stops", file=sys.stderr)
        try:
            sd.sleep(int(seconds * 1000) if seconds else 2**31 - 1)
        except KeyboardInterrupt:
            pass
    if dest is not None and recorded:
        audio.save(dest, np.concatenate(recorded), enh.sr)


def _hop_times(process: Callable[[np.ndarray], object], x: np.ndarray, hop: int) -> list[float]:
    """Seconds per ``process(hop samples)`` call over ``x``."""
    times = []
    for i in range(0, x.size - hop + 1, hop):
        t = time.perf_counter()
        process(x[i : i + hop])
        times.append(time.perf_counter() - t)
    return times


def benchmark(seconds: float = 10.0, rounds: int = 3, window: int = 64) -> dict[str, Any]:
    """Per-hop time of ``StreamingEnhancer`` for dfn3 and dfn4 with every backbone, and of the
    official DeepFilterNet3 runtime, on the same noisy clip; ``rtf`` is total time over audio time.

    ``cases`` run their default engine (reported); each case that runs native is also timed as its
    compiled MLX hop (``compiled``), the engine of other devices. dfn3 with the GRU uses the official
    weights, the rest random weights (same cost). Attention runs with a ``window``-frame window
    (unwindowed attention's cost grows with the stream).
    """
    noisy, _ = data.noisy_clip(seconds=seconds, snr_db=5.0)
    cases: dict[tuple[str, str, str], StreamingEnhancer] = {}  # (model, backbone, "default" | "compiled")
    for name in ("dfn3", "dfn4"):
        for kind in BACKBONES:
            bb = {"kind": kind, "window": window if kind == "attention" else None}
            model = inference.load_pretrained("dfn3") if (name, kind) == ("dfn3", "gru") else None
            enh = StreamingEnhancer(model or inference.build(preset(name, backbone=bb)))
            cases[name, kind, "default"] = enh
            if enh.engine == "native":
                cases[name, kind, "compiled"] = StreamingEnhancer(enh.model, engine="compiled")
    for enh in cases.values():
        enh.warmup()
    hop, sr = 480, 48000  # every case and the official runtime
    block = 50 * hop  # round-robin in 0.5 s blocks: the same machine load for all, warm caches within
    times: dict[Any, list[float]] = {key: [] for key in [*cases, "official"]}
    for _ in range(rounds):
        official = inference.official_runtime()
        _hop_times(official.process_chunk, noisy[: 20 * hop], hop)  # warm-up
        procs = {**{key: enh.process for key, enh in cases.items()}, "official": official.process_chunk}
        for i in range(0, noisy.size, block):
            for key, process in procs.items():
                times[key] += _hop_times(process, noisy[i : i + block], hop)
        for enh in cases.values():
            enh.flush()

    def summary(ts: list[float]) -> dict[str, float]:
        ms = 1000 * np.asarray(ts)
        rtf = ms.sum() / (1000 * len(ms) * hop / sr)
        return {
            "median_ms": round(float(np.median(ms)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "rtf": round(float(rtf), 4),
        }

    def rows(which: str) -> list[dict[str, Any]]:
        return [
            {"model": m, "backbone": k, "engine": enh.engine, **summary(times[m, k, w])}
            for (m, k, w), enh in cases.items()
            if w == which
        ]

    result = {"cases": rows("default"), "official": summary(times["official"]), "compiled": rows("compiled")}
    official_row = {"model": "official", "backbone": "dfn3", "engine": "rust", **result["official"]}
    for c in [*result["cases"], *result["compiled"], official_row]:
        print(f"{c['model']:>8} {c['backbone']:<9} {c['engine']:<8}", end=" ")
        print(f"median {c['median_ms']:.3f} ms  p99 {c['p99_ms']:.3f} ms  rtf {c['rtf']:.3f}")
    return result
