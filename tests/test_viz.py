"""dfn4lab.viz: what the figures and widgets show, read back from their axes (not by eye)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from dfn4lab import evaluate, viz

import numpy as np

SR = 48000


def test_spectrograms_share_one_level_scale():
    """dBFS: a sine at 0.1 of full scale reads -20 dB beside a full-scale one, not 0 dB (per-panel
    normalisation made a 20 dB quieter output look the same)."""
    t = np.arange(SR) / SR
    fig = viz.spectrograms(
        {"loud": np.sin(2 * np.pi * 1000 * t), "quiet": 0.1 * np.sin(2 * np.pi * 1000 * t)}, SR
    )
    peaks = [ax.images[0].get_array().max() for ax in fig.axes if ax.images]
    assert -1.5 < peaks[0] <= 0.0 and abs(peaks[1] - peaks[0] + 20) < 0.1  # Hann scalloping: <= 1.42 dB
    assert any(ax.get_ylabel() == "dBFS" for ax in fig.axes)  # the colorbars say what the colours mean
    long = viz.spectrogram(np.zeros(SR * 600, np.float32), SR)  # 10 minutes: drawn with at most ~4000 frames
    assert long.axes[0].images[0].get_array().shape[1] <= 4001


def test_benchmark_error_bars_span_the_quartiles():
    row = {"backbone": "gru", "variant": "matched", "params": 1e6}
    row |= {
        f"{m}_{k}": v
        for m in ("fwd", "fwdbwd", "step")
        for k, v in (("ms", 10.0), ("q25_ms", 9.0), ("q75_ms", 13.0))
    }
    fig = viz.bench_bars([row])
    errorbar = fig.axes[0].containers[0]  # the forward bars' error bar
    lo, hi = errorbar.lines[2][0].get_segments()[0][:, 1]
    assert (lo, hi) == (9.0, 13.0)


def test_mixing_panel_offers_only_rooms_that_exist_and_redraws_without_an_output_widget():
    """The spectrogram is PNG bytes in an Image widget: an Output widget makes nbclient send on the shell
    socket it waits on for the cell's reply, which stalled notebook runs until their timeout."""
    import ipywidgets as w

    rng = np.random.default_rng(0)
    panel = viz.mixing_panel(
        rng.standard_normal(SR).astype(np.float32) * 0.1, rng.standard_normal(SR).astype(np.float32) * 0.1, SR
    )
    sliders, image, player = panel.children
    snr, rt60 = sliders.children[:2]
    assert 0.1 not in rt60.options and min(o for o in rt60.options if o) == 0.2
    assert isinstance(image, w.Image) and bytes(image.value[:4]) == b"\x89PNG"
    before = bytes(image.value), bytes(player.value)
    rt60.value = 0.2  # a room is simulated without an error
    assert bytes(image.value) != before[0] and bytes(player.value) != before[1]
    snr.value = 20
    assert bytes(image.value) != before[0]

    def widgets(x):
        return [x, *(y for c in getattr(x, "children", ()) for y in widgets(c))]

    assert not any(isinstance(x, w.Output) for x in widgets(panel))


def test_excluded_values_match_their_metric_exactly():
    row = {"flags": "si_sdr: item: silent reference; pesq: estimate: too short"}
    assert evaluate.excluded(row, "si_sdr") and not evaluate.excluded(row, "sdr")  # "sdr" is in "si_sdr"
    assert not evaluate.excluded(row, "pesq")  # an estimate's fault counts, at the worst value


def test_metric_vs_snr_draws_the_bins_that_have_the_metric_with_their_file_counts():
    def row(file: str, snr: float, pesq: float, flags: str = "") -> dict:
        return {"model": "m", "file": file, "snr": snr, "flags": flags, "dropouts": 0, "pesq": pesq}

    rows = [row("a", evaluate.NOISE_ONLY_SNR, 1.0, "pesq: item: silent reference")]
    rows += [row(f"b{i}", 0.0, 1.5 + 0.5 * i) for i in range(3)] + [row("c", 20.0, 4.5)]
    fig = viz.metric_vs_snr({"summary": evaluate.summarize(rows, ["pesq"])}, "pesq")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0..5\nn=3", ">= 20\nn=1"]  # no empty bin
    assert ax.get_ylim() == (1.0, 4.65)  # PESQ's own range, whatever the intervals of few files
    np.testing.assert_allclose(np.asarray(ax.lines[0].get_ydata(), float), [2.0, 4.5])


def test_train_board_shows_an_image_and_updates_it_in_place(monkeypatch):
    """IPython has no display formatter for a Figure made outside pyplot: displayed as such, notebook 04's
    live board showed only "<Figure size 1200x320 with 3 Axes>"."""
    import IPython
    import IPython.display

    shown = []

    class Handle:
        def update(self, obj):
            shown.append(("update", obj))

    def display(obj, display_id=False):
        shown.append(("display", obj))
        return Handle()

    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(IPython.display, "display", display)
    board = viz.TrainBoard(every=1)
    for step in (1, 2):
        board.update({"kind": "step", "step": step, "loss": 1.0 / step, "lr": 1e-3})
    assert [how for how, _ in shown] == ["display", "update"]
    for _, obj in shown:  # an IPython Image (with a PNG repr), not the Figure
        assert isinstance(obj, IPython.display.Image) and obj.data[:4] == b"\x89PNG"


def test_spectrogram_axes_and_players_levels():
    """Time runs along x and frequency along y in kHz (a 1 kHz tone reads 1 kHz); players are
    peak-normalised WAV; the loss curve's running mean is a mean."""
    import io

    import soundfile as sf

    t = np.arange(2 * SR) / SR
    img = viz.spectrogram(np.sin(2 * np.pi * 1000 * t), SR).axes[0].images[0]
    assert img.get_extent() == [0, 2.0, 0, SR / 2000] and img.get_array().shape[0] == 1024 // 2 + 1
    peak_row = int(np.argmax(img.get_array().max(axis=1)))
    assert abs(peak_row / (img.get_array().shape[0] - 1) * SR / 2000 - 1.0) < SR / 1024 / 1000  # one bin
    y, _ = sf.read(io.BytesIO(viz.wav_bytes(0.25 * np.sin(2 * np.pi * 440 * t[:SR]), SR)))
    assert abs(np.abs(y).max() - 32767 / 32768) < 1e-3
    y, _ = sf.read(io.BytesIO(viz.wav_bytes(np.zeros(SR), SR)))
    assert not y.any()
    steps = [{"kind": "step", "step": i, "loss": 2.0 + (i % 2), "lr": 1e-3} for i in range(1, 51)]
    fig = viz.training_curves(steps, [], smooth=10)
    mean = next(line for line in fig.axes[0].lines if line.get_label() == "train")
    assert mean.get_xdata()[0] == 10 and np.allclose(mean.get_ydata(), 2.5)  # alternating 2, 3


def test_stream_bench_reads_its_medians_on_a_linear_axis():
    case = {"model": "dfn3", "backbone": "gru", "engine": "native", "median_ms": 0.21, "p99_ms": 0.6}
    slow = case | {"engine": "compiled", "median_ms": 2.4, "p99_ms": 5.3}
    fig = viz.stream_bench({"cases": [case, slow], "official": {"median_ms": 0.41}})
    ax = fig.axes[0]
    assert ax.get_yscale() == "linear" and [t.get_text() for t in ax.texts] == ["0.21", "2.40"]
    assert [t.xy[1] for t in ax.texts] == [0.6, 5.3]  # over the whiskers: not under a short bar's
    assert ax.get_ylim()[1] > 5.3 * 1.1  # and inside the axes
