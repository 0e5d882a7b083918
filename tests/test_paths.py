"""Outputs that are whole or absent: atomic writes, staged and published folders, interrupted commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from dfn4lab import paths
from dfn4lab.cli import command
from dfn4lab.data import lists

import pytest
import soundfile as sf


def test_atomic_write_through_a_symlink_replaces_the_target_not_the_link(tmp_path):
    (tmp_path / "real.md").write_text("old")
    (tmp_path / "link.md").symlink_to(tmp_path / "real.md")
    paths.atomic_write(tmp_path / "link.md", "new")  # the link became a plain file, before
    assert (tmp_path / "link.md").is_symlink() and (tmp_path / "real.md").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.md", "real.md"]


def test_staging_folders_are_per_process_and_a_dead_process_leaves_none(tmp_path):
    dest = tmp_path / "store"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".store.building.{int(dead.stdout)}"  # a build killed outright
    stale.mkdir()
    live = tmp_path / f".store.building.{os.getppid()}"  # another build, running
    live.mkdir()
    with paths.staging(dest) as tmp:
        assert tmp == tmp_path / f".store.building.{os.getpid()}" and tmp.is_dir() and not any(tmp.iterdir())
        assert not stale.exists() and live.exists()
    assert not tmp.exists()  # not published: removed on leaving


def test_publish_removes_what_a_publish_killed_between_its_renames_left(tmp_path):
    dest = tmp_path / "set"
    (tmp_path / ".set.old.999999").mkdir()  # the old folder, renamed away; the new one never renamed in
    with paths.staging(dest) as tmp:
        (tmp / "manifest.csv").write_text("name,snr\n")
        paths.publish(tmp, dest, marker="manifest.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_scans_skip_hidden_files_a_killed_write_left(tmp_path):
    sf.write(tmp_path / "a.wav", [0.1] * 48000, 48000)
    sf.write(tmp_path / ".a.0123456789ab.tmp.wav", [0.1] * 100, 48000)  # read as a corpus file, before
    (tmp_path / ".cache").mkdir()
    sf.write(tmp_path / ".cache" / "b.wav", [0.1] * 48000, 48000)
    assert lists.find_audio(tmp_path) == [tmp_path / "a.wav"]


def test_an_interrupted_command_is_one_line_after_its_clean_ups(capsys):
    cleaned = []

    @command
    def main(sig: int) -> int:
        try:
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the signal arrives here
            return 0
        finally:
            cleaned.append(sig)

    before = signal.getsignal(signal.SIGTERM)
    assert main(signal.SIGINT) == 130 and main(signal.SIGTERM) == 130  # SIGTERM ran no clean-up, before
    assert cleaned == [signal.SIGINT, signal.SIGTERM]
    assert capsys.readouterr().err == "interrupted\ninterrupted\n"  # a KeyboardInterrupt traceback, before
    assert signal.getsignal(signal.SIGTERM) is before


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    """A datastore build killed outright left its workers blocked on a pipe, for good."""
    code = (
        "import multiprocessing, os, signal, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from dfn4lab.data.loader import exit_with_parent\n"
        "if __name__ == '__main__':\n"
        "    ctx = multiprocessing.get_context('spawn')\n"
        "    pool = ProcessPoolExecutor(1, ctx, initializer=exit_with_parent)\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 60)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    script = tmp_path / "orphan.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL
    worker = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _running(worker):
        time.sleep(0.2)
    assert not _running(worker)


def _running(pid: int) -> bool:
    if not os.path.isdir("/proc"):  # macOS: init reaps the orphan
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited (an init may not reap)
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("argv", [["nosuch/README.md"]])
def test_report_is_one_line_on_a_missing_readme(argv, capsys, monkeypatch):
    from dfn4lab import report

    monkeypatch.setattr(report, "results", lambda: "")
    assert report.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
