"""Training: exact resume after kill -9 and SIGINT, the NaN guard, 2-process data parallelism through
``mlx.launch`` against 1 process, fine-tuning from DFN3, run configs. Tiny model, tiny corpus, short
clips; subprocesses run the real command line."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import dfn4lab  # noqa: F401
from dfn4lab import checkpoint, data, train
from dfn4lab.config import BACKBONES
from dfn4lab.data.config import DataConfig
from dfn4lab.data.mixing import Mixer
from dfn4lab.losses import LossConfig
from dfn4lab.train import RankView, RunConfig

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY, SpeechInPink, tiny_cfg
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture(scope="module")
def corpus(tiny_corpus: Path) -> Path:
    return tiny_corpus / "data_config.json"


def _run(corpus: Path, out: Path, **kw) -> RunConfig:
    base = {
        "out": str(out),
        "preset": "dfn3",
        "model": TINY,
        "data_config": str(corpus),
        "data": {"mix": {"max_len_s": 0.3}, "samples_per_epoch": 8},
        "batch_size": 2,
        "epochs": 3,
        "valid_items": 0,
        "ckpt_every": 2,
        "deterministic": True,
        "progress": False,
        "loss": {"dynamic": "awesome", "dyn_warmup": 4, "vad": 1.0, "vad_every": 2},
        "optim": {"warmup_steps": 3},
    }
    for k, v in kw.items():
        base[k] = {**base[k], **v} if k in ("loss", "optim") else v
    return RunConfig.from_dict(base)


def _weights(folder: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(folder / "model.safetensors")).items()}


def _newest(out: Path) -> int:
    return max((int(p.name.split("-")[1]) for p in checkpoint.checkpoints(out)), default=0)


def _wait_past(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until ``proc`` has written a checkpoint past ``step``."""
    t0 = time.time()
    while _newest(out) <= step:
        assert proc.poll() is None, f"training exited early:\n{proc.communicate()[0]}"
        assert time.time() - t0 < timeout, f"no checkpoint past step {step}"
        time.sleep(0.05)


def _cli(cfg: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [PY, "-m", "dfn4lab.train", "--config", str(cfg), "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill9_and_sigint_resume_to_the_same_weights(corpus, tmp_path):
    ref = _run(corpus, tmp_path / "ref", max_steps=7, batch_schedule="0/2,1/4")
    h = train.train(ref)
    assert h["step"] == 7 and [r["step"] for r in h["steps"]] == list(range(1, 8))
    assert [r["batch_size"] for r in h["steps"]] == [2, 2, 2, 2, 4, 4, 4]
    expected = _weights(tmp_path / "ref" / "checkpoints" / "step-00000007")

    cfg = tmp_path / "run.json"
    ref.to_json(cfg)
    out = tmp_path / "resumed"
    p = _cli(cfg, out)  # kill -9 once a checkpoint exists
    _wait_past(out, 0, p)
    p.kill()
    p.wait()
    p = _cli(cfg, out)  # resume, then SIGTERM (kill's, mlx.launch's; Ctrl-C's SIGINT has the same handler)
    _wait_past(out, _newest(out), p)
    p.send_signal(signal.SIGTERM)
    text, _ = p.communicate(timeout=120)
    assert p.returncode == 130, text
    assert "resuming from" in text and "interrupted at step" in text
    assert _newest(out) < 7, "the interrupted run had already finished: nothing was tested"
    p = _cli(cfg, out)  # resume to the end
    text, _ = p.communicate(timeout=300)
    assert p.returncode == 0, text
    assert "resuming from" in text
    final = _weights(out / "checkpoints" / "step-00000007")
    assert final.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(final[k], expected[k], err_msg=k)
    steps, epochs = train.read_log(out)
    assert [r["step"] for r in steps] == list(range(1, 8))  # records past the checkpoint were dropped
    assert [r["loss"] for r in steps] == [r["loss"] for r in h["steps"]]
    # each epoch's train_loss over all its steps, not those since the last resume
    assert [(r["step"], r["train_loss"]) for r in epochs] == [
        (r["step"], r["train_loss"]) for r in h["epochs"]
    ]
    assert len(checkpoint.checkpoints(out)) == ref.keep
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert json.loads((out / "run_config.json").read_text())["max_steps"] == 7


def test_nonfinite_steps_are_skipped_then_stop(corpus, tmp_path):
    class NanAfterEpoch0(Mixer):
        def sample(self, epoch, index):
            s = super().sample(epoch, index)
            if epoch >= 1:
                s.noisy = np.full_like(s.noisy, np.nan)
            return s

    cfg = DataConfig.from_json(corpus).replace(mix={"max_len_s": 0.3}, samples_per_epoch=8)
    data = (NanAfterEpoch0.from_config(cfg, "train"), Mixer.from_config(cfg, "valid"))
    run = _run(corpus, tmp_path / "nan", max_bad_steps=3, valid_items=2)
    t = train.Trainer(run, data)
    with pytest.raises(train.NonFiniteError, match="3 steps in a row had a non-finite loss"):
        t.fit()
    recs = t.history["steps"]
    assert [r["skipped"] for r in recs] == [False] * 4 + [True] * 3
    after_epoch0 = _weights(tmp_path / "nan" / "checkpoints" / "step-00000004")
    for k, v in tree_flatten(t.model.parameters()):  # skipped steps changed nothing
        np.testing.assert_array_equal(np.array(v), after_epoch0[k], err_msg=k)
    assert int(t.opt.state["step"]) == 4
    (epoch0,) = t.history["epochs"]  # validation ran after epoch 0 and made best/
    assert {"valid_loss", "valid_si_sdr", "valid_si_sdr_noisy"} <= set(epoch0)
    assert np.isfinite(epoch0["valid_loss"]) and (tmp_path / "nan" / "best" / "model.safetensors").exists()


def test_two_processes_match_one_process_with_the_whole_batch(corpus, tmp_path):
    # BatchNorm on running stats: batch statistics of half batches would differ by design
    run = _run(corpus, tmp_path / "one", max_steps=3, freeze_bn=True, epochs=1)  # dynamic loss and VAD on
    one = train.train(run)["steps"]
    cfg = tmp_path / "run.json"
    run.to_json(cfg)
    cmd = ["mlx.launch", "-n", "2", "--backend", "ring", PY, "-m", "dfn4lab.train"]
    cmd += ["--config", str(cfg), "--out", str(tmp_path / "two")]
    launch = shutil.which("mlx.launch", path=str(Path(PY).parent)) or "mlx.launch"
    r = subprocess.run([launch, *cmd[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("finished at step 3") == 1  # rank 0 alone reports and writes
    two, _ = train.read_log(tmp_path / "two")
    for key in ("loss", "grad_norm", "mrsl", "lsnr", "dyn_speech", "vad"):
        np.testing.assert_allclose([s[key] for s in two], [s[key] for s in one], rtol=1e-2, err_msg=key)
    assert [s["batch_size"] for s in two] == [2] * 3
    # a resume the checkpoint refuses ends every process with the error (none is left waiting)
    r = subprocess.run(
        [launch, *cmd[1:], "--seed", "7"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    # a rank exits 2 with the error (mlx.launch then stops the other, and itself exits 0)
    assert re.search(r"rank [01] exited with code 2", r.stdout + r.stderr), r.stdout + r.stderr
    assert "other settings (seed: 0 -> 7)" in r.stdout + r.stderr


def test_rank_views_split_each_global_batch():
    class Ids:
        report = None

        def __len__(self):
            return 10

        def sample(self, epoch, index):
            return index

    whole = RankView(Ids(), 4, seed=3)
    halves = [RankView(Ids(), 4, rank=r, world=2, seed=3) for r in range(2)]
    assert len(whole) == 8 and len(halves[0]) == 4
    for k in range(2):
        got = [halves[r].sample(1, k * 2 + i) for r in range(2) for i in range(2)]
        assert got == [whole.sample(1, k * 4 + i) for i in range(4)]
    assert sorted(whole.sample(1, i) for i in range(8)) != list(range(8))  # shuffled, from the seed
    assert [whole.sample(2, i) for i in range(8)] != [whole.sample(1, i) for i in range(8)]


def test_yaml_run_configs_read_numbers_as_people_write_them_and_refuse_bad_yaml(tmp_path, capsys):
    y = tmp_path / "run.yaml"
    y.write_text("optim: {lr: 1e-3, weight_decay: 5E-2, eps: 1.5e-8}\nepochs: 3\nskip: [df_dec]\n")
    r = RunConfig.load(y)  # PyYAML alone reads 1e-3 as a string: "OptimConfig.lr must be float"
    assert (r.optim.lr, r.optim.weight_decay, r.optim.eps, r.epochs) == (1e-3, 5e-2, 1.5e-8, 3)
    y.write_text("model: {backbone: {kind: attention}\n")
    assert train.main(["--config", str(y)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {y}: not valid YAML (") and err.count("\n") == 1
    assert train.main(["--config", str(tmp_path / "nosuch.yaml")]) == 2
    assert capsys.readouterr().err == f"error: no such config file: {tmp_path / 'nosuch.yaml'}\n"


def test_run_config_files_and_cli_overrides(tmp_path):
    run = RunConfig(model={"conv_ch": 16}, loss=LossConfig(mrsl_ffts=(512, 1024)), skip=("df_dec",))
    assert RunConfig.from_dict(json.loads(run.to_json())) == run
    y = tmp_path / "run.yaml"
    y.write_text("preset: dfn3\nbatch_size: 4\nloss:\n  dynamic: awesome\n  mrsl_ffts: [256, 512]\n")
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"preset": "dfn3", "epochs": 2, "optim": {"lr": 0.01}}))
    r = train.parse_args(
        ["--config", str(y), "--backbone", "mamba", "--epochs", "10", "--set", "loss.vad=0.5"]
    )
    assert (r.preset, r.batch_size, r.epochs, r.loss.dynamic, r.loss.vad) == ("dfn3", 4, 10, "awesome", 0.5)
    assert r.loss.mrsl_ffts == (256, 512) and r.model_config().backbone.kind == "mamba"
    r = train.parse_args(
        ["--config", str(j), "--batch-size", "8", "--dynamic-loss", "awesome", "--lr", "1e-4"]
    )
    assert (r.epochs, r.batch_size, r.loss.dynamic, r.optim.lr) == (2, 8, "awesome", 1e-4)
    r = train.parse_args(
        ["--batch-schedule", "0/4,2/8,5/16", "--set", "model.conv_ch=16", "--freeze", "^enc"]
    )
    assert [r.batch_size_at(e) for e in (0, 1, 2, 4, 5, 9)] == [4, 4, 8, 8, 16, 16]
    assert r.model_config().conv_ch == 16 and r.freeze == ("^enc",)


def test_damaged_newest_checkpoint_falls_back(tmp_path):
    from dfn4lab import inference

    model = inference.build(tiny_cfg())
    opt = train.make_optimizer(train.OptimConfig(), 10)
    opt.init(model.trainable_parameters())
    for step in (1, 2):
        meta = {"step": step, "position": [0, step]}
        checkpoint.save_checkpoint(tmp_path / "checkpoints" / f"step-{step:08d}", model, opt, meta)
    (tmp_path / "checkpoints" / "step-00000002" / "trainer.safetensors").write_bytes(b"garbage")
    said = []
    folder, _, _, meta = checkpoint.latest_checkpoint(tmp_path, said.append)
    assert folder.name == "step-00000001" and meta["step"] == 1
    assert "step-00000002" in said[0]
    stale = tmp_path / "checkpoints" / ".tmp-step-00000003-999999"  # a save killed halfway, long ago
    stale.mkdir()
    checkpoint.save_step(tmp_path, model, opt, {"step": 3, "position": [0, 3]}, keep=1)
    # the damaged one set aside (with keep=1 it was counted, and the new step-3 pruned instead of it)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "damaged-step-00000002",
        "step-00000003",
    ]
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(ckpts / "step-00000003", ckpts / "step-00000003 copy")
    (tmp_path / "checkpoints" / "step-00000009.zip").write_bytes(b"")  # strays a file manager leaves
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-00000003"]
    (tmp_path / ".tmp-best-999999").mkdir()  # the first best/ save, killed halfway
    checkpoint.save_checkpoint(tmp_path / "best", model, opt, {"step": 3, "position": [0, 3]})
    assert not (tmp_path / ".tmp-best-999999").exists()


def test_unreadable_checkpoints_stop_the_run_instead_of_starting_over(corpus, tmp_path):
    run = _run(corpus, tmp_path / "broken", max_steps=2, compile=False)
    train.Trainer(run).fit()
    log = (tmp_path / "broken" / "metrics.jsonl").read_text()
    for folder in checkpoint.checkpoints(tmp_path / "broken"):
        (folder / "trainer.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="none of the 1 checkpoints .* is readable"):
        train.Trainer(run)
    assert (tmp_path / "broken" / "metrics.jsonl").read_text() == log  # the run's log is kept


def test_a_save_killed_between_its_renames_resumes_from_the_folder_it_set_aside(corpus, tmp_path):
    out = tmp_path / "gap"
    run = _run(corpus, out, max_steps=4, compile=False, valid_items=2, keep=1)
    train.Trainer(run).fit()
    log = (out / "metrics.jsonl").read_text()
    dead = 999_999_999  # the killed process
    for folder in (out / "checkpoints" / "step-00000004", out / "best"):  # os._exit between the renames
        folder.rename(folder.with_name(f".{folder.name}.old.{dead}"))
        shutil.copytree(
            folder.with_name(f".{folder.name}.old.{dead}"), folder.with_name(f".tmp-{folder.name}-{dead}")
        )
    # a longer --max-steps without --epochs keeps the run's epochs: the checkpoint set aside counts
    flags = {k: v for k, v in json.loads(run.to_json()).items() if k not in ("epochs", "max_steps")}
    assert train.parse_args(["--config", json.dumps(flags), "--max-steps", "20"]).epochs == run.epochs
    t = train.Trainer(run)
    assert t.step == 4 and (out / "best" / "trainer.safetensors").is_file()  # not a fresh start
    assert t.fit()["step"] == 4 and (out / "metrics.jsonl").read_text() == log  # nor an emptied log


def test_a_checkpoint_of_an_older_dfn4lab_resumes_with_a_warning(corpus, tmp_path):
    out = tmp_path / "old"
    run = _run(corpus, out, max_steps=2, compile=False)
    train.Trainer(run).fit()
    folder = out / "checkpoints" / "step-00000002"
    arrays, md = mx.load(str(folder / "trainer.safetensors"), return_metadata=True)
    meta = {k: v for k, v in json.loads(md["meta"]).items() if k not in ("records", "data_digest")}
    mx.save_safetensors(str(folder / "trainer.safetensors"), arrays, metadata={"meta": json.dumps(meta)})
    with pytest.warns(UserWarning, match="saved by an older dfn4lab"):
        assert train.Trainer(run).step == 2


def test_resume_needs_the_same_settings_and_survives_a_cut_log_line(corpus, tmp_path):
    out = tmp_path / "resume"
    run = _run(corpus, out, max_steps=2, compile=False)
    train.Trainer(run).fit()
    saved = (out / "run_config.json").read_text()
    with pytest.raises(ValueError, match=r"other settings \(batch_size: 2 -> 4; seed: 0 -> 7\)"):
        train.Trainer(dataclasses.replace(run, batch_size=4, seed=7))
    with pytest.raises(ValueError, match=r"other settings \(compile: False -> True\)"):  # rounds otherwise
        train.Trainer(dataclasses.replace(run, compile=True))
    with pytest.raises(ValueError, match=r"other settings \(data: .*'samples_per_epoch': 8.* -> .*: 9"):
        train.Trainer(dataclasses.replace(run, data={**run.data, "samples_per_epoch": 9}))
    with pytest.raises(ValueError, match=f"another model config .*--config {out / 'run_config.json'}, else"):
        train.Trainer(dataclasses.replace(run, model={**run.model, "conv_ch": 16}))
    train.Trainer(dataclasses.replace(run, data={**run.data, "workers": 1, "prefetch": 1}))  # bookkeeping
    trainer = train.Trainer(run)
    trainer.bad = 2  # non-finite steps in a row, then a checkpoint: the count resumes with it
    trainer.checkpoint()
    assert train.Trainer(run).bad == 2
    assert (out / "run_config.json").read_text() == saved  # not overwritten by the refused run
    with open(out / "metrics.jsonl", "a") as f:  # killed while appending a record
        f.write('{"kind": "step", "step": 3, "lo')
    h = train.Trainer(dataclasses.replace(run, max_steps=4)).fit()  # a longer budget may change
    steps, _ = train.read_log(out)
    assert h["step"] == 4 and [r["step"] for r in steps] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "missing.json"], "no such config file: missing.json"),
        (["--config", "cut.json"], r"cut.json: not valid JSON"),
        (["--preset", "dfn5"], "unknown preset 'dfn5'"),
        (["--backbone", "lstm", "--max-steps", "0"], "backbone kind 'lstm': one of gru, mamba, attention"),
        (["--batch-size", "0"], r"batch_size >= 1 \(got 0\)"),
        (["--batch-schedule", "0-8"], "'0-8' is not EPOCH/SIZE"),
        (["--set", "optim.learning_rate=0.5"], "unknown OptimConfig field.* learning_rate"),
        (["--set", 'batch_size="2"'], "RunConfig.batch_size must be int, got '2'"),
        (["--set", "model.backbone.dstate=4", "--max-steps", "0"], "unknown BackboneConfig field.* dstate"),
        (["--lr", "-1"], r"optim needs lr > 0"),  # trained, the loss rising, before
        (["--lr", "nan"], r"optim needs lr > 0"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    (tmp_path / "cut.json").write_text('{"epochs": 2,')  # a config file cut short
    res = subprocess.run(
        [PY, "-m", "dfn4lab.train", "--out", str(tmp_path / "run"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and re.search(message, res.stderr), res.stderr


def test_time_budget_stops_training(corpus, tmp_path):
    run = _run(corpus, tmp_path / "budget", max_minutes=0.0, compile=False)
    h = train.Trainer(run).fit()
    assert (h["step"], h["stopped"]) == (
        0,
        "max_minutes",
    )  # a spent budget trains nothing (3 epochs otherwise)
    h = train.Trainer(dataclasses.replace(run, max_minutes=None, max_steps=3)).fit()
    assert (h["step"], h["stopped"]) == (3, "max_steps")
    assert train.Trainer(dataclasses.replace(run, max_minutes=None)).fit()["stopped"] == "done"


def test_validation_mixtures_are_the_data_configs_whatever_the_run_seed(corpus, tmp_path):
    (_, train0, valid0), (_, train1, valid1) = (
        train.load_data(_run(corpus, tmp_path / "r", valid_items=2, seed=s)) for s in (0, 1)
    )
    np.testing.assert_array_equal(valid0.sample(0, 0).noisy, valid1.sample(0, 0).noisy)  # one yardstick
    assert not np.array_equal(train0.sample(0, 0).noisy, train1.sample(0, 0).noisy)


def test_a_resume_on_changed_data_says_so(corpus, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(corpus.parent, copy)  # its lists are relative to themselves
    run = _run(copy / "data_config.json", tmp_path / "run", max_steps=2, compile=False)
    train.Trainer(run).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train.Trainer(dataclasses.replace(run, max_steps=3))  # the same data: not a word
    speech = train.load_data(run)[1].speech[0].path
    os.utime(speech, ns=(0, 0))  # rebuilt or edited
    with pytest.warns(UserWarning, match="training data changed since .*step-00000002 was saved"):
        train.Trainer(dataclasses.replace(run, max_steps=3))


def test_notebook_runs_match_sizes_and_resume_to_their_schedule(corpus, tmp_path):
    from dfn4lab.backbones import param_count
    from dfn4lab.inference import build

    runs = {k: train.demo_run(tmp_path / k, k, 4, 6, quick=True, data_config=str(corpus)) for k in BACKBONES}
    sizes = {k: param_count(build(r.model_config())) for k, r in runs.items()}
    assert all(abs(n / sizes["gru"] - 1) < 0.01 for n in sizes.values()), sizes  # backbones, not sizes
    assert {r.model_config().backbone.kind for r in runs.values()} == set(BACKBONES)
    longer = train.demo_run(tmp_path / "gru", "gru", 6, 6, quick=True, data_config=str(corpus))
    assert train._changed_settings(json.loads(runs["gru"].to_json()), longer) == []  # it resumes


def test_only_whole_epochs_compete_for_best(corpus, tmp_path):
    """A stop inside an epoch validates for the log; a resumed run keeps the best/ of one never stopped."""
    run = _run(corpus, tmp_path / "stopped", valid_items=2, epochs=2, compile=False, best_by="loss")
    train.Trainer(dataclasses.replace(run, max_steps=2)).fit()  # 4 steps an epoch
    _, epochs = train.read_log(run.out)
    assert [(r["step"], r["complete"]) for r in epochs] == [(2, False)] and "valid_loss" in epochs[0]
    assert not (tmp_path / "stopped" / "best").exists()
    train.Trainer(run).fit()
    whole = dataclasses.replace(run, out=str(tmp_path / "whole"))
    train.Trainer(whole).fit()
    (a, _, meta_a), (b, _, meta_b) = (checkpoint.read_checkpoint(Path(r.out) / "best") for r in (run, whole))
    assert meta_a["step"] == meta_b["step"] and meta_a["step"] in (4, 8)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_an_epoch_record_is_not_written_twice_after_a_checkpoint_at_its_last_batch(corpus, tmp_path):
    """Ctrl-C at an epoch's last batch checkpoints before the epoch record; the resumed run writes that
    record, and if it dies saving its own checkpoint, the next resume must not write it a second time."""
    out = tmp_path / "twice"
    run = _run(corpus, out, epochs=2, compile=False)
    train.Trainer(dataclasses.replace(run, max_steps=4)).fit()  # epoch 0 whole: its record at step 4
    folder = out / "checkpoints" / "step-00000004"
    arrays, md = mx.load(str(folder / "trainer.safetensors"), return_metadata=True)
    meta = json.loads(md["meta"])
    _, (rec,) = train.read_log(out)
    # as the Ctrl-C checkpoint at batch 4 of 4 holds it: the epoch not yet closed, its record not written
    meta.update(position=[0, 4], epoch_loss=[rec["train_loss"] * 4, 4], records=4)
    mx.save_safetensors(str(folder / "trainer.safetensors"), arrays, metadata={"meta": json.dumps(meta)})
    train.Trainer(run).fit()
    _, epochs = train.read_log(out)
    assert [(r["epoch"], r["step"]) for r in epochs] == [(0, 4), (1, 8)]
    assert epochs[0] == rec


def test_epochs_for_covers_the_steps_with_the_fewest_epochs(corpus, tmp_path):
    run = _run(corpus, tmp_path / "epochs")  # 8 samples per epoch: 4 batches of 2
    assert [train.epochs_for(run, s) for s in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    sched = dataclasses.replace(run, batch_schedule="0/2,1/4")  # 4 batches, then 2 per epoch
    assert [train.epochs_for(sched, s) for s in (4, 6, 7)] == [1, 2, 3]
    h = train.Trainer(dataclasses.replace(run, epochs=train.epochs_for(run, 6), compile=False)).fit()
    assert h["step"] == 8  # two whole epochs
    # --max-steps without --epochs: enough epochs to reach it (the default 10 ended a 1000-step run at 150)
    args = ["--data-config", str(corpus), "--set", 'data={"samples_per_epoch": 8}', "--batch-size", "2"]
    assert train.parse_args([*args, "--max-steps", "100"]).epochs == 25
    assert train.parse_args([*args, "--max-steps", "100", "--epochs", "3"]).epochs == 3  # as asked
    out = tmp_path / "longer"
    first = train.parse_args([*args, "--max-steps", "4", "--out", str(out)])
    out.mkdir()
    first.to_json(out / "run_config.json")  # as a run killed before its first checkpoint leaves it
    assert train.parse_args([*args, "--max-steps", "100", "--out", str(out)]).epochs == 25  # a new run
    (out / "checkpoints" / "step-00000004").mkdir(parents=True)  # a started run
    resumed = train.parse_args([*args, "--max-steps", "100", "--out", str(out)])
    assert (first.epochs, resumed.epochs) == (1, 1)  # a longer budget resumes: the saved schedule
    # a short run's schedule spans it (10 epochs, 40 steps, before: stopped at step 4 with the lr barely down)
    y = tmp_path / "short.yaml"
    y.write_text("max_steps: 6\n")
    assert train.parse_args([*args, "--config", str(y)]).epochs == 2
    y.write_text("max_steps: 6\nepochs: 5\n")
    assert train.parse_args([*args, "--config", str(y)]).epochs == 5  # as the file asks
    with pytest.warns(UserWarning, match=r"max_steps 100 is beyond the 12 steps of 3 epochs.*epochs to 25"):
        train.Trainer(dataclasses.replace(run, out=str(tmp_path / "capped"), max_steps=100, compile=False))


def test_bfloat16_step_is_finite_and_keeps_float32_weights(corpus, tmp_path):
    run = _run(corpus, tmp_path / "bf16", max_steps=2, precision="bfloat16", compile=False)
    t = train.Trainer(run)
    h = t.fit()
    assert all(np.isfinite(r["loss"]) and not r["skipped"] for r in h["steps"])
    assert {v.dtype for _, v in tree_flatten(t.model.parameters())} == {mx.float32}


def test_bfloat16_keeps_frozen_weights_and_float32_batchnorm_statistics(corpus, tmp_path):
    """Frozen tensors come back bit for bit; BatchNorm's running statistics update in float32, as in a
    float32 run but for the batch statistics' rounding (bfloat16 statistics round to 2**-8)."""
    frozen = "enc.erb_conv0."
    runs = {
        p: _run(corpus, tmp_path / p, max_steps=1, precision=p, compile=False, freeze=(f"^{frozen}",))
        for p in ("float32", "bfloat16")
    }
    trainers = {p: train.Trainer(r) for p, r in runs.items()}
    before = {k: np.array(v) for k, v in tree_flatten(trainers["bfloat16"].model.parameters())}
    after = {}
    for p, t in trainers.items():
        t.fit()
        after[p] = {k: np.array(v) for k, v in tree_flatten(t.model.parameters())}
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and any(k.startswith(frozen) and "weight" in k for k in before)
    for k in before:
        if k.startswith(frozen) and k not in stats:
            np.testing.assert_array_equal(after["bfloat16"][k], before[k], err_msg=k)
    for k in stats:
        moved = np.abs(after["float32"][k] - before[k]).max()
        assert moved > 0, k
        diff = np.abs(after["bfloat16"][k] - after["float32"][k]) / np.maximum(
            1.0, np.abs(after["float32"][k])
        )
        assert diff.max() < 1e-3, k


def test_lr_schedule_reaches_min_lr_at_the_last_step():
    opt = train.make_optimizer(train.OptimConfig(lr=1e-3, min_lr=1e-6, warmup_steps=4, warmup_start=0.1), 10)
    lr = opt._schedulers["learning_rate"]
    assert float(lr(mx.array(0))) == pytest.approx(1e-4) and float(lr(mx.array(4))) == pytest.approx(1e-3)
    assert float(lr(mx.array(9))) == pytest.approx(1e-6)


def test_a_run_validates_on_a_datastore(corpus, tmp_path):
    """README's "Your own data" built a datastore no command could use, before."""
    from dfn4lab.data import datastore
    from dfn4lab.data.config import DataConfig

    cfg = DataConfig.from_json(corpus).replace(mix={"max_len_s": 0.3})
    datastore.build(tmp_path / "store", Mixer.from_config(cfg, "valid"), samples=3)
    args = ["--config", json.dumps(dataclasses.asdict(_run(corpus, tmp_path / "run")))]
    run = train.parse_args([*args, "--valid-store", str(tmp_path / "store"), "--valid-items", "2"])
    t = train.Trainer(run)
    assert isinstance(t.valid_src, datastore.Datastore)
    stored = datastore.Datastore(tmp_path / "store").sample(0, 1)
    rec = t.validate()
    assert np.isfinite(rec["loss"])
    np.testing.assert_array_equal(
        np.array(t._valid_items[0]["feat_erb"][1]), stored.feat_erb
    )  # the stored mixtures
    other = _run(
        corpus,
        tmp_path / "run16",
        valid_store=str(tmp_path / "store"),
        valid_items=2,
        model={**TINY, "dsp": {"nb_df": 64}},
    )
    with pytest.raises(ValueError, match="another DSP config"):
        train.Trainer(other)


def test_validation_loss_weighs_items_not_batches(corpus, tmp_path):
    from dfn4lab import validation

    run = _run(corpus, tmp_path / "valid", valid_items=3)
    t = train.Trainer(run)
    t.model.eval()
    dsp = t.model.cfg.dsp
    loss = [
        validation.validate(t.model, validation.validation_items(t.valid_src, 3, b, dsp), run.loss, 1.0)[
            "loss"
        ]
        for b in (1, 2, 3)
    ]
    assert loss[1] == pytest.approx(loss[0], rel=1e-4) and loss[2] == pytest.approx(loss[0], rel=1e-4)


@pytest.mark.skipif(not data.speech_files(), reason="needs real speech (alsa-utils or the demo corpus)")
def test_finetune_from_dfn3_keeps_si_sdr_and_honours_freeze_and_skip(tmp_path):
    from dfn4lab import inference

    run = RunConfig.from_dict(
        {
            "out": str(tmp_path / "ft"),
            "preset": "dfn3",
            "init_from": "dfn3",
            "freeze": [r"^enc\.erb_conv0\."],
            "skip": [r"^df_dec\.df_fc_a\."],
            "batch_size": 2,
            "max_steps": 2,
            "compile": False,
            "progress": False,
            "deterministic": True,
            "valid_items": 4,
            "valid_batch": 4,
            "optim": {"lr": 1e-5, "warmup_steps": 1, "warmup_start": 1.0},
        }
    )
    t = train.Trainer(run, (SpeechInPink(4), SpeechInPink(4)))
    official = dict(tree_flatten(inference.load_pretrained("dfn3").parameters()))
    ours = dict(tree_flatten(t.model.parameters()))
    assert not np.array_equal(
        np.array(ours["df_dec.df_fc_a.weight"]), np.array(official["df_dec.df_fc_a.weight"])
    )
    np.testing.assert_array_equal(
        np.array(ours["erb_dec.convt1.weight"]), np.array(official["erb_dec.convt1.weight"])
    )
    frozen = np.array(ours["enc.erb_conv0.weight"])
    before = t.validate()
    t.fit()
    after = t.history["epochs"][-1]
    np.testing.assert_array_equal(
        np.array(dict(tree_flatten(t.model.parameters()))["enc.erb_conv0.weight"]), frozen
    )
    assert before["si_sdr"] > before["si_sdr_noisy"] + 3  # the pretrained model works ...
    assert abs(after["valid_si_sdr"] - before["si_sdr"]) < 0.5  # ... and lr 1e-5 keeps it working


def test_train_board_redraws_one_figure(tmp_path):
    from dfn4lab import viz

    board = viz.TrainBoard(every=5, smooth=3)
    for s in range(1, 21):
        board.update({"kind": "step", "step": s, "loss": 10.0 / s, "skipped": s == 7})
        if s % 10 == 0:
            v = {"valid_loss": 5.0 / s, "valid_si_sdr": s / 2, "valid_si_sdr_noisy": 2.0}
            board.update({"kind": "epoch", "step": s, **v, "valid_stoi": 0.8, "valid_stoi_noisy": 0.7})
    loss_ax, sdr_ax, stoi_ax = board.axes
    train_raw, train_smooth, valid = loss_ax.lines
    assert len(train_raw.get_xdata()) == 19 and len(valid.get_xdata()) == 2  # the skipped step is left out
    np.testing.assert_allclose(sdr_ax.lines[0].get_ydata(), [5.0, 10.0])
    assert len(stoi_ax.lines) == 2 and board.figure is loss_ax.figure

    # a board started from a run folder's log draws the same curves
    records = sorted(board.steps + board.epochs, key=lambda r: (r["step"], r["kind"] == "epoch"))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = viz.TrainBoard(every=5, smooth=3).load(tmp_path)
    for a, b in zip(loaded.axes, board.axes, strict=True):
        for la, lb in zip(a.lines, b.lines, strict=True):
            np.testing.assert_allclose(la.get_ydata(), lb.get_ydata())
    assert viz.TrainBoard().load(tmp_path / "nothing-yet").steps == []


def test_steps_on_one_batch_fit_it(corpus, tmp_path):
    """The optimizer goes downhill: 30 steps on one fixed batch at least halve its loss. Every other test
    here compares runs with each other, which a step in the wrong direction passes too."""
    run = _run(corpus, tmp_path / "fit", epochs=10, compile=False, optim={"lr": 3e-3, "warmup_steps": 1})
    trainer = train.Trainer(run)
    batch = next(iter(trainer._loader()))
    fit = [trainer.train_step(batch)["loss"] for _ in range(30)]
    assert fit[-1] < 0.5 * fit[0], fit


def test_a_second_run_on_a_folder_in_use_is_refused(corpus, tmp_path):
    """Two processes on one out folder interleaved the log and pruned each other's checkpoints."""
    import fcntl

    run = _run(corpus, tmp_path / "busy", max_steps=2, compile=False)
    (tmp_path / "busy").mkdir()
    with open(tmp_path / "busy" / ".lock", "a+") as held:  # what a running Trainer holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        with pytest.raises(ValueError, match=r"in use by another training process \(pid 4242\)"):
            train.Trainer(run).fit()
        assert not (tmp_path / "busy" / "metrics.jsonl").exists()
    assert train.Trainer(run).fit()["step"] == 2  # free again


def test_a_stop_at_the_last_step_still_validates_its_epoch(corpus, tmp_path, monkeypatch):
    """SIGINT/SIGTERM arriving at max_steps: the epoch record and validation are written, not lost
    (the resumed run found nothing to do and never wrote them)."""
    run = _run(corpus, tmp_path / "last", max_steps=4, compile=False, valid_items=2)
    monkeypatch.setattr(train.Trainer, "_interrupted", lambda self, stop: self.step >= 4)  # the signal, there
    train.Trainer(run).fit()
    _, epochs = train.read_log(tmp_path / "last")
    assert [(r["step"], r["complete"]) for r in epochs] == [(4, True)] and "valid_si_sdr" in epochs[0]
