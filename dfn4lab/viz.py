"""Plots and audio widgets for the notebooks. Plot functions take an optional ``ax`` and return the Figure;
nothing here calls ``plt.show()``."""

from __future__ import annotations

import io
import os
from pathlib import Path

from dfn4lab.paths import FIGURES, atomic_write

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter


def _ax(ax=None, figsize=(8, 3)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def spectrogram(x: np.ndarray, sr: int, ax=None, title: str = "", n_fft: int = 1024, vmin: float = -100.0):
    """Log-power spectrogram of ``x`` (samples,) in dBFS (0 dB: a full-scale sine), the same scale for
    every signal, so noisy, enhanced and clean compare in level. At most ~4000 frames (long signals are
    drawn with a longer hop)."""
    fig, ax = _ax(ax)
    if len(x) < n_fft:
        raise ValueError(f"signal too short for a spectrogram ({len(x)} < {n_fft} samples)")
    hop = max(n_fft // 4, len(x) // 4000)
    win = np.hanning(n_fft).astype(np.float32)
    n = 1 + (len(x) - n_fft) // hop
    frames = np.stack([x[i * hop : i * hop + n_fft] * win for i in range(n)]).astype(np.float32)
    full_scale = (win.sum() / 2) ** 2  # a full-scale sine's peak bin power
    db = 10 * np.log10(np.abs(np.fft.rfft(frames, axis=-1)) ** 2 / full_scale + 1e-12)
    im = ax.imshow(
        db.T,
        origin="lower",
        aspect="auto",
        vmin=vmin,
        vmax=0,
        cmap="magma",
        extent=[0, len(x) / sr, 0, sr / 2000],
    )
    fig.colorbar(im, ax=ax, label="dBFS", pad=0.01)
    ax.set(xlabel="time (s)", ylabel="kHz", title=title)
    return fig


def spectrograms(signals: dict[str, np.ndarray], sr: int, width: float = 10.0):
    """One spectrogram row per named signal, shared axes."""
    fig, axes = plt.subplots(len(signals), 1, figsize=(width, 2.2 * len(signals)), sharex=True, sharey=True)
    for ax, (name, x) in zip(np.atleast_1d(axes), signals.items(), strict=True):
        spectrogram(x, sr, ax=ax, title=name)
        if ax is not np.atleast_1d(axes)[-1]:
            ax.set_xlabel("")
    fig.tight_layout()
    return fig


def heatmap(a: np.ndarray, ax=None, title: str = "", ylabel: str = "", cmap: str = "viridis", **kw):
    """``a`` (time, bins) as an image with time on x."""
    fig, ax = _ax(ax)
    im = ax.imshow(np.asarray(a).T, origin="lower", aspect="auto", cmap=cmap, **kw)
    fig.colorbar(im, ax=ax)
    ax.set(xlabel="frame", ylabel=ylabel, title=title)
    return fig


def trace(y: np.ndarray, ax=None, title: str = "", ylabel: str = "", xlabel: str = "frame"):
    fig, ax = _ax(ax)
    ax.plot(np.asarray(y))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    return fig


def deep_filter_op(
    out: dict, sr: int, k: int, start: int = 0, frames: int = 80, lookahead: int = 2, hop: int | None = None
):
    """The deep filter at STFT bin ``k``: ``Y[t] = sum_n c[t, n] X[t - (order - 1 - lookahead) + n]``.

    ``out``: ``inference.analyze``'s result. Top: the complex taps' magnitudes over the frames (which
    past and future frames each output frame draws on); bottom: the bin's level in and out.
    """
    c = np.abs(out["coefs"][start : start + frames, k])  # (frames, order)
    order = c.shape[1]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    extent = (start, start + frames, -0.5, order - 0.5)
    im = top.imshow(c.T, origin="lower", aspect="auto", cmap="viridis", extent=extent)
    fig.colorbar(im, ax=[top, bottom], fraction=0.04, label="|c[t, n]| (top panel)")
    past = order - 1 - lookahead
    top.set_yticks(range(order), [f"t{n - past:+d}" if n != past else "t" for n in range(order)])
    hz = k * sr / (2 * (out["spec"].shape[1] - 1))
    top.set(ylabel="input frame", title=f"deep filter at bin {k} ({hz:.0f} Hz): |c[t, n]|")
    t = np.arange(start, start + frames)
    for name, spec in (("noisy X", out["spec"]), ("enhanced Y", out["enhanced_spec"])):
        bottom.plot(t, 20 * np.log10(np.abs(spec[start : start + frames, k]) + 1e-9), label=name)
    bottom.set(xlabel=f"frame ({1000 * hop / sr:g} ms hops)" if hop else "frame", ylabel="|STFT bin| (dB)")
    bottom.legend()
    bottom.grid(alpha=0.3)
    return fig


def filterbank(fb: np.ndarray, sr: int, ax=None, title: str = "ERB filterbank"):
    """Band weights ``fb`` (freq, bands) against frequency, log-frequency (ERB bands are narrow at the
    bottom: on a linear axis the lowest ~20 of 32 crowd below 1.5 kHz)."""
    fig, ax = _ax(ax)
    f = np.linspace(0, sr / 2, fb.shape[0]) / 1000
    ax.set_prop_cycle(color=plt.cm.viridis(np.linspace(0, 0.9, fb.shape[1])))  # one colour a band
    ax.plot(f[1:], fb[1:], drawstyle="steps-mid")  # rectangular bands, bin by bin; DC has no log position
    title = f"{title} ({fb.shape[1]} bands; the DC bin, in band 0, off the log axis)"
    ax.set(xlabel="kHz", ylabel="weight", title=title, xscale="log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    return fig


def wav_bytes(x: np.ndarray, sr: int) -> bytes:
    """``x`` (samples,) as peak-normalised 16-bit WAV file bytes, for audio widgets."""
    import soundfile as sf

    x = np.asarray(x, dtype=np.float32).reshape(-1)
    peak = float(np.abs(x).max()) if x.size else 0.0
    buf = io.BytesIO()
    sf.write(buf, x / peak if peak > 0 else x, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def audio_widget(x: np.ndarray, sr: int):
    """An ipywidgets audio player for ``x`` (samples,), peak-normalised, sent as WAV bytes.

    A widget (binary comm buffers) rather than ``IPython.display.Audio`` inside an ``Output``: the
    latter's base64 path took a minute per 10 s clip under nbclient.
    """
    import ipywidgets as w

    return w.Audio(value=wav_bytes(x, sr), format="wav", autoplay=False, loop=False)


def players(signals: dict[str, np.ndarray], sr: int):
    """ipywidgets row of labelled audio players (normalised for listening)."""
    import ipywidgets as w

    return w.HBox([w.VBox([w.Label(name), audio_widget(x, sr)]) for name, x in signals.items()])


def save(fig, name: str) -> Path:
    """Save ``fig`` as ``figures/NAME.png`` (atomically) and return the path. In quick mode
    (``DFN4LAB_QUICK=1``, as ``make test`` runs the notebooks) into ``figures/quick/``, so tests never
    replace the full runs' figures the README shows."""
    folder = FIGURES / "quick" if os.environ.get("DFN4LAB_QUICK") == "1" else FIGURES
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_write(folder / f"{name}.png", lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))


# --- Backbone benchmark (notebook 03) ---------------------------------------------------------------


def _quartile_err(rows: list[dict], name: str) -> list[list[float]]:
    """Error bars (below, above) from ``{name}_ms`` to its quartiles ``{name}_q25_ms``/``_q75_ms`` (none
    in results saved before quartiles were)."""
    med = [r[f"{name}_ms"] for r in rows]
    lo = [m - r.get(f"{name}_q25_ms", m) for r, m in zip(rows, med, strict=True)]
    return [lo, [r.get(f"{name}_q75_ms", m) - m for r, m in zip(rows, med, strict=True)]]


def bench_bars(rows: list[dict], metrics=("fwd", "fwdbwd", "step"), ax=None):
    """Median time per backbone and measurement, error bars from the first to the third quartile; rows
    from ``bench.backbones``."""
    fig, ax = _ax(ax, figsize=(9, 3.5))
    labels = [f"{r['backbone']}\n{r['variant']}\n{r['params'] / 1e6:.2f} M" for r in rows]
    width = 0.8 / len(metrics)
    x = np.arange(len(rows))
    for i, m in enumerate(metrics):
        ax.bar(
            x + i * width,
            [r[f"{m}_ms"] for r in rows],
            width,
            yerr=_quartile_err(rows, m),
            capsize=3,
            label={"fwd": "forward", "fwdbwd": "forward+backward", "step": "train step"}[m],
        )
    ax.set_xticks(x + width * (len(metrics) - 1) / 2, labels)
    ax.set(ylabel="ms (median, quartiles)", title="DfNet with each backbone")
    ax.legend()
    return fig


def bench_memory(rows: list[dict], ax=None):
    fig, ax = _ax(ax, figsize=(6, 3))
    ax.bar([f"{r['backbone']}\n{r['variant']}" for r in rows], [r["peak_mb"] for r in rows], color="tab:gray")
    ax.set(ylabel="MB", title="peak memory of a training step")
    return fig


def bench_sweep(sweep: list[dict], ax=None):
    """Forward time against sequence length per backbone, log-log (slope 1 = linear, 2 = quadratic);
    error bars from the first to the third quartile."""
    fig, ax = _ax(ax, figsize=(6, 3.5))
    for kind in dict.fromkeys(r["backbone"] for r in sweep):
        rows = [r for r in sweep if r["backbone"] == kind]
        ms = [r["fwd_ms"] for r in rows]
        ax.errorbar(
            [r["frames"] for r in rows],
            ms,
            yerr=_quartile_err(rows, "fwd"),
            marker="o",
            capsize=2,
            label=kind,
        )
    ax.set(xscale="log", yscale="log")
    ax.set_xticks(sorted({r["frames"] for r in sweep}))
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    for axis in (ax.xaxis, ax.yaxis):  # 600, not 6x10^2
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="frames", ylabel="forward ms (batch 1)", title="scaling with sequence length")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


# --- Evaluation (results of dfn4lab.evaluate) -------------------------------------------------------


def _label(metric: str) -> str:
    from dfn4lab.evaluate import LABELS

    return LABELS.get(metric, metric)


METRIC_RANGE = {"pesq": (1.0, 4.65), "stoi": (0.0, 1.0), "estoi": (0.0, 1.0), "dnsmos_ovrl": (1.0, 5.0)}


def metric_vs_snr(result: dict, metric: str = "pesq", ax=None):
    """Mean and 95 % CI of ``metric`` per SNR bin, one line per model; ``result`` from ``evaluate``."""
    fig, ax = _ax(ax, figsize=(6, 3.5))
    models = list(result["summary"]["overall"])

    def n(b: dict) -> int:  # files in a bin that have the metric (noise-only files have no PESQ)
        return max(((b.get(m, {}).get(metric) or {}).get("n") or 0 for m in models), default=0)

    bins = {k: b for k, b in result["summary"]["snr_bins"].items() if n(b)}
    x = np.arange(len(bins))
    for k, model in enumerate(models):
        stats = [bins[b].get(model, {}).get(metric) or {"mean": None, "ci": None} for b in bins]
        mean = [np.nan if s["mean"] is None else s["mean"] for s in stats]
        ci = [0.0 if s["ci"] is None else s["ci"] for s in stats]
        # styles differ and points are offset a little: models that score alike (dfn3, official) stay visible
        ax.errorbar(
            x + 0.06 * (k - (len(models) - 1) / 2), mean, yerr=ci, capsize=3, label=model,
            marker="os^Dvx*"[k % 7], ls=["-", "--", ":", "-."][k % 4],
        )  # fmt: skip
    ax.set_xticks(x, [f"{k}\nn={n(b)}" for k, b in bins.items()])
    ax.set(xlabel="SNR bin (dB); n files", ylabel=_label(metric), title=f"{_label(metric)} against input SNR")
    if metric in METRIC_RANGE:  # a few files make wide intervals: keep to the scale's own range
        ax.set_ylim(*METRIC_RANGE[metric])
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def improvement_hist(result: dict, metric: str = "pesq", baseline: str = "noisy", ax=None, bins: int = 20):
    """Histogram over files of each model's ``metric`` minus the ``baseline``'s on the same file."""
    fig, ax = _ax(ax, figsize=(6, 3.5))
    rows = [r for r in result["rows"] if f"{metric}: item:" not in r["flags"]]  # undefined for every model
    base = {r["file"]: r[metric] for r in rows if r["model"] == baseline}
    models = [m for m in result["summary"]["overall"] if m != baseline]
    deltas = [[r[metric] - base[r["file"]] for r in rows if r["model"] == m] for m in models]
    ax.hist(deltas, bins=bins, label=models, alpha=0.8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set(xlabel=f"Δ {_label(metric)} vs {baseline}", ylabel="files", title="improvement per file")
    ax.legend()
    return fig


def _signals(result: dict, file: str, models: list[str] | None = None) -> dict[str, Path]:
    """Audio paths of one evaluated file: noisy, clean, then each model's output."""
    item = next(i for i in result["items"] if i["name"] == file)
    paths = {"noisy": Path(item["noisy"]), "clean": Path(item["clean"])}
    for r in result["rows"]:
        if r["file"] == file and r["model"] != "noisy" and (models is None or r["model"] in models):
            paths[r["model"]] = Path(r["path"])
    return paths


def spectrogram_grid(result: dict, files: list[str], models: list[str] | None = None, width: float = 5.0):
    """Spectrograms of noisy, clean and each model's output (rows) for ``files`` (columns)."""
    from dfn4lab import audio

    columns = [_signals(result, f, models) for f in files]
    names = list(columns[0])
    fig, axes = plt.subplots(
        len(names), len(files), figsize=(width * len(files), 2.0 * len(names)), squeeze=False, sharey=True
    )
    for j, (file, paths) in enumerate(zip(files, columns, strict=True)):
        for i, name in enumerate(names):
            x, sr = audio.load(paths[name], mono=True)
            spectrogram(x[0], sr, ax=axes[i, j], title=f"{file}: {name}" if i == 0 else name)
            if i < len(names) - 1:
                axes[i, j].set_xlabel("")
    fig.tight_layout()
    return fig


def listening_panel(result: dict):
    """ipywidgets panel: pick a file and a signal (clean, noisy, each model), play it, see its scores."""
    from dfn4lab import audio
    from dfn4lab.evaluate import excluded

    import ipywidgets as w

    files = [i["name"] for i in result["items"]]
    snr = {i["name"]: i["snr"] for i in result["items"]}
    pick = w.Dropdown(options=[(f"{f} ({snr[f]:.1f} dB)", f) for f in files], description="file")
    sources = ["clean", *result["summary"]["overall"]]
    which = w.ToggleButtons(options=sources, value="noisy" if "noisy" in sources else sources[0])
    player, scores = w.Audio(format="wav", autoplay=False, loop=False), w.HTML()

    def show(_=None) -> None:
        path = _signals(result, pick.value)[which.value]
        x, sr = audio.load(path, mono=True)
        player.value = wav_bytes(x[0], sr)
        row = next((r for r in result["rows"] if r["file"] == pick.value and r["model"] == which.value), None)
        # no placeholder values: a noise-only file has no speech to score
        shown = [] if row is None else [m for m in result["metrics"] if not excluded(row, m)]
        text = ", ".join(f"{_label(m)} {row[m]:.2f}" for m in shown) or "no speech to score"
        scores.value = f"<small>{text}</small>"

    pick.observe(show, names="value")
    which.observe(show, names="value")
    show()
    return w.VBox([pick, which, player, scores])


# --- Training (records of dfn4lab.train) ------------------------------------------------------------


def training_curves(steps: list[dict], epochs: list[dict], axes=None, smooth: int = 20):
    """Training loss (raw and a running mean over ``smooth`` steps) with the validation loss, validation
    SI-SDR and STOI against the noisy input; records as ``dfn4lab.train.read_log`` returns them."""
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    fig = axes[0].figure
    for ax in axes:
        ax.clear()
        ax.grid(alpha=0.3)
    good = [r for r in steps if not r.get("skipped")]
    if good:
        x, y = np.array([r["step"] for r in good]), np.array([r["loss"] for r in good])
        k = max(1, min(smooth, len(y)))
        axes[0].plot(x, y, color="C0", alpha=0.25, lw=0.8)
        axes[0].plot(x[k - 1 :], np.convolve(y, np.ones(k) / k, mode="valid"), color="C0", label="train")
    ve = [r for r in epochs if "valid_loss" in r]
    if ve:
        axes[0].plot([r["step"] for r in ve], [r["valid_loss"] for r in ve], "o-", color="C1", label="valid")
    axes[0].set(xlabel="step", ylabel="loss", title="loss", yscale="log" if good and min(y) > 0 else "linear")
    for ax, key, name in ((axes[1], "si_sdr", "SI-SDR (dB)"), (axes[2], "stoi", "STOI")):
        pts = [r for r in epochs if f"valid_{key}" in r]
        if pts:
            ax.plot(
                [r["step"] for r in pts], [r[f"valid_{key}"] for r in pts], "o-", color="C2", label="enhanced"
            )
            ax.plot(
                [r["step"] for r in pts],
                [r[f"valid_{key}_noisy"] for r in pts],
                "--",
                color="gray",
                label="noisy",
            )
        ax.set(xlabel="step", title=f"validation {name}")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


class TrainBoard:
    """One live figure of a run in a notebook, redrawn in place (no walls of printed lines):

        board = viz.TrainBoard()
        train.train(run, callback=board.update)

    ``update`` takes every step and epoch record; the figure is redrawn every ``every`` steps and after
    each validation.
    """

    def __init__(self, every: int = 10, smooth: int = 20, figsize: tuple[float, float] = (12, 3.2)):
        from matplotlib.figure import Figure

        self.every, self.smooth = every, smooth
        self.steps: list[dict] = []
        self.epochs: list[dict] = []
        self.figure = Figure(figsize=figsize)  # not a pyplot figure: the notebook shows only our display
        self.axes = self.figure.subplots(1, 3)
        self._handle = None

    def load(self, out: str | Path) -> TrainBoard:
        """Start from the records already in run folder ``out`` (resuming, or a finished run); drawn once."""
        from dfn4lab.train import read_log

        if (Path(out) / "metrics.jsonl").exists():
            self.steps, self.epochs = read_log(out)
            self.draw()
        return self

    def update(self, rec: dict) -> None:
        (self.steps if rec["kind"] == "step" else self.epochs).append(rec)
        if rec["kind"] != "step" or rec["step"] % self.every == 0:
            self.draw()

    def draw(self):
        """Redraw the figure and refresh its display (inside IPython); returns the Figure."""
        training_curves(self.steps, self.epochs, self.axes, self.smooth)
        try:
            from IPython import get_ipython
            from IPython.display import Image, display
        except ImportError:
            return self.figure
        if get_ipython() is not None:  # as PNG: IPython has no formatter for a Figure outside pyplot
            image = Image(data=png_bytes(self.figure, close=False))
            if self._handle is None:
                self._handle = display(image, display_id=True)
            else:
                self._handle.update(image)
        return self.figure


# --- Data mixing (notebook 01) ----------------------------------------------------------------------


def png_bytes(fig, close: bool = True) -> bytes:
    """``fig`` as PNG bytes (for an ``ipywidgets.Image`` or ``IPython.display.Image``); closed unless
    ``close`` is False."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    if close:
        plt.close(fig)
    return buf.getvalue()


def mixing_panel(speech: np.ndarray, noise: np.ndarray, sr: int):
    """Sliders (SNR, RT60, EQ) that rebuild one mixture and redraw its spectrogram and player.

    The spectrogram is an ``Image`` widget, not an ``Output`` one: nbclient (nbmake, nbconvert) answers
    each update of an ``Output`` widget with a message on the shell socket it is waiting on for the
    cell's reply, and that send can swallow the reply's wake-up. The cell then hangs until nbclient's
    timeout (reproduced: 7 of 25 runs of 300 such cells stalled, none with an ``Image``).
    """
    from dfn4lab.data.mixing import mixture_steps

    import ipywidgets as w

    snr = w.FloatSlider(value=5, min=-5, max=40, step=1, description="SNR dB")
    # 0 = no room; pyroomacoustics' random rooms start at 0.2 s (0.1 s raises "room too large")
    rt60 = w.SelectionSlider(
        options=[0.0, *np.round(np.arange(0.2, 1.01, 0.1), 1)], value=0.0, description="RT60 s"
    )
    eq = w.FloatSlider(value=0, min=-12, max=12, step=1, description="EQ 1k dB")
    image, player = w.Image(format="png"), w.Audio(format="wav", autoplay=False, loop=False)

    def redraw(*_):
        steps = mixture_steps(speech, noise, sr, snr.value, rt60.value or None, eq.value)
        player.value = wav_bytes(steps["noisy"], sr)
        title = f"noisy: SNR {snr.value:.0f} dB, RT60 {rt60.value:.1f} s, EQ {eq.value:+.0f} dB"
        image.value = png_bytes(spectrogram(steps["noisy"], sr, title=title))

    for s in (snr, rt60, eq):
        s.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([snr, rt60, eq]), image, player])


def compare_runs(runs: dict[str, str | Path], key: str = "si_sdr", ax=None):
    """Validation ``key`` against step for several training runs (their ``out`` folders)."""
    from dfn4lab.train import read_log

    fig, ax = _ax(ax, figsize=(7, 3.5))
    noisy = None
    for name, out in runs.items():
        _, epochs = read_log(out)
        pts = [r for r in epochs if f"valid_{key}" in r]
        if pts:
            ax.plot([r["step"] for r in pts], [r[f"valid_{key}"] for r in pts], "o-", label=name)
            noisy = pts[-1].get(f"valid_{key}_noisy", noisy)
    if noisy is not None:
        ax.axhline(noisy, color="gray", ls="--", label="noisy input")
    ax.set(xlabel="step", ylabel=_label(key), title=f"validation {_label(key)} by run")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


# --- Streaming (notebook 06) ------------------------------------------------------------------------


def hop_times(times_ms: np.ndarray, budget_ms: float, ax=None, title: str = "processing time per hop"):
    """Processing time per hop, in stream order, against the real-time budget of one hop."""
    fig, ax = _ax(ax, figsize=(9, 3))
    ax.plot(times_ms, ".", ms=2)
    ax.axhline(budget_ms, color="red", ls="--", label=f"real time ({budget_ms:.0f} ms per hop)")
    ax.axhline(float(np.median(times_ms)), color="k", ls=":", label=f"median {np.median(times_ms):.2f} ms")
    ax.set(xlabel="hop", ylabel="ms", title=title, yscale="log")
    ax.legend(fontsize=8)
    return fig


def latency_hist(times_ms: np.ndarray, algorithmic_ms: float, ax=None, bins: int = 40):
    """Distribution of end-to-end latency per hop: algorithmic latency plus processing time."""
    fig, ax = _ax(ax, figsize=(6, 3))
    ax.hist(algorithmic_ms + np.asarray(times_ms), bins=bins, color="tab:blue", alpha=0.8)
    p99 = algorithmic_ms + float(np.percentile(times_ms, 99))
    ax.axvline(p99, color="red", ls="--", label=f"p99 {p99:.1f} ms")
    ax.set(xlabel="latency (ms): algorithmic + processing", ylabel="hops", title="latency per hop")
    ax.legend(fontsize=8)
    return fig


def stream_bench(result: dict, ax=None):
    """``stream.benchmark``'s result: median time per hop of every case (bar, labelled) up to its p99
    (whisker), default engines and the compiled MLX hops, against the official runtime's median (line)."""
    rows = [*result["cases"], *result.get("compiled", [])]
    labels = [f"{r['model']} {r['backbone']}\n{r['engine']}" for r in rows]
    med = np.array([r["median_ms"] for r in rows])
    p99 = np.array([r["p99_ms"] for r in rows])
    fig, ax = _ax(ax, figsize=(10, 3.5))
    colors = {"native": "tab:green", "compiled": "tab:blue", "eager": "tab:orange"}
    for engine, color in colors.items():  # one bar series per engine: the legend names the colours
        at = [i for i, r in enumerate(rows) if r["engine"] == engine]
        if at:
            yerr = [np.zeros(len(at)), p99[at] - med[at]]
            ax.bar(at, med[at], color=color, yerr=yerr, capsize=3, label=f"{engine} engine")
            for i in at:  # above the whisker: inside a short bar the number would sit under it
                ax.annotate(
                    f"{med[i]:.2f}",
                    (i, p99[i]),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                )
    official = result["official"]["median_ms"]
    ax.axhline(official, color="k", ls=":", label=f"official runtime, median {official:.2f} ms")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set(ylabel="ms per 10 ms hop", title="streaming: median per hop (the number), whisker to p99")
    ax.set_ylim(0, max(p99.max(), official) * 1.15)  # room for the numbers over the whiskers
    ax.legend(fontsize=8)
    return fig
