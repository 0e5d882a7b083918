"""dfn4lab.data.lists and bad input: scanning, splits, the report, and runs that never crash on bad files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from dfn4lab.data import checks, lists
from dfn4lab.data.checks import NoUsableFiles
from dfn4lab.data.config import SPLITS, DataConfig, MixConfig
from dfn4lab.data.lists import Entry
from dfn4lab.data.loader import Loader
from dfn4lab.data.mixing import Mixer

import numpy as np
import pytest
import soundfile as sf

SR = 48000


def tone(seconds: float, sr: int = SR, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * noise).astype(np.float32)


def write(path: Path, x: np.ndarray, sr: int = SR) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, sr)


def write_bad_files(d: Path) -> dict[str, str]:
    """One file per kind of bad input; returns name -> expected reason."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "garbage.wav").write_bytes(b"RIFF\x00\x00not really audio" * 10)
    (d / "zero.wav").write_bytes(b"")
    sf.write(d / "silent.wav", np.zeros(SR, np.float32), SR)
    nan = tone(1.0)
    nan[::1000] = np.nan
    sf.write(d / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(d / "rate.wav", tone(1.0, 4000), 4000)
    sf.write(d / "short.wav", tone(0.1), SR)
    sf.write(d / "noframes.wav", np.zeros((0,), np.float32), SR)
    return {
        "garbage.wav": "unreadable",
        "zero.wav": "empty",
        "silent.wav": "silent",
        "nan.wav": "nan",
        "rate.wav": "wrong_rate",
        "short.wav": "too_short",
        "noframes.wav": "empty",
    }


def test_report_save_is_atomic(tmp_path):
    """A write that fails (here: past a file-size limit) keeps the previous report whole."""
    path = tmp_path / "report.json"
    path.write_text('{"skipped": 0}\n')
    code = (
        "import resource, signal\n"
        "from dfn4lab.data import checks\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "r = checks.Report()\n"
        "for i in range(200): r.add(checks.BadFile(f'/x/{i}.wav', 'speech', 'silent', 'rms 0'))\n"
        f"r.save({str(path)!r})\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "File too large" in res.stderr
    assert path.read_text() == '{"skipped": 0}\n' and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_scan_skips_each_kind_of_bad_file_and_reports_it(tmp_path, caplog):
    d = tmp_path / "speech" / "spk1"
    expected = write_bad_files(d)
    sf.write(d / "good1.flac", tone(1.0), SR)
    sf.write(d / "good2.flac", tone(2.0, 16000), 16000)
    report = checks.Report()
    with caplog.at_level("WARNING", logger="dfn4lab.data"):
        entries = lists.scan([tmp_path / "speech"], "speech", report=report)
    assert sorted(Path(e.path).name for e in entries) == ["good1.flac", "good2.flac"]
    assert {Path(b.path).name: b.reason for b in report.bad} == expected
    assert report.counts() == {
        "unreadable": 1,
        "empty": 2,
        "silent": 1,
        "nan": 1,
        "wrong_rate": 1,
        "too_short": 1,
    }
    assert len([r for r in caplog.records if "skipping" in r.message]) == len(expected)  # one warning each
    assert "[7 skipped]" in caplog.records[-1].message  # counted
    assert {e.sr for e in entries} == {SR, 16000} and entries[1].max_freq == 8000


def test_a_list_whose_files_all_fail_stops_with_a_clear_error(tmp_path, capsys, caplog):
    write_bad_files(tmp_path / "bad")
    with caplog.at_level("WARNING", logger="dfn4lab.data"):
        with pytest.raises(NoUsableFiles, match=r"all 7 speech files .* unusable: 7 files skipped"):
            lists.scan([tmp_path / "bad"], "speech")
    assert len([r for r in caplog.records if "skipping" in r.message]) == 7  # once each (twice, before)
    rc = lists.main(["--speech-dirs", str(tmp_path / "bad"), "--output-dir", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "all 7 speech files" in err and "report.json" in err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["skipped"] == 7
    with pytest.raises(NoUsableFiles, match="no speech audio"):
        lists.scan([tmp_path / "nothing-here"], "speech")


def test_splits_come_from_folders_or_group_hashes(tmp_path):
    root = tmp_path / "noise"
    for split in ("train", "test"):
        write(root / split / "rain" / "a.wav", tone(0.5))
    for i in range(3):  # variants of one sound share a group, hence a split
        sf.write(root / f"fire.{i}.wav", tone(0.5, seed=i), SR)
    for i in range(30):
        sf.write(root / f"sound{chr(97 + i % 26)}{i // 26}x.wav", tone(0.5, seed=i), SR)
    entries = lists.scan([root], "noise")
    by_name = {Path(e.path).relative_to(root).as_posix(): e for e in entries}
    assert by_name["train/rain/a.wav"].split == "train" and by_name["test/rain/a.wav"].split == "test"
    fires = [e for n, e in by_name.items() if n.startswith("fire")]
    assert len({e.group for e in fires}) == 1 and len({e.split for e in fires}) == 1
    counts = {s: sum(e.split == s for e in entries) for s in SPLITS}
    assert counts["train"] > counts["valid"] and counts["train"] > counts["test"]
    # stable: the same group always lands in the same split
    assert lists.hash_split("fire", (0.8, 0.1, 0.1)) == fires[0].split


def test_split_folders_in_any_case_and_librispeech_names_fix_the_split(tmp_path):
    root = tmp_path / "sp"  # TIMIT's TRAIN/TEST, LibriSpeech's dev-clean: groups hashed into splits, before
    for split in ("TRAIN", "dev-clean", "Test", "train_other"):
        write(root / split / "spk" / "a.wav", tone(0.6))
    got = {Path(e.path).parent.parent.name: e.split for e in lists.scan([root], "speech")}
    assert got == {"TRAIN": "train", "dev-clean": "valid", "Test": "test", "train_other": "train"}
    assert lists.split_name("development") is None and lists.split_name("p225") is None


def test_the_split_does_not_depend_on_the_corpus_folder_name_or_path(tmp_path):
    """Moved, renamed or reached through a link, a corpus splits the same: a training speaker landed in
    test when the lists were rebuilt after a rename, before."""
    root = tmp_path / "speech"
    for k in range(12):
        write(root / f"spk_{k:02d}" / "u.wav", tone(0.6, seed=k))
    (tmp_path / "speechlink").symlink_to(root)
    copy = tmp_path / "alt" / "clean"
    copy.parent.mkdir()
    shutil.copytree(root, copy)

    def splits(d: Path) -> dict[str, str]:
        return {Path(e.path).parent.name: e.split for e in lists.scan([d], "speech")}

    assert (
        splits(root) == splits(tmp_path / "speechlink") == splits(copy) == splits(Path(os.path.relpath(root)))
    )
    assert len(set(splits(root).values())) > 1


def test_flat_speaker_names_group_by_pattern_and_warn_without_one(tmp_path):
    """DNS Challenge's flat names: one group per chapter spread a reader over splits, without a word."""
    root = tmp_path / "clean"
    root.mkdir()
    for r in range(4):
        for c in range(6):
            sf.write(root / f"book_{c:05d}_chp_{c:04d}_reader_{r:05d}_{c}.wav", tone(0.6, seed=r * 6 + c), SR)
    with pytest.warns(UserWarning, match=r"24 speech files sit directly in .*--group-pattern"):
        lists.scan([root], "speech")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entries = lists.scan([root], "speech", group_pattern=r"reader_\d+")
    by_reader: dict[str, set[str]] = {}
    for e in entries:
        by_reader.setdefault(e.group, set()).add(e.split)
    assert sorted(by_reader) == [f"clean/reader_{r:05d}" for r in range(4)]
    assert all(len(s) == 1 for s in by_reader.values())  # a reader stays in one split
    with pytest.raises(ValueError, match="is no regular expression"):
        lists.scan([root], "speech", group_pattern="reader_(")


def test_linked_folders_mp3_and_overlaps_are_listed_once_and_dead_channels_skipped(tmp_path):
    root = tmp_path / "sp"
    write(root / "a" / "1.wav", tone(0.6))
    write(tmp_path / "elsewhere" / "2.flac", tone(0.6, seed=1))
    (root / "b").symlink_to(tmp_path / "elsewhere")  # a speaker folder linked in: left out, before
    (root / "loop").symlink_to(root)  # a link back up the tree is walked once
    sf.write(root / "a" / "3.mp3", tone(0.6, seed=2), SR)
    stereo = np.stack([tone(0.6, seed=3), np.zeros(int(0.6 * SR), np.float32)], axis=1)
    sf.write(root / "a" / "dead.wav", stereo, SR)  # one dead channel: silent targets half the time, before
    report = checks.Report()
    with pytest.warns(UserWarning, match="3 speech files were reached twice"):
        entries = lists.scan([root, root / "a"], "speech", report=report)
    assert sorted(Path(e.path).name for e in entries) == ["1.wav", "2.flac", "3.mp3"]
    (bad,) = report.bad
    assert (Path(bad.path).name, bad.reason) == ("dead.wav", "silent") and bad.detail.startswith(
        "channel 2 of 2"
    )


def test_cli_warns_when_a_split_gets_no_files_of_a_kind(tmp_path, capsys):
    for k in range(3):
        write(tmp_path / "sp" / "train" / f"s{k}" / "u.wav", tone(0.6, seed=k))
    write(tmp_path / "nz" / "train" / "n" / "n.wav", tone(0.6, seed=9))
    args = ["--speech-dirs", str(tmp_path / "sp"), "--noise-dirs", str(tmp_path / "nz"), "--output-dir"]
    assert lists.main([*args, str(tmp_path / "lists")]) == 0
    err = capsys.readouterr().err
    assert "warning: no speech in valid, speech in test, noise in valid, noise in test:" in err


def test_cli_writes_lists_and_a_config_training_reads(tmp_path, capsys):
    sp, nz = tmp_path / "sp", tmp_path / "nz"
    for s in SPLITS:
        for k in range(2):
            write(sp / s / f"spk{k}" / "u.flac", tone(1.0))
        write(nz / s / "n.flac", tone(1.0, seed=5))
    write_bad_files(sp / "train" / "spk0" / "bad")
    out = tmp_path / "lists"
    args = ["--speech-dirs", str(sp), "--noise-dirs", str(nz), "--output-dir", str(out), "--generate-config"]
    assert lists.main(args) == 0
    assert "7 files skipped" in capsys.readouterr().out
    cfg = DataConfig.from_json(out / "data_config.json")
    assert set(cfg.lists) == set(SPLITS) and cfg.mix == MixConfig()
    files = lists.load_split(cfg, "valid")
    assert len(files["speech"]) == 2 and len(files["noise"]) == 1 and files["rir"] == []
    assert DataConfig.from_json(cfg.to_json()) == cfg  # JSON round trip
    assert json.loads((out / "report.json").read_text())["counts"]["nan"] == 1


def _entries(tmp_path: Path, n: int) -> tuple[list[Entry], list[Entry]]:
    speech, noise = [], []
    for i in range(n):
        p = tmp_path / f"s{i}.wav"
        sf.write(p, tone(1.0, freq=200 + 50 * i, seed=i), SR)
        speech.append(Entry(str(p), "speech", "train", f"spk{i}", 1.0, SR, 1, SR // 2))
    p = tmp_path / "n.wav"
    sf.write(p, tone(1.0, freq=3000, seed=99), SR)
    noise.append(Entry(str(p), "noise", "train", "n", 1.0, SR, 1, SR // 2))
    return speech, noise


def test_files_that_go_bad_after_listing_never_crash_a_run(tmp_path):
    speech, noise = _entries(tmp_path, 6)
    cfg = MixConfig(max_len_s=0.5, p_interferer=0.0)
    clean_run = [Mixer(speech, noise, cfg=cfg).sample(0, i) for i in range(6)]
    expected = write_bad_files(tmp_path / "bad")
    # Replace three listed files by bad ones (unreadable, NaN, wrong rate) after the lists were made.
    for e, name in zip(speech[:3], ("garbage.wav", "nan.wav", "rate.wav"), strict=True):
        Path(e.path).write_bytes((tmp_path / "bad" / name).read_bytes())
    m = Mixer(speech, noise, cfg=cfg)
    got = [m.sample(0, i) for i in range(6)]
    assert {b.reason for b in m.report.bad} == {expected[n] for n in ("garbage.wav", "nan.wav", "rate.wav")}
    broken = {e.path for e in speech[:3]}
    assert all(np.isfinite(x.noisy).all() and x.meta["speech"] not in broken for x in got)
    hit = [m.speech_index(0, i) < 3 for i in range(6)]  # the slots whose file went bad
    assert sum(hit) == 3
    for i in range(6):  # the others are unchanged
        if not hit[i]:
            np.testing.assert_array_equal(got[i].noisy, clean_run[i].noisy)
    # A bad file already known gives the same sample as meeting it for the first time.
    fresh, i = Mixer(speech, noise, cfg=cfg), hit.index(True, hit.index(True) + 1)
    np.testing.assert_array_equal(fresh.sample(0, i).noisy, m.sample(0, i).noisy)

    # The loader merges the workers' reports; the run goes on.
    with Loader(Mixer(speech, noise, cfg=cfg), batch_size=2) as lo:
        assert len(list(lo)) == 3
        assert lo.report.counts() == {"unreadable": 1, "nan": 1, "wrong_rate": 1}

    for e in speech:  # now every speech file is bad: a clear error, not a crash deep inside
        Path(e.path).write_bytes(b"")
    with pytest.raises(NoUsableFiles, match="all 6 speech files are unusable"):
        Mixer(speech, noise, cfg=cfg).sample(0, 0)


def test_a_file_bad_in_part_gives_samples_that_do_not_depend_on_earlier_reads(tmp_path):
    """NaN in the second half of a noise file: stretches that meet it fall back to the next file, the
    others use it, whatever was read before (so worker processes agree with the main one)."""
    speech, noise = _entries(tmp_path, 4)
    x = tone(4.0, freq=3000, seed=7)
    x[x.size // 2 :] = np.nan
    sf.write(tmp_path / "partnan.wav", x, SR, subtype="FLOAT")
    noise.insert(0, Entry(str(tmp_path / "partnan.wav"), "noise", "train", "pn", 4.0, SR, 1, SR // 2))
    cfg = MixConfig(max_len_s=0.5, p_interferer=0.0, p_reverb=0.0, noises=(1, 1))
    forward = Mixer(speech, noise, cfg=cfg, samples_per_epoch=24)
    a = [forward.sample(0, i) for i in range(24)]
    backward = Mixer(speech, noise, cfg=cfg, samples_per_epoch=24)
    b = [backward.sample(0, i) for i in reversed(range(24))][::-1]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.noisy, y.noisy)
    used = [m.meta["noises"][0]["path"] == noise[0].path for m in a]
    assert any(used) and forward.report.counts() == {"nan": 1}  # its good half used, its bad half reported


def test_scanned_split_folders_and_one_group_warning(tmp_path):
    root = tmp_path / "speech"
    for split in SPLITS:
        for spk in ("a", "b"):
            write(root / split / f"{split}-{spk}" / "x.wav", tone(0.5))
    entries = lists.scan([root / s for s in SPLITS], "speech")  # each split folder scanned itself
    assert {(Path(e.path).parent.parent.name, e.split) for e in entries} == {(s, s) for s in SPLITS}
    flat = tmp_path / "corpus" / "wav48"
    for i in range(20):
        write(flat / f"p{i}" / "x.wav", tone(0.5, seed=i))
    with pytest.warns(UserWarning, match="all 20 speech files below .* form one group"):
        lists.scan([tmp_path / "corpus"], "speech")
    assert len({e.group for e in lists.scan([flat], "speech")}) == 20  # the speakers' folder: 20 groups
    rooms = tmp_path / "rir"  # one group, but split folders place it (the demo corpus' rir/): no warning
    for i, split in enumerate(SPLITS * 7):
        write(rooms / split / "rooms" / f"room{i}.wav", tone(0.5, seed=i))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {e.split for e in lists.scan([rooms], "rir")} == set(SPLITS)
