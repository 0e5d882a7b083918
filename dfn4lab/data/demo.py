"""The demo corpus: speech, noise and rooms from installed packages, split without overlap.

    python -m dfn4lab.data.demo [--out data/demo] [--force]      (also: make data)

Speech comes from TTS voices (espeak-ng voices x variants, festival's HTS voice, macOS ``say``) and
real recordings (alsa-utils, klettres, ktuberling, asterisk prompts); noise from sonic-pi and
minetest sounds plus procedural white/pink/brown noise, mains hum, keyboard clicks and babble of the
split's own speakers; RIRs from simulated shoebox rooms (RT60 0.2-1.0 s). Speakers, noises and rooms
are split into train/valid/test by group, so no speaker, sound or room is in two splits. Sources
that are not installed are skipped and named; with no speech source at all a procedural voice-like
signal stands in, so a usable corpus is always built.

Deterministic: every source draws from its own generator seeded by (seed, source name), so the same
packages give the same files. Everything is 48 kHz mono FLAC (speech and noise 16-bit, RIRs 24-bit),
written into a temporary folder that is renamed into place when complete:

    OUT/{speech,noise,rir}/{train,valid,test}/<source>/<group>/<name>.flac
    OUT/manifest.json       source, license, sample rate, duration (and origin) of every file
    OUT/lists/*.csv         the file lists (``dfn4lab.data.lists``), report.json
    OUT/data_config.json    the data config training reads
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dfn4lab.cli import command
from dfn4lab import audio, paths
from dfn4lab.data import lists, rooms, sources, synth
from dfn4lab.data.checks import Report
from dfn4lab.data.loader import exit_with_parent
from dfn4lab.data.config import SPLITS, DataConfig
from dfn4lab.data.sources import SR, Clip

import numpy as np

DEFAULT_OUT = paths.DEMO
VERSION = 1
MANIFEST_KEYS = ("version", "sr", "sources", "splits", "totals", "files")  # what makes a folder a demo corpus
# Single-speaker sources cannot be split; the real male voice is kept for testing.
FIXED_SPLITS = {"alsa-utils/male": "test", "festival/slt": "valid", "asterisk/allison": "train"}
PROCEDURAL = ("white", "pink", "brown", "hum", "clicks", "babble")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo corpus (defaults: ~13 min speech, ~9 min noise, 48 RIRs, ~70 MB)."""

    seed: int = 0
    sources: tuple[str, ...] | None = None  # None: every installed source; "speechlike" is the fallback
    espeak_speakers: int = 24
    tts_utts: int = 3  # sentences per TTS speaker
    recorded_utts: int = 2  # utterances per recorded speaker (~4 s each)
    festival_utts: int = 6
    procedural: tuple[int, int, int] = (3, 1, 1)  # signals of each procedural noise type per split
    procedural_s: float = 6.0
    rooms: tuple[int, int, int] = (16, 4, 4)  # per split; each room gives `mics` RIRs
    mics: int = 2
    rt60: tuple[float, float] = (0.2, 1.0)  # seconds, drawn uniformly per room
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    # room simulation processes; pyroomacoustics already runs two threads each, so half the cores
    workers: int = field(default_factory=lambda: max(1, min(4, (os.cpu_count() or 1) // 2)))

    @classmethod
    def tiny(cls, **overrides) -> DemoConfig:
        """A corpus of a few seconds per split from procedural sources only (tests, any machine)."""
        base = dict(
            sources=("speechlike",),
            procedural=(1, 1, 1),
            procedural_s=2.0,
            rooms=(1, 1, 1),
            mics=1,
            rt60=(0.2, 0.4),
            workers=1,
        )
        return cls(**{**base, **overrides})


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def split_groups(groups: list[str], fractions: tuple[float, ...], rng: np.random.Generator) -> dict[str, str]:
    """Assign whole groups to splits: shuffled, then cut by ``fractions``; with three or more groups
    valid and test get at least one each."""
    groups = sorted(groups)
    out = {g: FIXED_SPLITS[g] for g in groups if g in FIXED_SPLITS}
    free = [groups[int(i)] for i in rng.permutation(len(groups)) if groups[int(i)] not in out]
    n = len(free)
    n_valid = max(1, round(fractions[1] / sum(fractions) * n)) if n >= 3 else 0
    n_test = max(1, round(fractions[2] / sum(fractions) * n)) if n >= 2 else 0
    for i, g in enumerate(free):
        out[g] = "valid" if i < n_valid else "test" if i < n_valid + n_test else "train"
    return out


def _procedural(split: str, k: int, kind: str, cfg: DemoConfig, speech: list[Clip]) -> Clip | None:
    rng = _rng(cfg.seed, f"procedural/{kind}/{split}/{k}")
    n = int(cfg.procedural_s * SR)
    if kind == "babble":
        talkers = {c.group: c.audio for c in speech}  # one utterance per speaker of this split
        if len(talkers) < 2:
            return None
        x = synth.babble(list(talkers.values()), n, rng, talkers=6)
        origin = [f"babble of {min(6, len(talkers))} of the {split} speakers"]
        lic = "derived from the split's speech (see its licenses)"
    else:
        make = {
            "white": lambda: synth.colored_noise(n, 0.0, rng),
            "pink": lambda: synth.colored_noise(n, 1.0, rng),
            "brown": lambda: synth.colored_noise(n, 2.0, rng),
            "hum": lambda: synth.hum(n, SR, rng),
            "clicks": lambda: synth.clicks(n, SR, rng),
        }[kind]
        x, origin, lic = make(), [f"dfn4lab.data.synth {kind}"], "CC0-1.0"
    group = f"procedural/{kind}-{split}-{k}"
    return Clip("procedural", "noise", group, f"{kind}-{k}", sources.level(x), SR, lic, origin)


def _simulate(args: tuple) -> tuple[str, int, rooms.Room, list[np.ndarray], list[float]]:
    seed, split, k, mics, rt60 = args
    room = rooms.random_room(_rng(seed, f"room/{split}/{k}"), rt60=rt60, mics=mics)
    room, rirs, rt = rooms.simulate_calibrated(room, SR)
    return split, k, room, rirs, rt


def _collect(cfg: DemoConfig, log) -> tuple[list[Clip], dict[str, str]]:
    """Clips of every wanted, installed source; ``{source: why}`` for the ones skipped."""
    want = set(cfg.sources) if cfg.sources is not None else None
    kw = {
        "espeak-ng": dict(speakers=cfg.espeak_speakers, utts=cfg.tts_utts),
        "say": dict(utts=cfg.tts_utts),
        "festival": dict(utts=cfg.festival_utts),
        "klettres": dict(utts=cfg.recorded_utts),
        "ktuberling": dict(utts=cfg.recorded_utts),
    }
    clips: list[Clip] = []
    skipped: dict[str, str] = {}
    for name, fn in {**sources.SPEECH_SOURCES, **sources.NOISE_SOURCES}.items():
        if want is not None and name not in want:
            continue
        got, why = fn(_rng(cfg.seed, name), **kw.get(name, {}))
        clips += got
        if not got:
            skipped[name] = why or "no audio"
            log(f"  skipped {name}: {skipped[name]}")
    if not any(c.kind == "speech" for c in clips):
        clips += sources.speechlike(_rng(cfg.seed, "speechlike"))[0]
        if want is None or "speechlike" not in want:
            log(
                "  no speech source installed: using procedural voice-like speech (make system installs some)"
            )
    return clips, skipped


def _assign_splits(clips: list[Clip], cfg: DemoConfig) -> dict[str, str]:
    """``{group: split}``, per source; then the procedural noises of each split join ``clips``."""
    split_of: dict[str, str] = {}
    for src in sorted({c.source for c in clips}):
        groups = sorted({c.group for c in clips if c.source == src})
        split_of.update(split_groups(groups, cfg.fractions, _rng(cfg.seed, f"split/{src}")))
    for split, n in zip(SPLITS, cfg.procedural, strict=True):
        speech = [c for c in clips if c.kind == "speech" and split_of[c.group] == split]
        for kind in PROCEDURAL:
            for k in range(n):
                c = _procedural(split, k, kind, cfg, speech)
                if c is not None:
                    clips.append(c)
                    split_of[c.group] = split
    return split_of


def _write_clip(root: Path, c: Clip, split: str) -> dict:
    rel = Path(c.kind) / split / c.group / f"{c.name}.flac"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    audio.save(root / rel, c.audio, SR)
    return dict(
        path=str(rel),
        kind=c.kind,
        split=split,
        group=c.group,
        source=c.source,
        license=c.license,
        sr=SR,
        duration=round(c.audio.size / SR, 3),
        source_sr=c.source_sr,
        max_freq=c.max_freq,
        origin=c.origin,
    )


def _write_room(
    root: Path, split: str, k: int, room: rooms.Room, rirs: list[np.ndarray], rt: list[float]
) -> list:
    files = []
    for m, (h, t60) in enumerate(zip(rirs, rt, strict=True)):
        rel = Path("rir") / split / "rooms" / f"room-{split}-{k}" / f"mic{m}.flac"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        # Peak-normalised (mixing normalises RIR energy anyway); 24 bits keep the -80 dB tail.
        audio.save(root / rel, 0.99 * h / np.max(np.abs(h)), SR, subtype="PCM_24")
        dist = float(np.linalg.norm(np.subtract(room.mics[m], room.source)))
        what = f"pyroomacoustics ShoeBox (hybrid ISM + ray tracing), room {room.to_dict()}"
        files.append(
            dict(
                path=str(rel),
                kind="rir",
                split=split,
                group=f"rooms/room-{split}-{k}",
                source="pyroomacoustics",
                license="CC0-1.0",
                sr=SR,
                duration=round(h.size / SR, 3),
                source_sr=SR,
                max_freq=SR // 2,
                origin=[what],
                rt60_measured=round(t60, 3),
                distance_m=round(dist, 3),
            )
        )
    return files


def _manifest(cfg: DemoConfig, files: list[dict], skipped: dict[str, str]) -> dict:
    kinds = ("speech", "noise", "rir")
    used: dict[str, dict] = {}
    for f in files:
        u = used.setdefault(f["source"], {"kind": f["kind"], "files": 0, "seconds": 0.0})
        u["files"] += 1
        u["seconds"] = round(u["seconds"] + f["duration"], 2)
    sel = {(k, s): [f for f in files if f["kind"] == k and f["split"] == s] for k in kinds for s in SPLITS}
    return {
        "version": VERSION,
        "sr": SR,
        "config": asdict(cfg) | {"workers": None},  # the worker count does not change the corpus
        "sources": {"used": used, "skipped": skipped},
        "splits": {k: {s: sorted({f["group"] for f in sel[k, s]}) for s in SPLITS} for k in kinds},
        "totals": {
            k: {
                "files": sum(len(sel[k, s]) for s in SPLITS),
                "seconds": round(sum(f["duration"] for s in SPLITS for f in sel[k, s]), 1),
            }
            for k in kinds
        },
        "files": sorted(files, key=lambda f: f["path"]),
    }


def _write_lists(tmp: Path, files: list[dict]) -> None:
    """Scan the corpus being built in ``tmp`` (so it passes the checks any data does) into lists and a
    data config; the lists' paths are relative, so they hold once ``tmp`` is published (or moved)."""
    report, entries = Report(), []
    by_path = {f["path"]: f for f in files}
    for kind in ("speech", "noise", "rir"):
        for e in lists.scan([tmp / kind], kind, report=report):
            f = by_path[str(Path(e.path).relative_to(tmp.resolve()))]  # the manifest knows group, band limit
            entries.append(replace(e, group=f["group"], max_freq=f["max_freq"]))
    written = lists.write_lists(entries, tmp / "lists", report).lists
    relative = {s: {k: f"lists/{v}" for k, v in kv.items()} for s, kv in written.items()}
    DataConfig(lists=relative).to_json(tmp / "data_config.json")


def build(out: str | Path = DEFAULT_OUT, cfg: DemoConfig = DemoConfig(), log=print) -> dict:
    """Build the corpus into ``out`` (replacing it once complete) and return its manifest."""
    t0 = time.perf_counter()
    out = Path(out)
    paths.check_replaceable(out, "manifest.json", MANIFEST_KEYS)  # before a minute of work, not after
    jobs = [
        (cfg.seed, s, k, cfg.mics, cfg.rt60) for s, n in zip(SPLITS, cfg.rooms, strict=True) for k in range(n)
    ]
    # failed or interrupted: the old corpus stays, no half-built folder, no workers left simulating
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(paths.staging(out))
        rooms_done = map(_simulate, jobs)  # lazy: simulated when the RIRs are written
        if cfg.workers > 1:  # rooms simulate while the sources are read; spawn, as the caller may run MLX
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(min(cfg.workers, len(jobs)), ctx, initializer=exit_with_parent)
            stack.callback(pool.shutdown, cancel_futures=True)
            rooms_done = pool.map(_simulate, jobs)
        clips, skipped = _collect(cfg, log)
        split_of = _assign_splits(clips, cfg)
        files = [_write_clip(tmp, c, split_of[c.group]) for c in clips]
        for split, k, room, rirs, rt in rooms_done:
            files += _write_room(tmp, split, k, room, rirs, rt)
        manifest = _manifest(cfg, files, skipped)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        _write_lists(tmp, files)
        paths.publish(tmp, out, marker="manifest.json", keys=MANIFEST_KEYS)
    log(f"demo corpus: {summary(manifest)} in {out} ({time.perf_counter() - t0:.1f} s)")
    return manifest


def summary(manifest: dict) -> str:
    """One line: files and minutes per kind."""
    t = manifest["totals"]
    return ", ".join(f"{k} {v['files']} files / {v['seconds'] / 60:.1f} min" for k, v in t.items())


def sources_table(manifest: dict) -> dict[str, tuple[str, int, str]]:
    """Per source used: (kind, files, minutes)."""
    used = manifest["sources"]["used"]
    return {name: (u["kind"], u["files"], f"{u['seconds'] / 60:.1f} min") for name, u in used.items()}


def first_file(corpus: str | Path, manifest: dict, kind: str, split: str = "test") -> Path:
    """The first file of ``kind`` (speech, noise, rir) in ``split``, as a path."""
    entry = next(f for f in manifest["files"] if f["kind"] == kind and f["split"] == split)
    return Path(corpus) / entry["path"]


def is_built(out: str | Path = DEFAULT_OUT) -> bool:
    out = Path(out)
    return (out / "manifest.json").is_file() and (out / "data_config.json").is_file()


@command
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dfn4lab.data.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--force", action="store_true", help="rebuild even if the corpus exists")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a few seconds from procedural sources only")
    args = ap.parse_args(argv)
    if is_built(args.out) and not args.force:
        print(f"demo corpus already in {args.out} (--force rebuilds)")
        return 0
    cfg = DemoConfig.tiny(seed=args.seed) if args.tiny else DemoConfig(seed=args.seed)
    print(f"building the demo corpus in {args.out} ...")
    m = build(args.out, cfg)
    for name, u in sorted(m["sources"]["used"].items()):  # skipped sources were named while building
        print(f"  {name:16s} {u['kind']:6s} {u['files']:4d} files {u['seconds'] / 60:6.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
