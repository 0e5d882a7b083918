"""File lists: scan audio folders into per-split lists and write the data config training reads.

    python -m dfn4lab.data.lists --speech-dirs S.. --noise-dirs N.. --rir-dirs R.. \\
        --output-dir DIR --generate-config

Each file gets a split and a group. A path component that names a split fixes it (the scanned
folder's own name included; any case: ``train``, ``training``; ``valid``, ``validation``, ``val``, ``dev``;
``test``, ``testing``; also as a prefix, as LibriSpeech's ``train-clean-100``, ``dev-clean``); otherwise the
group's hash picks one (``--split 0.8 0.1 0.1``), so a group (a speaker, a noise with its variants, a
room) never spans two splits. The group is the first folder below the split folder (or below the
scanned folder); a file directly in it is its own group, with trailing variant numbers removed
(``fire.1.ogg`` and ``fire.2.ogg`` are group ``fire``). ``--group-pattern REGEX`` takes the group from
the file's path instead (its first capture group, else the match), for corpora that name the speaker in
flat file names (DNS Challenge: ``'reader_\d+'``). The hash is of the group as found below the scanned
folder, so the split does not change when the corpus is moved, renamed or reached through a link.

Symlinked folders are followed; a file reached twice (overlapping folders) is listed once. Unusable
files (see ``checks``) are skipped with a counted warning and listed in ``report.json``; a kind whose
files all fail stops with a clear error.
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

from dfn4lab import audio
from dfn4lab.cli import command
from dfn4lab.data import checks
from dfn4lab.data.checks import BadFile, NoUsableFiles, Report
from dfn4lab.data.config import KINDS, SPLITS, CheckConfig, DataConfig, MixConfig
from dfn4lab.paths import atomic_write

# a split folder's name (lower case), or its head before "-"/"_" (LibriSpeech's train-clean-100, dev-clean)
SPLIT_NAMES = {
    **dict.fromkeys(("train", "training"), "train"),
    **dict.fromkeys(("valid", "validation", "val", "dev"), "valid"),
    **dict.fromkeys(("test", "testing"), "test"),
}


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
    """Audio files below ``root`` (or ``root`` itself), sorted; symlinked folders are followed (once),
    hidden files and folders (``.name``: a killed write's temporary file) are not."""
    root = Path(root)
    if root.is_file():
        return [root]
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree, or a second way to the same folder
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # hidden: a killed write's temporary files
        found += [Path(folder, f) for f in files if Path(f).suffix.lower() in audio.AUDIO_EXTS and f[0] != "."]
    return sorted(p for p in found if p.is_file())


def split_name(folder: str) -> str | None:
    """The split a folder's name fixes (see the module docstring), or None."""
    name = folder.lower()
    return SPLIT_NAMES.get(name) or SPLIT_NAMES.get(re.split(r"[-_]", name, maxsplit=1)[0])


def split_and_group(
    path: Path, root: Path, fractions: Sequence[float], group_pattern: str | None = None
) -> tuple[str, str]:
    """``(split, group)`` of ``path`` found below ``root``; see the module docstring."""
    parts = path.relative_to(root).parts if path != root else (path.name,)
    dirs, name = parts[:-1], parts[-1]
    at = next((i for i, d in enumerate(dirs) if split_name(d)), None)
    split = split_name(dirs[at]) if at is not None else split_name(root.resolve().name)
    below = dirs[at + 1 :] if at is not None else dirs
    match = re.search(group_pattern, Path(*parts).as_posix()) if group_pattern else None
    if match:
        key = match.group(1) if match.re.groups else match.group(0)
    else:
        key = below[0] if below else re.sub(r"[._-]?\d+$", "", Path(name).stem) or Path(name).stem
    return (split or hash_split(key, fractions)), f"{root.resolve().name}/{key}"


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
    group_pattern: str | None = None,
) -> list[Entry]:
    """Usable ``kind`` files below ``dirs``; skipped ones go to ``report``.

    ``full`` reads every sample (NaN and silence checks); without it only headers are read.
    Raises ``NoUsableFiles`` when files were found but none is usable, or none was found.
    """
    report = report if report is not None else Report()
    check = check or CheckConfig()
    if group_pattern is not None:
        try:
            re.compile(group_pattern)
        except re.error as e:
            raise ValueError(f"--group-pattern {group_pattern!r} is no regular expression ({e})") from None
    entries, found, seen, twice = [], 0, set(), 0
    for d in dirs:
        root, first, flat = Path(d), len(entries), 0
        for p in find_audio(root):
            if (real := os.path.realpath(p)) in seen:
                twice += 1
                continue
            seen.add(real)
            found += 1
            r = checks.check_file(p, kind, check, full=full)
            if isinstance(r, BadFile):
                report.add(r)
                continue
            split, group = split_and_group(p, root, fractions, group_pattern)
            flat += p.parent == root
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
        elif kind == "speech" and flat >= 20 and group_pattern is None:
            warnings.warn(
                f"{flat} speech files sit directly in {root}: each file name (without trailing numbers) is "
                "a group, so one speaker may span splits; --group-pattern names the speaker in file names "
                "(DNS Challenge: 'reader_\\d+')",
                stacklevel=2,
            )
    if twice:
        warnings.warn(f"{twice} {kind} files were reached twice (overlapping folders): listed once", stacklevel=2)
    if not entries:
        dirs_s = ", ".join(str(d) for d in dirs)
        if found == 0:
            raise NoUsableFiles(f"no {kind} audio ({', '.join(audio.AUDIO_EXTS)}) found in {dirs_s}")
        bad = Report.of([b for b in report.bad if b.kind == kind])
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
    ap.add_argument(
        "--group-pattern", metavar="REGEX", help="the group (speaker) from each file's path: 'reader_\\d+'"
    )
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
                full = not args.headers_only
                entries += scan(dirs, kind, check, args.split, report, full, args.group_pattern)
    except NoUsableFiles as e:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        report.save(Path(args.output_dir) / "report.json")
        print(f"error: {e} (details in {Path(args.output_dir) / 'report.json'})", file=sys.stderr)
        return 2
    write_lists(entries, args.output_dir, report, args.generate_config)
    empty = []
    for kind in KINDS:
        n = {s: sum(e.kind == kind and e.split == s for e in entries) for s in SPLITS}
        if any(n.values()):
            print(f"{kind}: " + ", ".join(f"{s} {c}" for s, c in n.items()))
            empty += [f"{kind} in {s}" for s, c in n.items() if c == 0 and kind != "rir"]
    if empty:  # training needs speech and noise in train, validation in valid, evaluate --set in test
        print(
            f"warning: no {', '.join(empty)}: training, validation and evaluation each need speech and noise "
            "in their split (more groups, other --split fractions, or train/valid/test folders)",
            file=sys.stderr,
        )
    print(f"{report.summary()}; lists in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
