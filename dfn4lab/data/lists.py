"""File lists: scan audio folders into per-split lists and write the data config training reads.

    python -m dfn4lab.data.lists --speech-dirs S.. --noise-dirs N.. --rir-dirs R.. \\
        --output-dir DIR --generate-config

Each file gets a split and a group. A path component named ``train``/``valid``/``test`` (the scanned
folder's own name included) fixes the split; otherwise the group's hash picks one (``--split 0.8 0.1
0.1``), so a group (a speaker, a noise with its variants, a room) never spans two splits. The group is the first folder below the
split folder (or below the scanned folder); a file directly in it is its own group, with trailing
variant numbers removed (``fire.1.ogg`` and ``fire.2.ogg`` are group ``fire``).

Unusable files (see ``checks``) are skipped with a counted warning and listed in ``report.json``; a
kind whose files all fail stops with a clear error.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from dfn4lab.cli import command
from dfn4lab.data import checks
from dfn4lab.data.checks import BadFile, NoUsableFiles, Report
from dfn4lab.data.config import KINDS, SPLITS, CheckConfig, DataConfig, MixConfig
from dfn4lab.paths import atomic_write

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".aiff", ".aif")


@dataclass(frozen=True)
class Entry:
    """One usable audio file of a list."""

    path: str
    kind: str
    split: str
    group: str
    duration: float  # seconds
    sr: int
    channels: int
    max_freq: int  # highest frequency with content (Hz); sr/2 unless the source was band-limited


def find_audio(root: str | Path) -> list[Path]:
    """Audio files below ``root`` (or ``root`` itself), sorted."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTS and p.is_file())


def split_and_group(path: Path, root: Path, fractions: Sequence[float]) -> tuple[str, str]:
    """``(split, group)`` of ``path`` found below ``root``; see the module docstring."""
    parts = path.relative_to(root).parts if path != root else (path.name,)
    dirs, name = parts[:-1], parts[-1]
    split = next((d for d in dirs if d in SPLITS), None)
    below = dirs[dirs.index(split) + 1 :] if split else dirs
    if split is None and root.name in SPLITS:  # the scanned folder is itself a split folder
        split = root.name
    group = below[0] if below else re.sub(r"[._-]?\d+$", "", Path(name).stem) or Path(name).stem
    group = f"{root.name}/{group}"
    return (split or hash_split(group, fractions)), group


def hash_split(group: str, fractions: Sequence[float]) -> str:
    """A stable split for ``group``: its SHA-1 read as a uniform number in [0, 1)."""
    u = int(hashlib.sha1(group.encode()).hexdigest()[:12], 16) / 16**12
    edges = [sum(fractions[: i + 1]) / sum(fractions) for i in range(len(SPLITS))]
    return next(s for s, e in zip(SPLITS, edges, strict=True) if u < e)


def scan(
    dirs: Iterable[str | Path],
    kind: str,
    check: CheckConfig | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    report: Report | None = None,
    full: bool = True,
) -> list[Entry]:
    """Usable ``kind`` files below ``dirs``; skipped ones go to ``report``.

    ``full`` reads every sample (NaN and silence checks); without it only headers are read.
    Raises ``NoUsableFiles`` when files were found but none is usable, or none was found.
    """
    report = report if report is not None else Report()
    check = check or CheckConfig()
    entries, found = [], 0
    for d in dirs:
        root, first = Path(d), len(entries)
        for p in find_audio(root):
            found += 1
            r = checks.check_file(p, kind, check, full=full)
            if isinstance(r, BadFile):
                report.add(r)
                continue
            split, group = split_and_group(p, root, fractions)
            entries.append(
                Entry(str(p.resolve()), kind, split, group, r.duration, r.sr, r.channels, r.sr // 2)
            )
        groups, splits = {e.group for e in entries[first:]}, {e.split for e in entries[first:]}
        if len(groups) == 1 and len(splits) == 1 and len(entries) - first >= 20:  # split folders decide not
            warnings.warn(
                f"all {len(entries) - first} {kind} files below {root} form one group ({groups.pop()}), so "
                "they all land in one split: scan the folder whose subfolders are the speakers (or rooms...)",
                stacklevel=2,
            )
    if not entries:
        dirs_s = ", ".join(str(d) for d in dirs)
        if found == 0:
            raise NoUsableFiles(f"no {kind} audio ({', '.join(AUDIO_EXTS)}) found in {dirs_s}")
        bad = Report()
        bad.merge([b for b in report.bad if b.kind == kind])
        raise NoUsableFiles(f"all {found} {kind} files in {dirs_s} are unusable: {bad.summary()}")
    return entries


_COLUMNS = [f.name for f in fields(Entry)]


def write_list(path: str | Path, entries: Iterable[Entry]) -> None:
    """A CSV list: header row, one file per row; written atomically. Files below the folder that holds the
    list's folder (a corpus with its ``lists/``) are written relative to the list, so the corpus can be
    moved or copied whole; others keep their absolute path."""
    folder = Path(path).resolve().parent

    def row(e: Entry) -> list:
        p = Path(e.path)
        rel = os.path.relpath(p, folder) if p.is_relative_to(folder.parent) else str(p)
        return [rel if c == "path" else getattr(e, c) for c in _COLUMNS]

    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(_COLUMNS)
    w.writerows(row(e) for e in entries)
    atomic_write(path, buf.getvalue())


def read_list(path: str | Path) -> list[Entry]:
    """Entries of a list written by ``write_list``; relative paths resolved against the list's folder."""
    types = {"duration": float, "sr": int, "channels": int, "max_freq": int}
    folder = Path(path).resolve().parent
    with open(path, newline="") as f:
        rows = [{k: types.get(k, str)(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return [Entry(**{**r, "path": os.path.normpath(folder / r["path"])}) for r in rows]


def write_lists(
    entries: Sequence[Entry], out_dir: str | Path, report: Report, generate_config: bool = False
) -> DataConfig:
    """Write ``{kind}_{split}.csv`` and ``report.json`` into ``out_dir`` (and ``data_config.json``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lists: dict[str, dict[str, str]] = {}
    for split in SPLITS:
        for kind in KINDS:
            sel = [e for e in entries if e.split == split and e.kind == kind]
            if sel:
                write_list(out / f"{kind}_{split}.csv", sel)
                lists.setdefault(split, {})[kind] = f"{kind}_{split}.csv"
    report.save(out / "report.json")
    cfg = DataConfig(lists=lists, mix=MixConfig())
    if generate_config:
        cfg.to_json(out / "data_config.json")
    return cfg


def load_split(cfg: DataConfig, split: str) -> dict[str, list[Entry]]:
    """``{kind: entries}`` of one split of a data config (kinds without a list are empty)."""
    out = {}
    for kind in KINDS:
        p = cfg.list_path(split, kind)
        out[kind] = read_list(p) if p is not None else []
    return out


@command
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dfn4lab.data.lists", description=__doc__.split("\n\n")[0])
    ap.add_argument("--speech-dirs", nargs="+", default=[])
    ap.add_argument("--noise-dirs", nargs="+", default=[])
    ap.add_argument("--rir-dirs", nargs="+", default=[])
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--generate-config", action="store_true", help="also write data_config.json")
    ap.add_argument(
        "--split", nargs=3, type=float, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VALID", "TEST")
    )
    ap.add_argument("--min-sr", type=int, default=CheckConfig.min_sr)
    ap.add_argument("--headers-only", action="store_true", help="skip the NaN/silence read of every file")
    args = ap.parse_args(argv)
    if not args.speech_dirs:
        ap.error("--speech-dirs is required")
    if min(args.split) < 0 or not sum(args.split) > 0:
        ap.error(f"--split takes three fractions >= 0 with a positive sum, got {args.split}")
    check = CheckConfig(min_sr=args.min_sr)
    report = Report()
    entries: list[Entry] = []
    try:
        for kind, dirs in (("speech", args.speech_dirs), ("noise", args.noise_dirs), ("rir", args.rir_dirs)):
            if dirs:
                entries += scan(dirs, kind, check, args.split, report, full=not args.headers_only)
    except NoUsableFiles as e:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        report.save(Path(args.output_dir) / "report.json")
        print(f"error: {e} (details in {Path(args.output_dir) / 'report.json'})", file=sys.stderr)
        return 2
    write_lists(entries, args.output_dir, report, args.generate_config)
    for kind in KINDS:
        n = {s: sum(e.kind == kind and e.split == s for e in entries) for s in SPLITS}
        if any(n.values()):
            print(f"{kind}: " + ", ".join(f"{s} {c}" for s, c in n.items()))
    print(f"{report.summary()}; lists in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
