"""dfn4lab.evaluate (test sets, SNRs, statistics, the quick CLI end to end) and dfn4lab.macs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dfn4lab  # noqa: F401
from dfn4lab import audio, backbones, checkpoint, convert, data, evaluate, inference, macs, report
from dfn4lab.backbones import GroupedLinear
from dfn4lab.config import preset
from dfn4lab.layers import ConvBlock

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import soundfile as sf

SR = 16000


def write_pair(folder, noisy_dir, clean_dir, name, snr, seed=0):
    clean = data.pink_noise(SR, seed=seed) * 0.1
    noisy = data.mix(clean, np.random.default_rng(seed).standard_normal(SR).astype(np.float32), snr)
    for sub, x in ((noisy_dir, noisy), (clean_dir, clean)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        audio.save(folder / sub / name, x, SR, subtype="FLOAT")


@pytest.mark.parametrize("layout", evaluate.LAYOUTS)
def test_folder_layouts_with_estimated_snr(tmp_path, layout):
    for i, snr in enumerate((-3.0, 7.5)):
        write_pair(tmp_path, *layout, f"f{i}.wav", snr, seed=i)
    items = evaluate.load_set(tmp_path)
    assert [it.name for it in items] == ["f0", "f1"]
    assert [it.snr for it in items] == pytest.approx([-3.0, 7.5], abs=0.01)  # mix() sets it exactly


def test_manifest_and_list_file_snrs_win_over_estimates(tmp_path):
    write_pair(tmp_path, "noisy", "clean", "a.wav", 5.0)
    (tmp_path / "manifest.csv").write_text("name,snr\na.wav,12\n")
    assert evaluate.load_set(tmp_path)[0].snr == 12.0
    lst = tmp_path / "test.lst"
    lst.write_text("# noisy clean snr\nnoisy/a.wav clean/a.wav -2.5\n")
    (item,) = evaluate.load_set(lst)
    assert (item.name, item.snr, item.clean) == ("a", -2.5, tmp_path / "clean" / "a.wav")
    lst.write_text("noisy/a.wav clean/a.wav\n")
    assert evaluate.load_set(lst)[0].snr == pytest.approx(5.0, abs=0.01)


def test_corpus_test_split_becomes_cached_pairs(tmp_path):
    from dfn4lab.data import demo, lists
    from dfn4lab.data.config import MixConfig

    corpus = tmp_path / "corpus"
    demo.build(corpus, demo.DemoConfig.tiny(), log=lambda *_: None)
    items = evaluate.load_set(corpus)
    n_speech = len(lists.read_list(corpus / "lists" / "speech_test.csv"))
    assert len(items) == evaluate.CORPUS_EPOCHS * n_speech
    assert all(it.noisy.parent == tmp_path / "corpus-testset" / "noisy" for it in items)
    snrs = {it.snr for it in items}
    assert snrs <= {*MixConfig().snrs, -100.0}  # mixed at the recipe's SNRs (or noise only)
    first = items[0].noisy.stat().st_mtime_ns
    assert evaluate.load_set(corpus)[0].noisy.stat().st_mtime_ns == first  # cached, not rewritten
    noise = lists.read_list(corpus / "lists" / "noise_test.csv")[0].path
    x, sr = sf.read(noise)
    sf.write(noise, x * 0.5, sr)  # a test file edited in place: the cached set was reused, before
    assert evaluate.load_set(corpus)[0].noisy.stat().st_mtime_ns != first
    x, _ = audio.load(items[0].noisy)
    assert x.shape[1] == MixConfig().samples
    # a folder of the user's by that name is never replaced (rmtree'd with the user's files, before)
    shutil.rmtree(tmp_path / "corpus-testset")
    (tmp_path / "corpus-testset").mkdir()
    (tmp_path / "corpus-testset" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="corpus-testset exists and was not written by this command"):
        evaluate.load_set(corpus)
    assert (tmp_path / "corpus-testset" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "corpus-testset"]  # no .tmp left


def test_dropouts_count_silent_blocks_of_the_output_only():
    x = np.ones(1000, np.float32)
    y = x.copy()
    y[200:400] = 0  # two blocks of 100 samples silenced
    assert evaluate.dropouts(x, y, 100) == 2
    x[200:300] = 0  # where the input is silent too, silence is no dropout
    assert evaluate.dropouts(x, y, 100) == 1
    assert evaluate.dropouts(x, x, 100) == 0


def test_bad_sets_are_reported(tmp_path):
    write_pair(tmp_path, "noisy", "clean", "a.wav", 5.0)
    (tmp_path / "clean" / "a.wav").unlink()
    with pytest.raises(FileNotFoundError, match="no clean counterpart"):
        evaluate.load_set(tmp_path)
    with pytest.raises(FileNotFoundError, match="expected subfolders"):
        evaluate.load_set(tmp_path / "noisy")
    (tmp_path / "x.lst").write_text("only_one_field\n")
    with pytest.raises(ValueError, match="expected"):
        evaluate.load_set(tmp_path / "x.lst")
    write_pair(tmp_path, "noisy", "clean", "a.wav", 5.0)
    (tmp_path / "x.lst").write_text("# noisy clean snr\nnoisy/a.wav clean/a.wav abc\n")
    with pytest.raises(ValueError, match=r"x.lst:2: the SNR 'abc' is not a number"):
        evaluate.load_set(tmp_path / "x.lst")
    with pytest.raises(ValueError, match="not a text list"):  # an audio file given as the set
        evaluate.load_set(tmp_path / "noisy" / "a.wav")


def test_count_macs_of_known_ops():
    x = mx.zeros((1, 100, 32))
    assert macs.count_macs(lambda: nn.Linear(32, 64)(x)) == 100 * 32 * 64
    assert macs.count_macs(lambda: GroupedLinear(32, 64, groups=4)(x)) == 100 * 4 * 8 * 16
    img, w = mx.zeros((1, 10, 20, 4)), mx.zeros((8, 3, 3, 4))
    assert macs.count_macs(lambda: mx.conv2d(img, w)) == 8 * 18 * 8 * (3 * 3 * 4)
    q, k = mx.zeros((1, 2, 10, 16)), mx.zeros((1, 2, 12, 16))
    attn = macs.count_macs(lambda: mx.fast.scaled_dot_product_attention(q, k, k, scale=1.0))
    assert attn == 2 * 10 * 12 * (16 + 16)  # q k^T, then weights @ v
    # causal: the pairs the mask keeps (10 queries at keys 2..11 see 3..12 keys), as a causal kernel
    keep = (2 + mx.arange(10))[:, None] >= mx.arange(12)[None]
    causal = macs.count_macs(lambda: backbones.attention(q, k, k, 1.0, keep))
    assert causal == 2 * sum(range(3, 13)) * (16 + 16)
    a, b = mx.zeros((4, 6)), mx.zeros((6, 5))
    assert macs.count_macs(lambda: mx.einsum("ij,jk", a, b)) == 4 * 6 * 5  # implicit output "ik"
    assert macs.count_macs(lambda: mx.einsum("ij,jk->ik", a, b)) == 4 * 6 * 5
    # a grouped ConvBlock counts as the grouped conv it computes (plus its 1x1 pointwise conv)
    feat = mx.zeros((1, 10, 96, 2))
    block = macs.count_macs(lambda: ConvBlock(2, 64, (3, 3))(feat))
    assert block == 10 * 96 * 64 * (1 * 3 * 3) + 10 * 96 * 64 * 64
    assert macs.count_macs(lambda: mx.sin(x) * x) == 0


def test_dfn3_macs_are_those_of_deepfilternet3():
    model = inference.build(preset("dfn3"))
    total = macs.model_macs(model)
    grus = 5 * 100 * 3 * 2 * 256 * 256  # its 5 GRU layers alone, over 100 frames
    assert grus < total < 2 * grus
    assert 0.3e9 < total < 0.4e9  # published for DeepFilterNet3: ~0.35 GMAC per second


def test_statistics():
    s = evaluate.mean_ci([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["n"] == 3
    assert s["ci"] == pytest.approx(4.302652729911275 / np.sqrt(3))  # t(0.975, 2) * sd / sqrt(n)
    assert evaluate.mean_ci([1.0])["ci"] is None and evaluate.mean_ci([])["mean"] is None
    assert [evaluate.snr_bin(v) for v in (-100, -11, -5, -0.1, 0, 7, 19.9, 40)] == [
        "noise only",  # the data's NOISE_ONLY_SNR: no speech to score, not the lowest SNR bin
        "< -5",
        "-5..0",
        "-5..0",
        "0..5",
        "5..10",
        "15..20",
        ">= 20",
    ]


@pytest.mark.skipif(not data.speech_files(), reason="no real speech: alsa-utils (Debian) or the demo corpus")
def test_the_official_runtime_is_built_outside_the_timed_call(monkeypatch, tmp_path):
    """RTF times enhancement, not the runtime's model loading (~0.1 s a file, nearly half its time)."""
    events = []

    class Enhancer:
        def prepare(self):
            events.append("prepare")

        def __call__(self, x, sr):
            events.append("enhance")
            return x

    clock = iter(range(10**6))
    monkeypatch.setattr(evaluate.time, "perf_counter", lambda: events.append("clock") or next(clock))
    items = evaluate.load_set(evaluate.quick_set(tmp_path / "set", seconds=1.0))[:2]
    evaluate.run(items, {"model": (Enhancer(), None)}, tmp_path / "out", ["si_sdr"], progress=False)
    assert events[:2] == ["prepare", "enhance"]  # the warm-up
    assert events[2:] == ["prepare", "clock", "enhance", "clock"] * 2  # each file: prepared, then timed


def test_noise_only_files_stay_out_of_the_overall_means():
    rows = [
        {
            "model": "m",
            "file": "a",
            "snr": evaluate.NOISE_ONLY_SNR,
            "flags": "",
            "dropouts": 0,
            "dnsmos_ovrl": 1.0,
        },
        {"model": "m", "file": "b", "snr": 5.0, "flags": "", "dropouts": 0, "dnsmos_ovrl": 3.0},
        {
            "model": "m",
            "file": "c",
            "snr": 4.996,
            "flags": "",
            "dropouts": 0,
            "dnsmos_ovrl": 3.5,
        },  # bins unrounded
    ]
    s = evaluate.summarize(rows, ["dnsmos_ovrl"])
    assert s["overall"]["m"]["dnsmos_ovrl"]["mean"] == 3.25 and s["overall"]["m"]["dnsmos_ovrl"]["n"] == 2
    assert s["snr_bins"]["noise only"]["m"]["dnsmos_ovrl"]["mean"] == 1.0
    assert s["snr_bins"]["0..5"]["m"]["dnsmos_ovrl"]["mean"] == 3.5


@pytest.mark.skipif(not data.speech_files(), reason="no real speech: alsa-utils (Debian) or the demo corpus")
def test_bad_pairs_are_skipped_and_counted(tmp_path):
    folder = evaluate.quick_set(tmp_path / "set", seconds=1.0)
    names = sorted(p.name for p in (folder / "noisy").iterdir())
    sf.write(folder / "noisy" / names[0], np.full(48000, np.nan, np.float32), 48000, subtype="FLOAT")
    sf.write(folder / "clean" / names[1], np.zeros(24000, np.float32), 48000)  # half as long: not its pair
    result = evaluate.evaluate(folder, [], out_dir=tmp_path / "out", metric_names=["si_sdr"], progress=False)
    assert sorted(result["skipped"]) == sorted(Path(n).stem for n in names[:2])
    assert (
        result["files"] == len(names) - 2 and "Files skipped (unreadable" in Path(result["table"]).read_text()
    )


def test_an_interrupted_rerun_leaves_the_past_run_whole_and_user_folders_alone(tmp_path):
    """The enhanced audio of a past run was deleted first, so an interrupted rerun left its tables
    describing files that were gone or another model's."""
    folder = evaluate.quick_set(tmp_path / "set", seconds=1.0)
    items, out = evaluate.load_set(folder), tmp_path / "out"

    def halve(x, sr):
        return x * 0.5

    evaluate.run(items, {"noisy": (lambda x, sr: x, None), "m": (halve, None)}, out, ["si_sdr"], False)
    before = {p.name: p.read_bytes() for p in (out / "enhanced" / "m").iterdir()}
    calls = []

    def breaks(x, sr):
        calls.append(1)
        if len(calls) > 2:  # the warm-up and one file, then Ctrl-C
            raise KeyboardInterrupt
        return x * 0.25

    with pytest.raises(KeyboardInterrupt):
        evaluate.run(items, {"m": (breaks, None)}, out, ["si_sdr"], False)
    assert {p.name: p.read_bytes() for p in (out / "enhanced" / "m").iterdir()} == before
    assert sorted(p.name for p in (out / "enhanced").iterdir()) == ["m"]  # no partial folder left
    rows, _ = evaluate.run(items, {"m": (halve, None)}, out, ["si_sdr"], False)  # a rerun after it
    assert sorted(p.name for p in (out / "enhanced").iterdir()) == ["m"]  # no partial folder left
    assert all(Path(r["path"]).is_file() for r in rows)

    (out / "enhanced" / "mine").mkdir()
    (out / "enhanced" / "mine" / "notes.txt").write_text("my notes")  # deleted, before
    with pytest.raises(ValueError, match="mine exists and was not written by this command"):
        evaluate.run(items, {"mine": (halve, None)}, out, ["si_sdr"], False)
    assert (out / "enhanced" / "mine" / "notes.txt").read_text() == "my notes"
    (out / "enhanced" / "old").mkdir()  # an earlier version's folder (.wav files only, no marker) is ours
    shutil.copy(rows[0]["path"], out / "enhanced" / "old" / "x.wav")
    evaluate.run(items, {"old": (halve, None)}, out, ["si_sdr"], False)
    assert not (out / "enhanced" / "old" / "x.wav").exists()
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="user exists and was not written by this command"):
        evaluate.quick_set(tmp_path / "user")  # --quick --out DIR deleted DIR/quick_set's files, before


def test_run_folders_skip_unpublished_saves_and_count_runs_not_bests(tmp_path):
    cfg = preset("dfn3")
    model = inference.build(cfg)
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    convert.save(r1 / "checkpoints" / "step-00000010", model, cfg)
    time.sleep(0.01)
    convert.save(r1 / "checkpoints" / ".tmp-step-00000020-4242", model, cfg)  # a save killed halfway
    assert inference.model_folder(r1) == r1 / "checkpoints" / "step-00000010"
    convert.save(r1 / ".tmp-best-4242", model, cfg)  # the first best/ save, killed halfway
    assert inference.model_folder(r1) == r1 / "checkpoints" / "step-00000010"
    convert.save(r1 / "best", model, cfg)
    convert.save(r2 / "checkpoints" / "step-00000010", model, cfg)  # another run, without a best/ yet
    with pytest.raises(ValueError, match=r"several runs \(r1, r2\)"):
        inference.model_folder(tmp_path)


def test_a_run_without_best_resolves_to_its_highest_step_not_its_newest_files(tmp_path):
    cfg = preset("dfn3")
    model = inference.build(cfg)
    run = tmp_path / "run"
    convert.save(run / "checkpoints" / "step-00000004", model, cfg)
    time.sleep(0.01)
    convert.save(run / "checkpoints" / "step-00000002", model, cfg)  # copied last (cp -r): newer files
    convert.save(run / "checkpoints" / "damaged-step-00000009", model, cfg)  # set aside as unreadable
    assert inference.model_folder(run) == run / "checkpoints" / "step-00000004"


def test_run_folder_resolves_to_its_best_checkpoint(tmp_path):
    cfg = preset("dfn3")
    model = inference.build(cfg)
    run = tmp_path / "myrun"
    convert.save(run / "ckpt" / "best", model, cfg)
    time.sleep(0.01)
    (run / "ckpt" / "last").mkdir()
    for f in ("config.json", "model.safetensors"):
        (run / "ckpt" / "last" / f).write_bytes(b"")  # newer, but not the best
    assert inference.model_folder(run) == run / "ckpt" / "best"
    convert.save(tmp_path / "other" / "best", model, cfg)  # a second run beside it: ambiguous
    with pytest.raises(ValueError, match=r"several runs \(myrun/ckpt, other\)"):
        inference.model_folder(tmp_path)
    models = evaluate.load_models([str(run)])
    assert list(models) == ["noisy", "myrun"]
    # the best checkpoints of two runs: "model name 'best' is taken", before
    assert list(evaluate.load_models([str(run / "ckpt" / "best"), str(tmp_path / "other" / "best")])) == [
        "noisy",
        "ckpt-best",
        "other-best",
    ]
    convert.save(run / "checkpoints" / "step-00000004", model, cfg)
    assert evaluate.model_name(str(run / "checkpoints" / "step-00000004")) == "myrun-step-00000004"
    with pytest.raises(ValueError, match="model name 'dfn3' is taken: give each model once"):
        evaluate.load_models(["dfn3", "dfn3"])
    x = np.random.default_rng(0).standard_normal(4800).astype(np.float32) * 0.1
    np.testing.assert_array_equal(models["noisy"][0](x, 48000), x)


@pytest.mark.skipif(
    not data.speech_files(), reason="the quick set needs real speech (alsa-utils or the demo corpus)"
)
def test_a_run_is_scored_and_reported_at_its_checkpoint_step(tmp_path):
    from dfn4lab import train
    from dfn4lab.backbones import param_count

    from conftest import tiny_cfg

    model = inference.build(tiny_cfg())
    opt = train.make_optimizer(train.OptimConfig(), 10)
    opt.init(model.trainable_parameters())
    run = tmp_path / "runs" / "tiny"
    checkpoint.save_checkpoint(run / "best", model, opt, {"step": 4, "position": [1, 0]})
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"kind": "step", "step": s}) + "\n" for s in (1, 2, 3, 4, 5, 6))
    )
    assert evaluate.model_source(str(run)) == {"folder": str(run / "best"), "step": 4, "run_steps": 6}
    assert evaluate.model_source("dfn3") == {"name": "dfn3"}
    quick = evaluate.quick_set(tmp_path / "set")
    evaluate.evaluate(
        str(quick), [str(run)], out_dir=tmp_path / "out", metric_names=["si_sdr"], progress=False
    )
    block = "\n".join(report.eval_table(tmp_path / "out"))
    assert f"| tiny | {param_count(model) / 1e6:.2f} |" in block  # its size beside its scores
    assert "at the checkpoint of their best whole epoch (step tiny 4 of 6)" in block


def test_quick_cli_end_to_end(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dfn4lab.evaluate", "--quick", "--official", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    head = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(head) == ["noisy", "official", "dfn3", "table"]
    table = (tmp_path / "results.md").read_text()
    assert head["table"] == str(tmp_path / "results.md") and "## Environment" in table
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * len(evaluate.QUICK_SNRS)
    assert {float(r["snr"]) for r in rows} == set(evaluate.QUICK_SNRS)
    noisy, official, dfn3 = head["noisy"], head["official"], head["dfn3"]
    for enhanced in (official, dfn3):  # both clearly beat the noisy input
        assert enhanced["pesq"] > noisy["pesq"] + 0.5
        assert enhanced["si_sdr"] > noisy["si_sdr"] + 5
        assert enhanced["dnsmos_ovrl"] > noisy["dnsmos_ovrl"] + 0.5
    # Same network, weights and frame alignment: the outputs agree to float32 rounding (>60 dB).
    assert abs(dfn3["pesq"] - official["pesq"]) < 0.01
    assert abs(dfn3["si_sdr"] - official["si_sdr"]) < 0.05
    assert dfn3["params"] == official["params"] > 2e6 and dfn3["rtf"] > 0
    block = "\n".join(report.eval_table(tmp_path))  # the README's table of it
    assert "| dfn3 | 2.14 |" in block and "dfn3 − official runtime, paired over all files: PESQ" in block
    before = table
    assert evaluate.main(["--quick", "--models", "", "--out", str(tmp_path)]) == 2  # nothing to evaluate
    assert (tmp_path / "results.md").read_text() == before  # not rewritten with the noisy row alone


def test_mean_ci_text_prints_no_negative_zero():
    """A paired difference of -0.0001 read "-0.000" in the README."""
    assert evaluate.mean_ci_text({"mean": -1e-4, "ci": 2e-4}, 3) == "0.000 ± 0.000"
    assert evaluate.mean_ci_text({"mean": -2e-3, "ci": None}, 3) == "-0.002"
