"""StreamingEnhancer == offline ``inference.enhance`` for every preset, backbone and engine (the C++
hop against the MLX hop as well); the stream CLI."""

from __future__ import annotations

import contextlib
import sys
import threading
from types import SimpleNamespace

import dfn4lab  # noqa: F401
from dfn4lab import audio, config, data, inference, kernels
from dfn4lab.__main__ import main
from dfn4lab.audio import AudioError
from dfn4lab.backbones import MambaBlock
from dfn4lab.config import preset
from dfn4lab.stream import StreamingEnhancer, microphone, native_net, native_unsupported

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from conftest import tiny_cfg

TOL = 1e-4


def _speechlike(n: int, seed: int = 0, channels: int | None = None) -> np.ndarray:
    """Voiced-speech-like syllables (harmonics of a gliding pitch, 2.5 Hz bursts) in pink noise."""
    rows = []
    for c in range(channels or 1):
        rng = np.random.default_rng(seed + 100 * c)
        t = np.arange(n) / 48000
        f0 = rng.uniform(100, 200) + 20 * np.sin(2 * np.pi * 1.5 * t)
        phase = 2 * np.pi * np.cumsum(f0) / 48000
        voiced = sum(np.sin(k * phase) / k for k in range(1, 30)) * np.clip(
            np.sin(2 * np.pi * 2.5 * t), 0, None
        )
        rows.append(0.1 * voiced + 0.02 * data.pink_noise(n, seed=seed + c))
    x = np.stack(rows).astype(np.float32)
    return x[0] if channels is None else x


def _stream(enh: StreamingEnhancer, x: np.ndarray, chunks: list[int]) -> np.ndarray:
    """Feed ``x`` in chunks of the given sizes (cycled), then flush."""
    outs, i, k = [], 0, 0
    while i < x.shape[-1]:
        c = chunks[k % len(chunks)]
        outs.append(enh.process(x[..., i : i + c]))
        i, k = i + c, k + 1
    outs.append(enh.flush())
    return np.concatenate(outs, axis=-1)


@pytest.fixture(scope="module")
def dfn3():
    return inference.load_pretrained("dfn3")


# the native hop is the CPU's (on a Mac the default device is the GPU: the compiled MLX hop runs there)
NATIVE = kernels.active()
needs_native = pytest.mark.skipif(not NATIVE, reason="dfn4lab.kernels not built or disabled, or not the CPU")


@pytest.mark.parametrize(
    "chunks, engine",
    [
        ([480], "auto"),
        ([173], "auto"),
        ([1000, 7, 2400, 1], "auto"),
        ([173], "compiled"),
        pytest.param([1000, 7, 2400, 1], "native", marks=needs_native),
    ],
)
def test_dfn3_official_weights_match_offline(dfn3, chunks, engine):
    x = _speechlike(48000 - 137)  # not whole hops: flush pads the last one
    ref = inference.enhance(x, 48000, dfn3)
    enh = StreamingEnhancer(dfn3, engine=engine)
    y = _stream(enh, x, chunks)
    assert y.shape == x.shape
    assert np.abs(y - ref).max() < TOL
    assert np.abs(ref).max() > 0.01  # speech kept: the comparison is not between near-silences


@pytest.mark.parametrize(
    "cfg, engine",
    [
        (tiny_cfg(backbone="gru"), "auto"),  # native where the kernels are built
        (tiny_cfg(backbone="gru"), "compiled"),
        (tiny_cfg(backbone="mamba"), "auto"),
        (tiny_cfg(backbone={"kind": "attention", "window": 8}), "auto"),
        (tiny_cfg(backbone="attention"), "auto"),  # unwindowed: stays eager
        (preset("dfn4-lite"), "auto"),
    ],
    ids=["gru", "gru-compiled", "mamba", "attention-window8", "attention-full", "dfn4-lite"],
)
def test_every_backbone_matches_offline(cfg, engine):
    mx.random.seed(0)
    model = inference.build(cfg)
    x = _speechlike(24000 + 1, seed=1)
    ref = inference.enhance(x, 48000, model)
    enh = StreamingEnhancer(model, engine=engine)
    y = _stream(enh, x, [311, 1200, 5])
    assert np.abs(y - ref).max() < TOL
    # the same enhancer again: flush reset every state, and the compiled hop is reused
    np.testing.assert_array_equal(_stream(enh, x, [480]), y)


@pytest.mark.parametrize(
    "backbone",
    ["gru", "mamba", {"kind": "attention", "window": 8}, "attention"],
    ids=["gru", "mamba", "attention-window8", "attention-full"],
)
def test_engines_agree_hop_by_hop(backbone):
    """Every engine gives the eager MLX hop's output, hop by hop (native: the C++ hop, random weights
    of another size than dfn3's, two channels with different audio, an attenuation limit)."""
    mx.random.seed(0)
    model = inference.build(tiny_cfg(backbone=backbone))
    for _, m in model.named_modules():  # Mamba: the output from the SSM state alone, and a lively state
        if isinstance(m, MambaBlock):  # (init's dt of 1e-3..0.1 hid a 0.1 % error in its input: 6e-6)
            m.D, m.dt_proj.bias = mx.zeros_like(m.D), mx.full(m.dt_proj.bias.shape, 1.0)
    x = _speechlike(9600, seed=2, channels=2)
    engines = ["eager", "compiled"] + (["native"] if NATIVE else [])
    enhs = {e: StreamingEnhancer(model, channels=2, atten_lim_db=20.0, engine=e) for e in engines}
    outs: dict[str, list[np.ndarray]] = {e: [] for e in engines}
    for i in range(0, x.shape[1], 480):
        for e, enh in enhs.items():
            outs[e].append(enh.process(x[:, i : i + 480]))
    for e, enh in enhs.items():
        outs[e].append(enh.flush())
    ref = np.concatenate(outs["eager"], axis=1)
    assert ref.shape == x.shape and np.abs(ref).max() > 1e-3
    # 1e-5 of full scale: rounding and the rational activations give <= 1e-6; a 0.1 % error in a GRU gate
    # gives 2e-5 here, in the SSM state's input 5e-5, in attention's scale or RoPE angle more.
    for e in engines[1:]:
        np.testing.assert_allclose(
            np.concatenate(outs[e], axis=1), ref, atol=1e-5 * np.abs(ref).max(), err_msg=e
        )


def test_engine_choice():
    mx.random.seed(0)
    gru, dfn4 = inference.build(tiny_cfg()), inference.build(tiny_cfg("dfn4", backbone="gru"))
    assert StreamingEnhancer(dfn4).engine == "compiled"
    assert StreamingEnhancer(dfn4, engine="eager").engine == "eager"
    assert "topology" in native_unsupported(dfn4)
    with pytest.raises(ValueError, match="native streaming hop cannot run this model: .*topology"):
        StreamingEnhancer(dfn4, engine="native")
    with pytest.raises(ValueError, match="engine must be one of"):
        StreamingEnhancer(gru, engine="fast")
    with kernels.disabled():  # DFN4LAB_KERNELS=0, or not built: the MLX hop
        assert StreamingEnhancer(gru).engine == "compiled"
        assert "kernels" in native_unsupported(gru)
    if NATIVE:
        assert native_unsupported(gru) is None and StreamingEnhancer(gru).engine == "native"
    if NATIVE:  # a core a researcher adds is not run as attention's math (or a crash in native_net)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(config, "BACKBONES", (*config.BACKBONES, "conv"))
            conv = SimpleNamespace(cfg=tiny_cfg(backbone="conv"))
            assert native_unsupported(conv) == "it runs gru, mamba, attention cores, not conv"
    odd = inference.build(tiny_cfg(dsp={"fft_size": 961, "hop_size": 480}))
    assert "even FFT" in native_unsupported(odd) and StreamingEnhancer(odd).engine == "compiled"
    with pytest.raises(ValueError, match="channels must be >= 1"):
        StreamingEnhancer(gru, channels=0)


@needs_native
def test_native_hop_writes_into_float32_contiguous_out_only():
    """A float64 or strided ``out`` would be converted to a temporary copy and the hops lost."""
    mx.random.seed(0)
    hop = kernels.dfn3_stream(*native_net(inference.build(tiny_cfg()).eval()), 1)
    x = np.zeros((1, 480), np.float32)
    for out in (np.zeros((1, 480)), np.zeros((1, 960), np.float32)[:, ::2]):
        with pytest.raises(TypeError):
            hop.process(x, out)
        with pytest.raises(TypeError):
            hop.flush(out)


@pytest.mark.parametrize("engine", ["compiled", "eager"])
def test_hops_run_on_another_thread_than_the_set_up(engine):
    """The microphone's audio callback runs on its own thread (on a Mac, where the engine is compiled):
    MLX streams belong to a thread, so the state a reset leaves must not be lazy."""
    mx.random.seed(0)
    enh = StreamingEnhancer(inference.build(tiny_cfg()), engine=engine)
    enh.warmup()  # on this thread, as stream.microphone does
    x = _speechlike(4800, seed=6)
    got: dict = {}
    worker = threading.Thread(target=lambda: got.update(y=_stream(enh, x, [480])))
    worker.start()
    worker.join()
    np.testing.assert_allclose(got["y"], _stream(enh, x, [480]), atol=1e-6)


@pytest.mark.parametrize("n", [100, 1000, 2000])
def test_streams_shorter_than_the_lookahead(n):
    """A 5-frame look-ahead and streams of 2, 4 and 6 frames: every engine still gives offline's
    samples, and the undelayed stream ``delay_samples`` more."""
    mx.random.seed(0)
    model = inference.build(tiny_cfg(conv_lookahead=5))
    x = _speechlike(n, seed=5)
    ref = inference.enhance(x, 48000, model)
    for engine in ["eager", "compiled"] + (["native"] if NATIVE else []):
        enh = StreamingEnhancer(model, engine=engine)
        np.testing.assert_allclose(_stream(enh, x, [480]), ref, atol=1e-6, err_msg=engine)
        raw = _stream(StreamingEnhancer(model, engine=engine, compensate_delay=False), x, [480])
        assert raw.size == n + enh.delay_samples, engine


def test_uncompensated_stream_is_delayed_offline(dfn3):
    x = _speechlike(19200, seed=3)
    ref = inference.enhance(x, 48000, dfn3)
    enh = StreamingEnhancer(dfn3, compensate_delay=False)
    d = enh.delay_samples
    # published DeepFilterNet3 figures: 30 ms output delay (the official runtime's), 40 ms latency
    assert d == inference.OFFICIAL_DELAY and enh.latency_ms == pytest.approx(40.0)
    first = enh.process(x[:4800])
    assert first.size == 4800  # one hop out per hop in, from the start
    y = np.concatenate([first, _stream(enh, x[4800:], [480])])
    assert y.size == x.size + d
    assert np.abs(y[d:] - ref).max() < TOL


def test_channels_and_attenuation_limit(dfn3):
    x = _speechlike(14400 + 333, seed=4, channels=2)
    ref = inference.enhance(x, 48000, dfn3, atten_lim_db=12.0)
    enh = StreamingEnhancer(dfn3, channels=2, atten_lim_db=12.0)
    y = _stream(enh, x, [700])
    assert y.shape == x.shape
    assert np.abs(y - ref).max() < TOL
    assert np.abs(y - inference.enhance(x, 48000, dfn3)).max() > 10 * TOL  # the limit did something


def test_bad_chunks_are_rejected(dfn3):
    enh = StreamingEnhancer(dfn3)
    with pytest.raises(AudioError, match="chunk"):
        enh.process(np.zeros((2, 480), np.float32))
    with pytest.raises(AudioError, match="NaN"):
        enh.process(np.full(480, np.nan, np.float32))


def test_cli_streams_files(tmp_path, capsys, dfn3):
    src48, out48 = tmp_path / "a.wav", tmp_path / "a_out.wav"
    x = _speechlike(9600, seed=5)
    sf.write(src48, x, 48000, subtype="FLOAT")
    assert main(["stream", str(src48), "-o", str(out48), "--chunk-ms", "7"]) == 0
    y, sr = audio.load(out48)
    assert sr == 48000
    ref = inference.enhance(audio.load(src48)[0][0], 48000, dfn3)
    assert (
        sf.info(out48).subtype == "FLOAT" and np.abs(y[0] - ref).max() < TOL
    )  # the input's format, not PCM_16
    assert main(["stream", str(src48), "-o", str(tmp_path / "mac.aif")]) == 0  # another container, asked for
    assert (sf.info(tmp_path / "mac.aif").format, sf.info(tmp_path / "mac.aif").subtype) == ("AIFF", "FLOAT")
    # another rate and two channels: resampled to 48 kHz and back, streaming
    src16, out16 = tmp_path / "b.flac", tmp_path / "b_out.flac"
    sf.write(src16, _speechlike(4000, seed=6, channels=2).T, 16000)
    assert main(["stream", str(src16), "-o", str(out16)]) == 0
    y, sr = audio.load(out16)
    assert sr == 16000 and y.shape == (2, 4000) and np.abs(y).max() > 0


def test_cli_bad_input_leaves_no_file(tmp_path, capsys):
    empty, out = tmp_path / "empty.wav", tmp_path / "out.wav"
    empty.write_bytes(b"")
    assert main(["stream", str(empty), "-o", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert main(["stream", str(tmp_path / "missing.wav"), "-o", str(out)]) != 0
    assert main(["stream", str(empty), "-o", str(out), "--chunk-ms", "0"]) != 0
    assert capsys.readouterr().err.count("error:") == 2
    assert list(tmp_path.iterdir()) == [empty]
    src = tmp_path / "in.wav"
    sf.write(src, _speechlike(4800, seed=3), 48000, subtype="FLOAT")
    before = src.read_bytes()
    assert main(["stream", str(src), "-o", str(src)]) == 2  # it overwrote its input before
    assert "would replace the input" in capsys.readouterr().err and src.read_bytes() == before
    assert main(["stream", str(src), "-o", str(tmp_path)]) == 2  # the folder holds the input: its name
    assert "would replace the input" in capsys.readouterr().err and src.read_bytes() == before
    assert main(["stream", str(src), "-o", f"{tmp_path / 'new'}/"]) == 0  # a folder: a file "new", before
    assert (tmp_path / "new" / "in.wav").is_file()
    assert main(["stream", str(src), "-o", str(tmp_path / "new" / "sub" / "o.wav")]) == 0  # folders made


class _FakeSoundDevice:
    """Stands in for ``sounddevice``: ``sleep`` drives the stream's callback with hops of ``source``."""

    def __init__(self, source: np.ndarray):
        self.source, self.played = source, []

    def Stream(self, samplerate, blocksize, channels, dtype, callback):  # noqa: N802 (sounddevice's name)
        self.blocksize, self.callback = blocksize, callback
        return contextlib.nullcontext()

    def sleep(self, ms: int) -> None:
        n = self.blocksize
        for i in range(0, self.source.size - n + 1, n):
            out = np.zeros((n, 1), np.float32)
            self.callback(self.source[i : i + n, None], out, n, None, None)
            self.played.append(out[:, 0].copy())


def test_microphone_plays_the_delayed_stream(dfn3, tmp_path, monkeypatch):
    x = _speechlike(4800, seed=7)
    fake = _FakeSoundDevice(x)
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    microphone(dfn3, seconds=0.1, dest=tmp_path / "rec.wav")
    expected = StreamingEnhancer(dfn3, compensate_delay=False).process(x)
    np.testing.assert_array_equal(np.concatenate(fake.played), expected)
    rec, sr = audio.load(tmp_path / "rec.wav")
    assert sr == 48000 and np.abs(rec[0] - expected).max() < 2**-15
    # an output save cannot write is refused before the session, not after it (the recording lost)
    fake.played.clear()
    (tmp_path / "recdir").mkdir()
    for dest, message in (
        (tmp_path / "rec.xyz", "unknown audio format"),
        (tmp_path / "recdir", "is a folder"),
    ):
        with pytest.raises(AudioError, match=message):
            microphone(dfn3, seconds=0.1, dest=dest)
    assert fake.played == []


def test_integer_pcm_chunks_are_read_at_their_scale(dfn3):
    """int16 samples (``sf.read(dtype="int16")``) stream and enhance as the float signal they encode,
    not 32768 times louder."""
    pcm = np.round(_speechlike(4800, seed=9) * 32767).astype(np.int16)
    as_float = pcm / 32768.0
    np.testing.assert_allclose(
        inference.enhance(pcm, 48000, dfn3), inference.enhance(as_float, 48000, dfn3), atol=1e-6
    )
    a, b = StreamingEnhancer(dfn3), StreamingEnhancer(dfn3)
    np.testing.assert_allclose(a.process(pcm), b.process(as_float), atol=1e-6)
