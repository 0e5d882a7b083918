"""dfn4lab.data.datastore: build, read back exactly, verify checksums, feed the loader, CLI."""

from __future__ import annotations

import json

from dfn4lab.data import datastore
from dfn4lab.data.config import DataConfig
from dfn4lab.data.datastore import Datastore
from dfn4lab.data.loader import Loader
from dfn4lab.data.mixing import Mixer

import numpy as np
import pytest
from safetensors import SafetensorError


@pytest.fixture(scope="module")
def corpus(tiny_corpus, tmp_path_factory):
    """(folder with ``small.json``, its config): the shared corpus with short mixtures; the corpus
    folder stays as built."""
    cfg = DataConfig.from_json(tiny_corpus / "data_config.json").replace(
        mix=dict(max_len_s=0.5, p_reverb=0.5)
    )
    folder = tmp_path_factory.mktemp("config")
    cfg.to_json(folder / "small.json")
    return folder, cfg


def test_build_read_back_and_verify(corpus, tmp_path):
    _, cfg = corpus
    mixer = Mixer.from_config(cfg, "train")
    m = datastore.build(tmp_path / "store", mixer, samples=7, epoch=2, shard_size=3)
    assert [s["n"] for s in m["shards"]] == [3, 3, 1] and len(m["meta"]) == 7
    store = Datastore(tmp_path / "store")
    assert len(store) == 7 and store.verify() == []
    for i in (0, 4, 6):
        s, x = store.sample(0, i), mixer.sample(2, i)
        np.testing.assert_array_equal(s.noisy, x.noisy)
        np.testing.assert_array_equal(s.clean, x.clean)
        assert s.snr == x.snr and s.meta["speech"] == x.meta["speech"]
    info = store.info()
    assert info["samples"] == 7 and info["shards"] == 3 and sum(info["snr_counts"].values()) == 7


def test_loader_from_a_datastore_equals_mixing_on_the_fly(corpus, tmp_path):
    _, cfg = corpus
    mixer = Mixer.from_config(cfg.replace(samples_per_epoch=8), "train")
    datastore.build(tmp_path / "store", mixer, samples=8, shard_size=5)
    a = next(iter(Loader(Datastore(tmp_path / "store"), batch_size=4, shuffle=False)))
    b = next(iter(Loader(mixer, batch_size=4, shuffle=False)))
    for name in ("noisy", "clean", "snr"):
        np.testing.assert_array_equal(np.array(getattr(a, name)), np.array(getattr(b, name)))
    # Stored features were computed in batches of 5 (a shard), these in 4: equal to float rounding.
    np.testing.assert_allclose(np.array(a.feat_erb), np.array(b.feat_erb), atol=1e-5)
    np.testing.assert_allclose(np.array(a.feat_spec), np.array(b.feat_spec), atol=1e-5)


def test_verify_finds_altered_and_missing_shards(corpus, tmp_path):
    _, cfg = corpus
    datastore.build(tmp_path / "store", Mixer.from_config(cfg, "train"), samples=4, shard_size=2)
    shard = tmp_path / "store" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    (tmp_path / "store" / "shard-00000.safetensors").unlink()
    problems = Datastore(tmp_path / "store").verify()
    assert any("shard-00001" in p and "checksum" in p for p in problems)
    assert any("shard-00000" in p and "missing" in p for p in problems)
    with pytest.raises(FileNotFoundError, match="not a datastore"):
        Datastore(tmp_path)


def test_cli(corpus, tmp_path, capsys):
    out, _ = corpus
    store = tmp_path / "cli-store"
    args = ["--config", str(out / "small.json"), "--split", "valid", "--samples", "3", "--output", str(store)]
    assert datastore.main(["build", *args]) == 0
    assert datastore.main(["verify", str(store)]) == 0
    assert datastore.main(["info", str(store)]) == 0
    printed = capsys.readouterr().out
    assert "OK (3 samples)" in printed
    assert json.loads(printed[printed.index("{") :])["split"] == "valid"
    (store / "shard-00000.safetensors").write_bytes(b"x")
    assert datastore.main(["verify", str(store)]) == 1
    assert datastore.main(["build", *args]) == 0  # a datastore is rebuilt in place
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")  # a folder of the user's is not
    assert datastore.main(["build", *args[:-1], str(mine)]) == 2
    assert (mine / "thesis.txt").read_text() == "precious" and [p.name for p in mine.iterdir()] == [
        "thesis.txt"
    ]
    assert datastore.main(["build", *args[:-3], "0", "--output", str(tmp_path / "none")]) == 2
    assert datastore.main(["build", *args, "--workers", "-1"]) == 2
    assert datastore.main(["info", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
    (mine / "manifest.json").write_text('{"name": "my dataset"}')  # a manifest of the user's own
    assert datastore.main(["build", *args[:-1], str(mine)]) == 2 and (mine / "thesis.txt").exists()
    for name in ("info", "verify"):  # a folder with a manifest that is not a datastore's: one line
        assert datastore.main([name, str(mine)]) == 2
        assert "is not a datastore" in capsys.readouterr().err


def test_failures_leave_no_folder_no_workers_and_name_the_shard(corpus, tmp_path, monkeypatch):
    import multiprocessing

    _, cfg = corpus
    mixer = Mixer.from_config(cfg, "train")
    with pytest.raises(ValueError, match="mixes at 16000 Hz, the model's features are for 48000 Hz"):
        datastore.build(tmp_path / "sr", Mixer.from_config(cfg.replace(mix=dict(sr=16000)), "train"), 2)

    def broken(*args, **kw):  # what safetensors raises on a full disk: a traceback, before
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(datastore, "save_file", broken)
    for workers in (0, 2):
        with pytest.raises(OSError, match=r"store: cannot write shard-00000.safetensors .*No space left"):
            datastore.build(tmp_path / "store", mixer, samples=8, shard_size=2, workers=workers)
        assert list(tmp_path.iterdir()) == [] and multiprocessing.active_children() == []
    monkeypatch.undo()
    datastore.build(tmp_path / "store", mixer, samples=4, shard_size=2)
    shard = tmp_path / "store" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated since
    with pytest.raises(ValueError, match=r"shard-00001.safetensors: unreadable .* `verify`"):
        next(iter(Loader(Datastore(tmp_path / "store"), batch_size=4, shuffle=False)))
