"""Plots and audio widgets for the notebooks. Plot functions take an optional ``ax`` and return the Figure;
nothing here calls ``plt.show()``."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

FIGURES = Path(__file__).resolve().parents[1] / "figures"


def _ax(ax=None, figsize=(8, 3)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def spectrogram(x: np.ndarray, sr: int, ax=None, title: str = "", n_fft: int = 1024, vmin: float = -100.0):
    """Log-power spectrogram (dB) of ``x`` (samples,)."""
    fig, ax = _ax(ax)
    hop = n_fft // 4
    win = np.hanning(n_fft).astype(np.float32)
    n = 1 + max(0, (len(x) - n_fft) // hop)
    frames = np.stack([x[i * hop : i * hop + n_fft] * win for i in range(n)]) if len(x) >= n_fft else None
    if frames is None:
        raise ValueError(f"signal too short for a spectrogram ({len(x)} < {n_fft} samples)")
    db = 10 * np.log10(np.abs(np.fft.rfft(frames, axis=-1)) ** 2 + 1e-12)
    db -= db.max()
    ax.imshow(
        db.T,
        origin="lower",
        aspect="auto",
        vmin=vmin,
        vmax=0,
        cmap="magma",
        extent=[0, len(x) / sr, 0, sr / 2000],
    )
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


def filterbank(fb: np.ndarray, sr: int, ax=None, title: str = "ERB filterbank"):
    """Band weights ``fb`` (freq, bands) against frequency."""
    fig, ax = _ax(ax)
    f = np.linspace(0, sr / 2, fb.shape[0]) / 1000
    ax.plot(f, fb)
    ax.set(xlabel="kHz", ylabel="weight", title=f"{title} ({fb.shape[1]} bands)")
    return fig


def players(signals: dict[str, np.ndarray], sr: int):
    """ipywidgets row of labelled audio players (normalised for listening)."""
    import ipywidgets as w
    from IPython.display import Audio

    boxes = []
    for name, x in signals.items():
        out = w.Output()
        with out:
            from IPython.display import display

            display(Audio(np.asarray(x), rate=sr, normalize=True))
        boxes.append(w.VBox([w.Label(name), out]))
    return w.HBox(boxes)


def save(fig, name: str) -> Path:
    """Save ``fig`` as ``figures/NAME.png`` (atomically) and return the path."""
    FIGURES.mkdir(exist_ok=True)
    path = FIGURES / f"{name}.png"
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


# --- Backbone benchmark (notebook 03) ---------------------------------------------------------------


def bench_bars(rows: list[dict], metrics=("fwd", "fwdbwd", "step"), ax=None):
    """Median time per backbone and measurement, with IQR error bars; rows from ``bench.backbones``."""
    fig, ax = _ax(ax, figsize=(9, 3.5))
    labels = [f"{r['backbone']}\n{r['variant']}\n{r['params'] / 1e6:.2f} M" for r in rows]
    width = 0.8 / len(metrics)
    x = np.arange(len(rows))
    for i, m in enumerate(metrics):
        ax.bar(
            x + i * width,
            [r[f"{m}_ms"] for r in rows],
            width,
            yerr=[r[f"{m}_iqr_ms"] for r in rows],
            capsize=3,
            label={"fwd": "forward", "fwdbwd": "forward+backward", "step": "train step"}[m],
        )
    ax.set_xticks(x + width * (len(metrics) - 1) / 2, labels)
    ax.set(ylabel="ms (median, IQR)", title="DfNet with each backbone")
    ax.legend()
    return fig


def bench_memory(rows: list[dict], ax=None):
    fig, ax = _ax(ax, figsize=(6, 3))
    ax.bar([f"{r['backbone']}\n{r['variant']}" for r in rows], [r["peak_mb"] for r in rows], color="tab:gray")
    ax.set(ylabel="MB", title="peak memory of a training step")
    return fig


def bench_sweep(sweep: list[dict], ax=None):
    """Forward time against sequence length per backbone, log-log (slope 1 = linear, 2 = quadratic)."""
    fig, ax = _ax(ax, figsize=(6, 3.5))
    for kind in dict.fromkeys(r["backbone"] for r in sweep):
        pts = [(r["frames"], r["fwd_ms"]) for r in sweep if r["backbone"] == kind]
        ax.loglog(*zip(*pts, strict=True), marker="o", label=kind)
    ax.set(xlabel="frames", ylabel="forward ms (batch 1)", title="scaling with sequence length")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig
