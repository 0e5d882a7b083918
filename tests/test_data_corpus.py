"""dfn4lab.data demo corpus: manifest, disjoint splits, determinism, missing sources, licenses."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from dfn4lab.data import demo, lists, sources
from dfn4lab.data.config import SPLITS, DataConfig

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def _check_corpus(out: Path, check_audio: bool) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    assert m["files"], "empty corpus"
    for f in m["files"]:
        assert {"source", "license", "sr", "duration", "split", "group", "kind"} <= f.keys()
        assert f["sr"] == 48000 and f["duration"] > 0 and f["license"] and f["split"] in SPLITS
        if check_audio:
            info = sf.info(out / f["path"])
            assert (info.samplerate, info.channels) == (48000, 1)
            assert abs(info.duration - f["duration"]) < 1e-3
    for kind in ("speech", "noise", "rir"):
        groups = {
            s: {f["group"] for f in m["files"] if f["kind"] == kind and f["split"] == s} for s in SPLITS
        }
        assert all(groups.values()), f"{kind}: a split is empty: {groups}"
        assert not groups["train"] & groups["valid"] and not groups["train"] & groups["test"]
        assert not groups["valid"] & groups["test"]
    return m


def test_tiny_corpus_manifest_and_disjoint_splits(tiny_corpus):
    m = _check_corpus(tiny_corpus, check_audio=True)
    on_disk = {str(p.relative_to(tiny_corpus)) for p in tiny_corpus.rglob("*") if p.suffix == ".flac"}
    assert on_disk == {f["path"] for f in m["files"]}
    rirs = [f for f in m["files"] if f["kind"] == "rir"]
    assert all(0.1 < f["rt60_measured"] < 0.7 for f in rirs)  # tiny rooms draw RT60 0.2-0.4 s


def test_lists_and_config_match_the_manifest(tiny_corpus):
    cfg = DataConfig.from_json(tiny_corpus / "data_config.json")
    m = json.loads((tiny_corpus / "manifest.json").read_text())
    for split in SPLITS:
        files = lists.load_split(cfg, split)
        for kind, entries in files.items():
            want = {
                str((tiny_corpus / f["path"]).resolve())
                for f in m["files"]
                if f["kind"] == kind and f["split"] == split
            }
            assert {e.path for e in entries} == want
            assert all(e.split == split and e.sr == 48000 for e in entries)


def test_build_is_deterministic(tiny_corpus, tmp_path):
    again = tmp_path / "again"
    demo.build(again, demo.DemoConfig.tiny(), log=lambda *_: None)

    def digests(d: Path) -> dict[str, str]:
        return {
            str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in d.rglob("*.*")
            if p.is_file()
        }

    a, b = digests(tiny_corpus), digests(again)
    a.pop("lists/report.json"), b.pop("lists/report.json")
    for d in (a, b):  # lists hold absolute paths
        for k in [k for k in d if k.startswith("lists/")]:
            d.pop(k)
    assert a == b
    other = tmp_path / "seed1"
    demo.build(other, demo.DemoConfig.tiny(seed=1), log=lambda *_: None)
    assert digests(other)["manifest.json"] != a["manifest.json"]


def test_missing_source_is_skipped_and_named(tmp_path, monkeypatch):
    monkeypatch.setattr(sources.shutil, "which", lambda _: None)  # as on a machine without any TTS
    out = tmp_path / "c"
    lines: list[str] = []
    m = demo.build(out, demo.DemoConfig.tiny(sources=("espeak-ng", "say")), log=lines.append)
    assert set(m["sources"]["skipped"]) == {"espeak-ng", "say"}
    assert "espeak-ng" in m["sources"]["skipped"]["espeak-ng"]
    assert any("no speech source" in ln for ln in lines)
    assert m["sources"]["used"]["speechlike"]["files"] > 0  # still a usable corpus
    _check_corpus(out, check_audio=False)


def test_split_groups_keeps_groups_whole_and_fixes_single_speakers():
    groups = [f"g{i}" for i in range(20)] + ["alsa-utils/male"]
    s = demo.split_groups(groups, (0.8, 0.1, 0.1), np.random.default_rng(0))
    assert set(s) == set(groups) and s["alsa-utils/male"] == "test"
    counts = {k: list(s.values()).count(k) for k in SPLITS}
    assert counts == {"train": 16, "valid": 2, "test": 3}
    assert demo.split_groups(["a"], (0.8, 0.1, 0.1), np.random.default_rng(0)) == {"a": "train"}


def test_dep5_license_lookup(tmp_path):
    doc = tmp_path / "doc" / "pkg"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: *\nCopyright: x\nLicense: MIT\n\n"
        "Files: etc/samples/a.flac\n etc/samples/b*.flac\nCopyright: y\nLicense: CC0\n\n"
        "Files: debian/*\nCopyright: z\nLicense: GPL-2+\n"
    )
    lic = lambda p: sources.license_of(p, "pkg", "unknown", doc=tmp_path / "doc")  # noqa: E731
    assert lic("/usr/share/pkg/samples/a.flac") == "CC0"
    assert lic("/usr/share/pkg/samples/b2.flac") == "CC0"
    assert lic("/usr/share/pkg/samples/c.flac") == "MIT"  # debian/* must not match everything
    assert sources.license_of("/x/a.flac", "nopkg", "fallback", doc=tmp_path / "doc") == "fallback"
    (tmp_path / "doc" / "games").mkdir()  # as minetest-data's: a folder's "*" covers its subfolders
    (tmp_path / "doc" / "games" / "copyright").write_text(
        "Files: *\nCopyright: x\nLicense: MIT\n\nFiles: mtg/mods/carts/*\nCopyright: w\nLicense: Expat\n"
    )
    game = "/usr/share/games/minetest/games/minetest_game/mods"
    lic = lambda p: sources.license_of(p, "games", "unknown", doc=tmp_path / "doc")  # noqa: E731
    assert lic(f"{game}/carts/sounds/cart.ogg") == "Expat" and lic(f"{game}/beds/sounds/bed.ogg") == "MIT"


def test_tts_failures_skip_their_clip_only(tmp_path):
    ok, garbage = tmp_path / "ok.wav", tmp_path / "garbage.wav"
    write_ok = f"import soundfile as sf, numpy as np; sf.write({str(ok)!r}, np.ones(800), 8000)"
    jobs = [
        ([sys.executable, "-c", write_ok], None, ok),
        ([sys.executable, "-c", f"open({str(garbage)!r}, 'w').write('x' * 500)"], None, garbage),  # exits 0
        ([str(tmp_path / "no-such-synthesizer")], None, tmp_path / "missing.wav"),
    ]
    assert sources._run_tts(jobs) == [ok, None, None]


@pytest.mark.skipif(not demo.is_built(ROOT / "data" / "demo"), reason="demo corpus not built (make data)")
def test_real_demo_corpus():
    m = _check_corpus(ROOT / "data" / "demo", check_audio=False)
    speakers = {f["group"] for f in m["files"] if f["kind"] == "speech"}
    assert len(speakers) >= 3
    assert 0 < sum(f["duration"] for f in m["files"]) / 60 < 60  # modest: under an hour in all


def test_cli_skips_a_built_corpus(tiny_corpus, capsys, tmp_path):
    out = tmp_path / "cli"
    shutil.copytree(tiny_corpus, out)
    assert demo.main(["--out", str(out)]) == 0
    assert "already" in capsys.readouterr().out


def test_a_failed_rebuild_keeps_the_corpus_and_a_datastore_is_not_a_corpus(
    tiny_corpus, tmp_path, monkeypatch
):
    from dfn4lab.data import datastore
    from dfn4lab.data.mixing import Mixer

    out = tmp_path / "demo"
    shutil.copytree(tiny_corpus, out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    def full(*args, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(lists, "write_lists", full)  # the last step of a build
    with pytest.raises(OSError, match="disk full"):
        demo.build(out, demo.DemoConfig.tiny())
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before and demo.is_built(out)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no half-built folder beside it
    monkeypatch.undo()
    store = tmp_path / "store"
    mixer = Mixer.from_config(
        DataConfig.from_json(out / "data_config.json").replace(mix=dict(max_len_s=0.5)), "train"
    )
    datastore.build(store, mixer, samples=2)
    with pytest.raises(ValueError, match="not written by this command"):
        demo.build(store, demo.DemoConfig.tiny())  # each command replaces only its own kind of folder
    with pytest.raises(ValueError, match="not written by this command"):
        datastore.build(out, mixer, samples=2)
    assert demo.is_built(out) and datastore.Datastore(store).verify() == []


def test_a_copied_corpus_reads_its_own_files(tiny_corpus, tmp_path):
    """Lists hold paths relative to themselves inside a corpus (a copy read the original's files before);
    a list of files elsewhere keeps them absolute."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_corpus, copy)
    cfg = DataConfig.from_json(copy / "data_config.json")
    entries = [e for split in SPLITS for kind in lists.load_split(cfg, split).values() for e in kind]
    assert entries and all(Path(e.path).is_relative_to(copy.resolve()) for e in entries)
    assert all(Path(e.path).is_file() for e in entries)
    outside = lists.Entry(str(entries[0].path), "speech", "train", "g", 1.0, 48000, 1, 24000)
    mine = tmp_path / "mine" / "lists"
    mine.mkdir(parents=True)
    lists.write_list(mine / "x.csv", [outside])  # the file is not below mine/: its path stays absolute
    assert lists.read_list(mine / "x.csv") == [outside] and str(copy) in (mine / "x.csv").read_text()


def test_cli_never_replaces_a_folder_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    assert demo.main(["--tiny", "--out", str(mine)]) == 2
    assert "not written by this command" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["mine"] and (mine / "notes.txt").read_text() == "precious"


def test_real_speech_comes_from_the_demo_corpus_without_alsa_utils(tiny_corpus, tmp_path, monkeypatch):
    """On a Mac there is no /usr/share/sounds/alsa: clips, the quick test set and their tests take the
    demo corpus's test speech instead of failing."""
    from dfn4lab import data, paths

    monkeypatch.setattr(data, "ALSA_SOUNDS", tmp_path / "no-alsa")
    monkeypatch.setattr(paths, "DEMO", tiny_corpus)
    files = data.speech_files()
    assert files and all(tiny_corpus / "speech" / "test" in p.parents for p in files)
    x = data.real_speech(16000, 1.5)
    assert x.shape == (24000,) and np.abs(x).max() > 0.01
    monkeypatch.setattr(paths, "DEMO", tmp_path / "no-demo")
    with pytest.raises(FileNotFoundError, match="install alsa-utils .* or build the demo corpus"):
        data.real_speech()
