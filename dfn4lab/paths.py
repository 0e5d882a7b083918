"""Where the workbench keeps its files: the project's ``data/`` (corpora, caches, results) and
``figures/``. Absolute, so notebooks (run from ``notebooks/``) and the CLI agree. Files and folders
are written atomically: complete under a temporary name first, then renamed into place."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
DATA = PROJECT / "data"
DEMO = DATA / "demo"  # the demo corpus (make data)
FIGURES = PROJECT / "figures"


def make_folder(path: str | os.PathLike) -> Path:
    """``path`` as a folder, created with its parents if missing; a one-line error if it is a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{p} is a file, not a folder")
    p.mkdir(parents=True, exist_ok=True)
    return p


def atomic_write(path: str | os.PathLike, content: str | Callable[[str], Any]) -> Path:
    """Write ``path`` so that it is never seen partial: ``content`` (text, or a function that writes the
    file it is given) goes to a fresh hidden name beside ``path`` with the same suffix (writers that
    append a missing extension or infer the format from it keep working), then replaces ``path``. On
    any error the temporary file is removed and ``path`` stays as it was. The data reach the disk before
    the rename (a power cut leaves the old file or the new, not an empty one); a symlink ``path`` has
    its target replaced, not the link."""
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}")
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        else:
            content(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_replaceable(dest: str | os.PathLike, marker: str, keys: tuple[str, ...] = ()) -> None:
    """Raise ValueError unless ``dest`` is absent, an empty folder, or a folder of the kind being written:
    it holds the file ``marker``, a JSON object with all of ``keys`` when they are given (a user's
    ``manifest.json``, or another command's, is not this command's). A command never replaces a folder
    of the user's."""
    dest = Path(dest)
    if not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
        return
    if dest.is_dir() and (dest / marker).is_file():
        if not keys:
            return
        try:
            found = json.loads((dest / marker).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            found = None
        if isinstance(found, dict) and all(k in found for k in keys):
            return
    raise ValueError(
        f"{dest} exists and was not written by this command (no {marker} of its own): choose another"
    )


@contextlib.contextmanager
def staging(dest: str | os.PathLike) -> Iterator[Path]:
    """``with staging(dest) as tmp:`` a fresh, empty hidden folder beside ``dest`` to build it in (then
    :func:`publish` it), this process's own: two runs building the same ``dest`` never share one. On
    leaving, whatever was not published is removed (failed or interrupted: no half-built folder left);
    those of processes no longer alive (killed outright) are removed on entering."""
    dest = Path(dest)
    for old in dest.parent.glob(f".{glob.escape(dest.name)}.building.*"):
        pid = old.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = dest.with_name(f".{dest.name}.building.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once published


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def publish(tmp: str | os.PathLike, dest: str | os.PathLike, marker: str, keys: tuple[str, ...] = ()) -> Path:
    """Rename the finished folder ``tmp`` to ``dest``, replacing an older ``dest`` of the same kind (see
    :func:`check_replaceable`) without a gap."""
    tmp, dest = Path(tmp), Path(dest)
    check_replaceable(dest, marker, keys)
    for stale in dest.parent.glob(f".{glob.escape(dest.name)}.old.*"):  # a publish killed between renames
        shutil.rmtree(stale, ignore_errors=True)
    _fsync_dir(tmp)  # its files' names reach the disk before it is published (their data did)
    if dest.exists():  # killed between the two renames: recover() puts the old one back
        old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
        os.rename(dest, old)
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    return dest


def recover(dest: str | os.PathLike) -> bool:
    """Put back the folder :func:`publish` set aside as ``.NAME.old.PID`` when it was killed before
    renaming the new one to ``dest`` (``dest`` is then missing). True when it did."""
    dest = Path(dest)
    if dest.exists():
        return False
    olds = [
        p
        for p in dest.parent.glob(f".{glob.escape(dest.name)}.old.*")
        if p.is_dir() and p.name.rsplit(".", 1)[-1].isdigit() and not _alive(int(p.name.rsplit(".", 1)[-1]))
    ]
    if not olds:
        return False
    try:
        os.rename(max(olds, key=lambda p: p.stat().st_mtime), dest)
    except FileNotFoundError:  # another process put it back first
        return dest.exists()
    return True


def _fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (renames into it) durable: a power cut keeps them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
