"""Training: AdamW with warm-up and cosine decay, a compiled step, checkpoints that resume exactly,
validation each epoch, fine-tuning from DFN3, and data-parallel scale-out over ``mx.distributed``.

    python -m dfn4lab.train --preset dfn4-lite --max-steps 3 --out runs/quick      # demo corpus
    python -m dfn4lab.train --config run.json --backbone mamba --epochs 10 --batch-size 8 \\
        --dynamic-loss awesome --set loss.dyn_warmup=500 --set data.mix.max_len_s=2.0
    python -m dfn4lab.train --preset dfn3 --init-from dfn3 --lr 1e-5 --freeze '^enc[.]' --out runs/ft
    mlx.launch -n 2 --backend ring .venv/bin/python -m dfn4lab.train --config run.json   # 2 processes

In a notebook: ``train.train(run, callback=viz.TrainBoard().update)`` redraws one live figure.

A run folder holds ``run_config.json`` (the resolved config), ``metrics.jsonl`` (one record per step
and per epoch), ``checkpoints/step-NNNNNNNN/`` (the newest ``keep``) and ``best/`` (``dfn4lab.checkpoint``
says what they hold); a run restarted with the same ``out`` resumes from the newest checkpoint. Each
epoch ends with ``dfn4lab.validation`` on a fixed set of the valid split.

Determinism: every batch is a function of (seed, epoch, sample index); the VAD switch and MLX's RNG
(reseeded before every step) of (seed, step); model and optimizer state are restored bit for bit. So a
resumed run ends with the same weights as an uninterrupted one.

Scale-out: ``mx.distributed.init()`` joins whatever ``mlx.launch`` started (ring over TCP, MPI where
installed). Each of N processes takes 1/N of every batch; gradients, losses and BatchNorm statistics
are averaged with ``all_sum``; only rank 0 validates and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from dfn4lab import inference, losses, paths
from dfn4lab.checkpoint import (
    checkpoints,
    latest_checkpoint,
    recover_saves,
    restore,
    save_checkpoint,
    save_step,
    started,
)
from dfn4lab.cli import command
from dfn4lab.config import BACKBONES, JsonConfig, ModelConfig, from_dict, preset, read_json
from dfn4lab.losses import LossConfig
from dfn4lab.model import DfNet
from dfn4lab.validation import validate, validation_items

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

# --- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay (DFN3: lr 1e-3 down to 1e-6, gradient norm clipped to 1)."""

    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 200
    warmup_start: float = 0.1  # warm-up starts at this fraction of lr (DFN3: 1e-4 for 1e-3)
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        ok = {
            "lr > 0": self.lr > 0,
            "0 <= min_lr <= lr": 0 <= self.min_lr <= self.lr,
            "warmup_steps >= 0": self.warmup_steps >= 0,
            "0 < warmup_start <= 1": 0 < self.warmup_start <= 1,
            "weight_decay >= 0": self.weight_decay >= 0,
            "betas in [0, 1)": all(0 <= b < 1 for b in self.betas),
            "eps > 0": self.eps > 0,
            "clip_norm > 0": self.clip_norm > 0,
        }  # NaN fails every comparison
        bad = [k for k, v in ok.items() if not v]
        if bad:
            raise ValueError(f"optim needs {', '.join(bad)} (got {self})")


@dataclass(frozen=True)
class RunConfig(JsonConfig):
    """One training run: model preset and overrides, data, losses, optimizer, schedule, checkpoints."""

    out: str = "runs/default"
    preset: str = "dfn4-lite"
    model: dict[str, Any] = field(default_factory=dict)  # overrides on the preset (ModelConfig fields)
    data_config: str | None = None  # a data_config.json; None: the demo corpus (data/demo)
    data: dict[str, Any] = field(default_factory=dict)  # overrides on the data config
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 10
    max_steps: int | None = None  # stop early; the lr schedule still spans `epochs`
    max_minutes: float | None = None  # stop (validate, checkpoint) after this much time in one call
    batch_size: int = 8  # global: split over processes
    batch_schedule: str = ""  # DFN3 style "epoch/size,...", e.g. "0/8,2/16": overrides batch_size
    seed: int = 0
    deterministic: bool = False  # CPU kernels and in-process data (results never depend on timing)
    precision: str = "float32"  # float32 | bfloat16 (the network runs in bfloat16, weights stay float32)
    compile: bool = True
    max_bad_steps: int = 10  # stop after this many non-finite steps in a row
    ckpt_every: int = 500  # batches
    keep: int = 3  # newest checkpoints kept (best/ is kept apart)
    valid_items: int = 32  # fixed validation set: the first items of the valid split (0: no validation)
    # a datastore folder (python -m dfn4lab.data.datastore build) to validate on: its first valid_items,
    # the same mixtures for every run that names it; None: mix them from the valid split
    valid_store: str | None = None
    # SNRs of the validation mixtures (None: the data config's); near-clean items (20, 40 dB) would
    # dominate a mean SI-SDR and hide what enhancement does where it matters
    valid_snrs: tuple[float, ...] | None = (-5.0, 0.0, 5.0, 10.0)
    valid_batch: int = 8
    # si_sdr | stoi (higher is better) | loss (lower; with the dynamic loss it grows with its ramp)
    best_by: str = "si_sdr"
    # "dfn3" or a model/checkpoint folder: copy weights where names and shapes match
    init_from: str | None = None
    skip: tuple[str, ...] = ()  # regexes of parameter names not to initialise
    freeze: tuple[str, ...] = ()  # regexes of parameter names not to train
    freeze_bn: bool | None = None  # BatchNorm on running stats in training; None: when init_from is set
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        """Values no run can use raise one ValueError here, whether from flags, ``--set`` or a file."""
        at_least = dict(epochs=1, batch_size=1, ckpt_every=1, keep=1, valid_batch=1, max_bad_steps=1)
        at_least |= dict(max_steps=0, valid_items=0)  # max_steps None: no limit
        bad = [
            f"{k} >= {lo} (got {v})"
            for k, lo in at_least.items()
            if (v := getattr(self, k)) is not None and v < lo
        ]
        if self.max_minutes is not None and not self.max_minutes >= 0:
            bad.append(f"max_minutes >= 0 (got {self.max_minutes})")
        if bad:
            raise ValueError(f"run config needs {', '.join(bad)}")
        if self.best_by not in ("si_sdr", "stoi", "loss"):
            raise ValueError(f"best_by must be si_sdr, stoi or loss, got {self.best_by!r}")
        if self.precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be float32 or bfloat16, got {self.precision!r}")
        self._schedule()  # a malformed batch_schedule fails now, not at its epoch

    def _schedule(self) -> list[tuple[int, int]]:
        """``batch_schedule`` as (first epoch, batch size) pairs."""
        pairs = []
        for part in filter(None, self.batch_schedule.split(",")):
            try:
                e, b = (int(v) for v in part.split("/"))
            except ValueError:
                raise ValueError(f"batch_schedule: {part!r} is not EPOCH/SIZE (e.g. 0/8,2/16)") from None
            if e < 0 or b < 1:
                raise ValueError(f"batch_schedule: {part!r} needs an epoch >= 0 and a size >= 1")
            pairs.append((e, b))
        return pairs

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return from_dict(cls, d)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """From a JSON or YAML file (see :func:`read_run_file`)."""
        return cls.from_dict(read_run_file(path))

    def model_config(self) -> ModelConfig:
        """The preset with the overrides (JSON-normalised, so it compares equal to a saved config)."""
        return ModelConfig.from_json(preset(self.preset, **self.model).to_json())

    def batch_size_at(self, epoch: int) -> int:
        size = self.batch_size
        for e, b in self._schedule():
            size = b if epoch >= e else size
        return size


def set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_path(d, "loss.dyn_warmup", 500)``: assign into nested dicts, creating them (a non-dict on
    the way, such as ``"backbone": "gru"``, is replaced)."""
    *parents, last = dotted.split(".")
    for p in parents:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[last] = value


# --- data ------------------------------------------------------------------------------------------


class RankView:
    """This process's share of every global batch, in an order shuffled per epoch from (seed, epoch).

    A ``Source`` for ``dfn4lab.data.loader.Loader(shuffle=False, batch_size=global_batch // world)``:
    its local batch k is part ``rank`` of global batch k, so N processes together see exactly the
    batches one process sees with the whole batch, and the loader's position (epoch, batch) is the
    same on every rank. ``len()`` drops the last partial global batch. BatchNorm in training mode is
    not synchronised: each process normalises over its own share (the steps equal one process's only
    with ``freeze_bn``, as fine-tuning sets it).
    """

    def __init__(self, source: Any, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0):
        if global_batch % world:
            raise ValueError(f"batch size {global_batch} does not divide by the {world} processes")
        self.source, self.global_batch, self.seed = source, global_batch, seed
        self.rank, self.world = rank, world
        self._orders: dict[int, np.ndarray] = {}

    @property
    def report(self):
        return self.source.report

    def __len__(self) -> int:
        return len(self.source) // self.global_batch * (self.global_batch // self.world)

    def sample(self, epoch: int, index: int) -> Any:
        if epoch not in self._orders:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch], spawn_key=(2,)))
            self._orders = {epoch: rng.permutation(len(self.source))}
        local = self.global_batch // self.world
        k, i = divmod(index, local)
        return self.source.sample(
            epoch, int(self._orders[epoch][k * self.global_batch + self.rank * local + i])
        )


def read_run_file(path: str | Path) -> dict[str, Any]:
    """A run config file's settings: JSON (or JSON text) or YAML, where ``1e-3`` is a number too, as
    YAML 1.2 reads it; a YAML error is one ValueError naming the file."""
    p = Path(path)
    if p.suffix not in (".yaml", ".yml"):
        return read_json(path)
    import yaml

    class Loader(yaml.SafeLoader):  # PyYAML reads YAML 1.1, where 1e-3 (no dot) is a string
        pass

    exponent = re.compile(r"^[-+]?(?:[0-9][0-9_]*)?\.?[0-9_]*[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789."))
    if not p.is_file():
        raise FileNotFoundError(f"no such config file: {p}")
    try:
        return yaml.load(p.read_text(), Loader=Loader) or {}  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None


def load_data(run: RunConfig):
    """(data config, train source, valid source or None) of the run; builds the demo corpus if missing."""
    from dfn4lab.data.config import DataConfig
    from dfn4lab.data.mixing import Mixer

    path = run.data_config
    if path is None:
        from dfn4lab.data import demo

        if not demo.is_built(paths.DEMO):
            print(f"building the demo corpus in {paths.DEMO} (once)", flush=True)
            demo.build(paths.DEMO)
        path = paths.DEMO / "data_config.json"
    # the run's seed draws its training mixtures; the validation set stays the data config's, so runs of
    # other seeds are scored on the same mixtures
    data_cfg = DataConfig.from_json(path).replace(**run.data)
    cfg = data_cfg.replace(seed=run.seed)
    valid = None
    if run.valid_items > 0 and run.valid_store:
        from dfn4lab.data.datastore import Datastore

        valid = Datastore(run.valid_store)
        if valid.dsp_cfg != run.model_config().dsp:  # its features would not be this model's inputs
            raise ValueError(
                f"valid_store {run.valid_store} was built with another DSP config than the model's"
            )
    elif run.valid_items > 0 and cfg.list_path("valid", "speech"):
        valid = Mixer.from_config(
            data_cfg.replace(mix={"snrs": run.valid_snrs}) if run.valid_snrs else data_cfg, "valid"
        )
    return cfg, Mixer.from_config(cfg, "train"), valid


# --- model -----------------------------------------------------------------------------------------


def init_weights(model: DfNet, source: str, skip: Sequence[str] = ()) -> dict[str, list[str]]:
    """Copy weights from ``source`` ("dfn3" or a model folder) where names and shapes match and no
    ``skip`` regex matches. Returns the parameter names by outcome: ``loaded``, ``mismatched`` (shape),
    ``missing`` (not in the source) and ``skipped``."""
    src = inference.load_pretrained(source) if source in inference.PRETRAINED else inference.load(source)
    theirs = dict(tree_flatten(src.parameters()))
    out: dict[str, list[str]] = {"loaded": [], "mismatched": [], "skipped": [], "missing": []}
    new = []
    for k, v in tree_flatten(model.parameters()):
        if any(re.search(p, k) for p in skip):
            out["skipped"].append(k)
        elif k not in theirs:
            out["missing"].append(k)
        elif theirs[k].shape != v.shape:
            out["mismatched"].append(k)
        else:
            out["loaded"].append(k)
            new.append((k, theirs[k]))
    model.load_weights(new, strict=False)
    return out


def freeze(model: DfNet, patterns: Sequence[str]) -> list[str]:
    """Freeze the parameters whose full name matches a regex; returns their names."""
    frozen = []
    for prefix, module in model.named_modules():
        local = [k for k, v in module.items() if isinstance(v, mx.array) and not k.startswith("_")]
        names = [k for k in local if any(re.search(p, f"{prefix}.{k}" if prefix else k) for p in patterns)]
        if names:
            module.freeze(keys=names, recurse=False)
            frozen += [f"{prefix}.{k}" if prefix else k for k in names]
    return frozen


def set_mode(model: DfNet, training: bool, freeze_bn: bool) -> None:
    """Training or eval mode; with ``freeze_bn`` BatchNorm keeps using its running statistics, which a
    model converted with folded BatchNorm (the official DFN3) needs to keep its behaviour."""
    model.train(training)
    if training and freeze_bn:
        for _, m in model.named_modules():
            if isinstance(m, nn.BatchNorm):
                m.eval()


def build(run: RunConfig, log: Callable[[str], None] = print, initialise: bool = True) -> DfNet:
    """The run's model: preset + overrides, optional initialisation (``run.init_from``, unless
    ``initialise`` is False: a resumed run's checkpoint holds every weight) and freezing."""
    model = inference.build(run.model_config())
    if run.init_from and initialise:
        r = init_weights(model, run.init_from, run.skip)
        total = sum(len(v) for v in r.values())
        log(
            f"initialised {len(r['loaded'])}/{total} tensors from {run.init_from} "
            f"({len(r['mismatched'])} shape mismatches, {len(r['missing'])} absent, "
            f"{len(r['skipped'])} skipped)"
        )
    if run.freeze:
        log(f"frozen {len(freeze(model, run.freeze))} tensors matching {list(run.freeze)}")
    return model


# --- optimizer and step ----------------------------------------------------------------------------


def total_steps(run: RunConfig, epoch_size: int) -> int:
    """Steps of the whole schedule: every epoch's batches at its batch size."""
    return sum(epoch_size // run.batch_size_at(e) for e in range(run.epochs))


def epochs_for(run: RunConfig, steps: int) -> int:
    """The fewest epochs of the run's training data that hold ``steps`` batches: with ``epochs`` set so,
    ``max_steps`` ends the run and the lr schedule spans about that many steps."""
    size, epochs, total = len(load_data(run)[1]), 0, 0
    while total < steps:
        n = size // run.batch_size_at(epochs)
        if n == 0:
            raise ValueError(f"{size} training samples per epoch are fewer than the batch size")
        epochs, total = epochs + 1, total + n
    return max(1, epochs)


def demo_run(
    out: str | Path,
    backbone: str,
    max_steps: int,
    schedule_steps: int,
    quick: bool = False,
    data_config: str | None = None,
) -> RunConfig:
    """Notebook 04's recipe on the demo corpus: the ``dfn4-lite`` preset with ``backbone`` at the GRU
    model's parameter count (``inference.matched_config``: runs compare backbones, not sizes), 1 s mixtures,
    batch 8, validation on 32 mixtures, a checkpoint every third of the run; the lr warms up over a tenth
    of ``schedule_steps`` and its schedule spans the epochs that hold them, so the same run may be
    resumed up to there. ``quick``: batch 2, 4 validation mixtures, not compiled (a smoke test).
    ``data_config``: another corpus than the demo one."""
    from dfn4lab.backbones import param_count
    from dfn4lab.inference import build, matched_config

    gru = preset("dfn4-lite", backbone="gru")
    m = matched_config(backbone, param_count(build(gru)), gru) if backbone != "gru" else gru
    batch, data = 2 if quick else 8, {"mix": {"max_len_s": 1.0}}
    return RunConfig(
        out=str(out),
        preset="dfn4-lite",
        model={
            "backbone": dataclasses.asdict(m.backbone),
            "emb_hidden_dim": m.emb_hidden_dim,
            "df_hidden_dim": m.df_hidden_dim,
        },
        max_steps=max_steps,
        data_config=data_config,
        epochs=epochs_for(RunConfig(batch_size=batch, data=data, data_config=data_config), schedule_steps),
        batch_size=batch,
        data=data,
        valid_items=4 if quick else 32,
        ckpt_every=max(2, max_steps // 3),
        optim=OptimConfig(warmup_steps=max(1, schedule_steps // 10)),
        progress=False,
        compile=not quick,  # compiling pays off in long runs
    )


def make_optimizer(oc: OptimConfig, steps: int) -> optim.AdamW:
    """AdamW; lr rises linearly from ``warmup_start * lr``, then a cosine brings it to ``min_lr``."""
    warm = max(1, min(oc.warmup_steps, steps - 1)) if steps > 1 else 1
    lr = optim.join_schedules(
        [
            optim.linear_schedule(oc.lr * oc.warmup_start, oc.lr, warm),
            optim.cosine_decay(oc.lr, max(1, steps - 1 - warm), oc.min_lr),  # min_lr at the last step
        ],
        [warm],
    )
    return optim.AdamW(learning_rate=lr, betas=list(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay)


def _running_stat(key: str) -> bool:
    """Whether a flattened parameter key is a BatchNorm running statistic (updated by the forward)."""
    return key.rsplit(".", 1)[-1] in ("running_mean", "running_var")


def _assign(tree: Any, key: str, value: mx.array) -> None:
    """Set ``tree[a][b][0]...`` for a flattened key "a.b.0" in place (lists by index)."""
    *path, last = key.split(".")
    for p in path:
        tree = tree[int(p)] if isinstance(tree, list) else tree[p]
    if isinstance(tree, list):
        tree[int(last)] = value
    else:
        tree[last] = value


def make_step(model: DfNet, opt: optim.Optimizer, run: RunConfig, group: mx.distributed.Group | None):
    """The training step ``step(noisy, clean, feat_erb, feat_spec, ctl) -> (loss, parts, grad_norm, ok)``.

    Compiled over the model and optimizer state (BatchNorm running stats included). A step with a
    non-finite loss or gradient norm leaves every state unchanged (``ok`` False).
    """
    cfg = model.cfg
    lsnr_range = (cfg.lsnr_min, cfg.lsnr_max)
    world = group.size() if group is not None else 1
    low = mx.bfloat16 if run.precision == "bfloat16" else None

    def forward(noisy, feat_erb, feat_spec):
        if low is None:
            return model(noisy, feat_erb, feat_spec)
        # weights (trained and frozen) run in bfloat16; BatchNorm's running statistics stay float32, so
        # their small updates are not rounded away
        full = tree_flatten(model.parameters())
        model.update(tree_unflatten([(k, v if _running_stat(k) else v.astype(low)) for k, v in full]))
        out = model(noisy.astype(low), feat_erb.astype(low), feat_spec.astype(low))
        now = dict(tree_flatten(model.parameters()))  # the float32 weights back, the updated statistics kept
        model.update(tree_unflatten([(k, now[k] if _running_stat(k) else v) for k, v in full]))
        return tuple(o.astype(mx.float32) for o in out)

    def loss_fn(noisy, clean, feat_erb, feat_spec, ctl):
        out = forward(noisy, feat_erb, feat_spec)
        return losses.compute(run.loss, cfg.dsp, lsnr_range, out, noisy, clean, ctl)

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def step(noisy, clean, feat_erb, feat_spec, ctl):
        old_model = tree_flatten(model.parameters())
        old_opt = tree_flatten(opt.state)
        (loss, parts), grads = loss_and_grad(noisy, clean, feat_erb, feat_spec, ctl)
        if world > 1:
            grads = nn.average_gradients(grads, group)
            keys = sorted(parts)
            v = mx.distributed.all_sum(mx.stack([loss] + [parts[k] for k in keys]), group=group) / world
            loss, parts = v[0], {k: v[i + 1] for i, k in enumerate(keys)}
        grads, norm = optim.clip_grad_norm(grads, run.optim.clip_norm)
        ok = mx.isfinite(loss) & mx.isfinite(norm)
        opt.update(model, grads)
        after = dict(tree_flatten(model.parameters()))
        if world > 1:  # BatchNorm statistics (and frozen tensors, equal anyway): averaged over processes
            trainable = dict(tree_flatten(model.trainable_parameters()))
            rest = [(k, v) for k, v in after.items() if k not in trainable]
            after.update(tree_flatten(nn.average_gradients(tree_unflatten(rest), group)))
        model.update(tree_unflatten([(k, mx.where(ok, after[k], old)) for k, old in old_model]))
        cur_opt = dict(tree_flatten(opt.state))
        for k, old in old_opt:
            _assign(opt.state, k, mx.where(ok, cur_opt[k], old))
        return loss, parts, norm, ok

    if not run.compile:
        return step
    state = [model.state, opt.state, mx.random.state]
    return partial(mx.compile, inputs=state, outputs=state)(step)


# --- scale-out -------------------------------------------------------------------------------------


def _broadcast(tree: Any, group: mx.distributed.Group) -> Any:
    """Rank 0's values of every array of ``tree`` on every rank."""
    rank = group.rank()
    return tree_unflatten(
        [
            (k, mx.distributed.all_sum(v if rank == 0 else mx.zeros_like(v), group=group))
            for k, v in tree_flatten(tree)
        ]
    )


# --- the loop --------------------------------------------------------------------------------------


class NonFiniteError(RuntimeError):
    """Too many training steps in a row had a non-finite loss or gradient."""


class _Interrupt:
    """SIGINT or SIGTERM (what ``kill`` and ``mlx.launch`` send) sets a flag the loop checks after each
    step: a checkpoint, then a clean stop. A second one interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.hit = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        try:
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._old = {}
        return self

    def _handle(self, *_: Any) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *_: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


class Trainer:
    """One run: set up (or resume) in ``__init__``, train with ``fit``. Attributes hold the live state:
    ``model``, ``opt``, ``step``, ``epoch`` and ``batch`` (the data position: next batch of the epoch)."""

    def __init__(
        self,
        run: RunConfig,
        data: tuple[Any, Any | None] | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ):
        from dfn4lab.data.config import DataConfig

        self.group = mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        self.lead = self.rank == 0
        if run.deterministic:  # CPU kernels and in-process data: nothing depends on timing
            mx.set_default_device(mx.cpu)
            run = dataclasses.replace(run, data={**run.data, "workers": 0})
        for e in range(run.epochs):
            if run.batch_size_at(e) % self.world:
                raise ValueError(
                    f"batch size {run.batch_size_at(e)} (epoch {e}) does not divide by {self.world} processes"
                )
        self.run, self.out, self.callback = run, Path(run.out), callback
        if data is None:
            self.data_cfg, self.train_src, self.valid_src = load_data(run)
        else:
            self.data_cfg, (self.train_src, self.valid_src) = DataConfig().replace(**run.data), data
        mx.random.seed(run.seed)
        for folder in recover_saves(self.out) if self.lead else []:  # one process renames
            self.log(f"put back {folder}: a save was killed while replacing it")
        resuming = bool(checkpoints(self.out))  # its weights come from the checkpoint, not init_from
        self.model = build(run, self.log, initialise=not resuming)
        self.freeze_bn = run.freeze_bn if run.freeze_bn is not None else run.init_from is not None
        steps = total_steps(run, len(self.train_src))
        if run.max_steps is not None and run.max_steps > steps:
            warnings.warn(
                f"max_steps {run.max_steps} is beyond the {steps} steps of {run.epochs} epochs: the run ends "
                f"at step {steps} (set epochs to {epochs_for(run, run.max_steps)})",
                stacklevel=2,
            )
        self.opt = make_optimizer(run.optim, steps)
        self.opt.init(self.model.trainable_parameters())
        self.step, self.epoch, self.batch = 0, 0, 0
        self.best: float | None = None
        self.bad = 0  # non-finite steps in a row
        self._records: int | None = None  # records in metrics.jsonl (None: a checkpoint that did not say)
        # what the training data were (lists, file sizes and times): a resume on other data is said
        digest = self.lead and hasattr(self.train_src, "files_digest")  # rank 0 saves the checkpoints
        self._data_digest = self.train_src.files_digest() if digest else None
        self._epoch_loss = (0.0, 0)  # sum and count of the losses of this epoch's good steps
        self.history: dict[str, Any] = {"steps": [], "epochs": [], "stopped": "done", "step": 0}
        self._resume()
        set_mode(self.model, True, self.freeze_bn)
        self.step_fn = make_step(self.model, self.opt, run, self.group if self.world > 1 else None)
        self._valid_items: list[dict[str, mx.array]] | None = None
        self._data_loader = None
        self._deadline = math.inf  # set by fit() from run.max_minutes

    def log(self, msg: str) -> None:
        if self.lead:
            print(msg, flush=True)

    def _resume(self) -> None:
        try:
            self._load_checkpoint()
            failed = None
        except (ValueError, OSError) as e:
            failed = e
        if self.world > 1:  # the ranks agree: one raising alone would leave the others waiting for it
            if mx.distributed.all_sum(mx.array(int(failed is not None)), group=self.group).item():
                failed = failed or ValueError(f"another process could not resume {self.out}: see its error")
        if failed is not None:
            raise failed
        if self.world > 1:  # every rank starts from rank 0's state (checkpoints may be on rank 0's disk only)
            self.model.update(_broadcast(self.model.parameters(), self.group))
            for k, v in tree_flatten(_broadcast(self.opt.state, self.group)):
                _assign(self.opt.state, k, v)
            pos = _broadcast(mx.array([self.step, self.epoch, self.batch, self.bad]), self.group).tolist()
            self.step, self.epoch, self.batch, self.bad = (int(v) for v in pos)
            # Evaluated here, not lazily inside the first step's graph: there (MLX 0.32 CPU, ring backend)
            # the broadcast weights fed NaN losses, or finite wrong gradients under mx.compile, depending
            # on the model's ops; evaluated first, every variant matched one process.
            mx.eval(self.model.parameters(), self.opt.state)

    def _load_checkpoint(self) -> None:
        """The newest readable checkpoint's weights, optimizer state and position, if there is one; a
        ValueError if it is another run's."""
        found = latest_checkpoint(self.out, self.log) if self.out.exists() else None
        if found is not None:
            folder, weights, arrays, meta = found
            if ModelConfig.from_json(folder / "config.json") != self.model.cfg:
                raise ValueError(
                    f"{folder} holds another model config than this run; to go on with that run: --config "
                    f"{self.out / 'run_config.json'}, else use another out folder"
                )
            changed = _changed_settings(meta["run"], self.run) if "run" in meta else []
            if changed:  # the same run or none: the data order, schedule and seeds depend on these
                raise ValueError(
                    f"{folder} was saved by a run with other settings ({'; '.join(changed)}): "
                    "resume with the same ones or use another out folder"
                )
            restore(self.model, self.opt, weights, arrays)
            self.step, (self.epoch, self.batch), self.best = meta["step"], meta["position"], meta.get("best")
            self.bad, self._epoch_loss = meta.get("bad", 0), tuple(meta.get("epoch_loss", (0.0, 0)))
            self._records = meta.get("records")
            if "records" not in meta:
                warnings.warn(
                    f"{folder} was saved by an older dfn4lab: data order, random streams and validation "
                    "mixtures have changed since, so the resumed run is not the one it started",
                    stacklevel=2,
                )
            if (
                None not in (meta.get("data_digest"), self._data_digest)
                and meta["data_digest"] != self._data_digest
            ):
                warnings.warn(
                    f"the training data changed since {folder} was saved (lists, or files rebuilt or "
                    "edited): the resumed run will not match one never stopped (a moved or copied corpus "
                    "says this too)",
                    stacklevel=2,
                )
            self.log(f"resuming from {folder} (step {self.step}, epoch {self.epoch}, batch {self.batch})")

    # --- records, checkpoints, validation ---

    def emit(self, rec: dict[str, Any]) -> None:
        if not self.lead:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        self._records = (self._records or 0) + 1
        self.history["steps" if rec["kind"] == "step" else "epochs"].append(rec)
        if self.callback is not None:
            self.callback(rec)

    def meta(self, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "step": self.step,
            "position": [self.epoch, self.batch],
            "bad": self.bad,  # non-finite steps in a row: a resumed run stops where this one would
            "epoch_loss": list(self._epoch_loss),  # sum, count so far this epoch (its train_loss)
            "metrics": metrics or {},
            "best": self.best,
            "records": self._records,  # the log as it was at this checkpoint: a resume cuts it back to them
            "data_digest": self._data_digest,
            "rng": {"seed": self.run.seed, "next_step_seed": _step_seed(self.run.seed, self.step)},
            "run": self.run.to_dict(),
        }

    def checkpoint(self, metrics: dict[str, Any] | None = None) -> None:
        """Save a checkpoint (rank 0) and drop all but the newest ``keep``."""
        if not self.lead:
            return
        save_step(self.out, self.model, self.opt, self.meta(metrics), self.run.keep)

    def validate(self, best: bool = True) -> dict[str, float]:
        """Validation metrics (rank 0; {} elsewhere or without a valid split); updates ``best/`` if ``best``.

        A stop inside an epoch (``max_steps``, ``max_minutes``) validates too, for the log, but only
        whole epochs compete for ``best/``: a run stopped there and resumed picks the ``best/`` of one
        never stopped (which does not validate at that step)."""
        run = self.run
        if not (self.lead and self.valid_src is not None and run.valid_items > 0):
            return {}
        if self._valid_items is None:
            self._valid_items = validation_items(
                self.valid_src, run.valid_items, run.valid_batch, self.model.cfg.dsp
            )
        set_mode(self.model, False, self.freeze_bn)
        v = validate(self.model, self._valid_items, run.loss, losses.dyn_ramp(run.loss, self.step))
        set_mode(self.model, True, self.freeze_bn)
        key, sign = run.best_by, (1 if run.best_by == "loss" else -1)
        better = self.best is None or sign * v.get(key, math.nan) < sign * self.best
        if best and key in v and math.isfinite(v[key]) and better:
            self.best = v[key]
            save_checkpoint(self.out / "best", self.model, self.opt, self.meta(v))
        return v

    # --- training ---

    def train_step(self, batch: Any) -> dict[str, Any]:
        """One optimizer step on a loader ``Batch`` (this rank's share); returns its record."""
        t0 = time.perf_counter()
        run = self.run
        vad = losses.vad_active(run.loss, self.step, run.seed)
        ctl = mx.array([losses.dyn_ramp(run.loss, self.step), float(vad)])
        mx.random.seed(_step_seed(run.seed, self.step))
        loss, parts, norm, ok = self.step_fn(batch.noisy, batch.clean, batch.feat_erb, batch.feat_spec, ctl)
        mx.eval(loss, parts, norm, ok, self.model.state, self.opt.state)
        self.step += 1
        self.bad = 0 if bool(ok) else self.bad + 1
        return {
            "kind": "step",
            "step": self.step,
            "epoch": self.epoch,
            "loss": float(loss),
            **{k: float(v) for k, v in parts.items()},
            "grad_norm": float(norm),
            "lr": float(self.opt.state["learning_rate"]),
            "batch_size": batch.noisy.shape[0] * self.world,
            "skipped": not bool(ok),
            "vad_on": vad,
            "seconds": time.perf_counter() - t0,
        }

    def _loader(self):
        """The data loader at the current position; kept across epochs while the batch size stays, so its
        worker processes are not spawned again every epoch."""
        from dfn4lab.data.loader import DataPosition, Loader

        bs = self.run.batch_size_at(self.epoch)
        cur = self._data_loader
        at = cur is not None and (cur.position.epoch, cur.position.batch) == (self.epoch, self.batch)
        if at and cur.batch_size == bs // self.world:
            return cur
        if cur is not None:
            cur.close()
        view = RankView(self.train_src, bs, self.rank, self.world, self.run.seed)
        if len(view) == 0:
            raise ValueError(
                f"{len(self.train_src)} training samples per epoch are fewer than the batch size {bs}"
            )
        d = self.data_cfg
        self._data_loader = Loader(
            view,
            bs // self.world,
            workers=d.workers,
            prefetch=d.prefetch,
            shuffle=False,
            dsp_cfg=self.model.cfg.dsp,
            position=DataPosition(self.epoch, self.batch),
        )
        return self._data_loader

    def fit(self) -> dict[str, Any]:
        """Train until ``epochs`` or ``max_steps``, a SIGINT (checkpoint, return) or too many bad steps."""
        run = self.run
        limit = run.max_steps if run.max_steps is not None else math.inf
        budget = math.inf if run.max_minutes is None else 60 * run.max_minutes
        self._deadline = time.monotonic() + budget
        if self.step >= limit:
            self.log(f"already at step {self.step} (max_steps {run.max_steps}): nothing to do")
        try:
            with self._own_folder(), _Interrupt() as stop:
                return self._fit(limit, stop)
        finally:
            if self._data_loader is not None:
                self._data_loader.close()
                self._data_loader = None

    def _fit(self, limit: float, stop: _Interrupt) -> dict[str, Any]:
        run = self.run
        while self.epoch < run.epochs and self.step < limit and not self._out_of_time():
            n = len(self.train_src) // run.batch_size_at(self.epoch)
            if self.batch < n and not self._run_epoch(n, limit, stop):
                return self._stopped()
            complete = self.batch >= n
            (total, count), self._epoch_loss = self._epoch_loss, (0.0, 0) if complete else self._epoch_loss
            if complete:
                self.epoch, self.batch = self.epoch + 1, 0
            v = self.validate(best=complete)
            rec = {
                "kind": "epoch",
                "epoch": self.epoch - 1 if complete else self.epoch,
                "complete": complete,
                "step": self.step,
                "train_loss": total / count if count else None,
            }
            self.emit({**rec, **{f"valid_{k}": x for k, x in v.items()}})
            self.checkpoint(v)
            if self._interrupted(stop):  # during validation: stop at this checkpoint, not a step later
                return self._stopped()
        ended = "done" if self.epoch >= run.epochs else "max_steps" if self.step >= limit else "max_minutes"
        self.history.update(stopped=ended, step=self.step)
        why = "" if ended == "done" else f" ({ended} {getattr(run, ended)} reached; a larger one goes on)"
        self.log(f"finished at step {self.step}{why}; checkpoints in {self.out / 'checkpoints'}")
        return self.history

    @contextlib.contextmanager
    def _own_folder(self) -> Iterator[None]:
        """Hold ``out/.lock`` while training (rank 0): a second run on the folder would interleave the
        log and resume from, then prune, this one's checkpoints. Then record the config, and cut the log
        back to the checkpoint resumed from."""
        if not self.lead:
            yield
            return
        import fcntl

        paths.make_folder(self.out)
        with open(self.out / ".lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise ValueError(
                    f"{self.out} is in use by another training process (pid {f.read().strip() or '?'}): "
                    "wait for it to finish or use another out folder"
                ) from None
            f.truncate(0)
            f.write(str(os.getpid()))
            f.flush()
            self.run.to_json(self.out / "run_config.json")
            self._records = _trim_log(self.out / "metrics.jsonl", self.step, self._records)
            yield  # the lock goes with the file's closing

    def _stopped(self) -> dict[str, Any]:
        self.log(f"interrupted at step {self.step}; checkpoint in {self.out}; run again to resume")
        self.history.update(stopped="interrupted", step=self.step)
        return self.history

    def _run_epoch(self, n: int, limit: float, stop: _Interrupt) -> bool:
        """Batches from the data position to the end of the epoch (of ``n`` batches) or to ``limit`` steps;
        the good steps' losses add up in ``_epoch_loss``. False after a SIGINT (a checkpoint is saved)."""
        from tqdm.auto import tqdm

        run = self.run
        bar = tqdm(
            total=n,
            initial=self.batch,
            desc=f"epoch {self.epoch}",
            leave=False,
            disable=not (run.progress and self.lead),
        )
        with bar:
            for batch in self._loader():
                rec = self.train_step(batch)
                self.batch += 1
                self.emit(rec)
                if not rec["skipped"]:
                    self._epoch_loss = (self._epoch_loss[0] + rec["loss"], self._epoch_loss[1] + 1)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4g}", bad=self.bad)
                if self.bad >= run.max_bad_steps:
                    raise NonFiniteError(
                        f"{self.bad} steps in a row had a non-finite loss or gradient (last: step "
                        f"{self.step}, epoch {self.epoch}); stopped with the weights of the last good step. "
                        "Lower optim.lr or check the data."
                    )
                if self.step >= limit or self._out_of_time():
                    break  # first: a stop at the last step still validates and logs its epoch record
                if self._interrupted(stop):
                    self.checkpoint()
                    return False
                if self.step % run.ckpt_every == 0 and self.batch < n:
                    self.checkpoint()
        return True

    def _out_of_time(self) -> bool:
        late = time.monotonic() > self._deadline
        if self.world == 1 or self._deadline == math.inf:  # every rank has the same run config
            return late
        return bool(mx.distributed.all_sum(mx.array(int(late)), group=self.group).item())  # ranks agree

    def _interrupted(self, stop: _Interrupt) -> bool:
        if self.world == 1:
            return stop.hit
        return bool(mx.distributed.all_sum(mx.array(int(stop.hit)), group=self.group).item())


def train(
    run: RunConfig,
    data: tuple[Any, Any | None] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume) ``run`` in ``run.out``; returns the history ``{"steps", "epochs", "stopped",
    "step"}`` (rank 0 holds the records); ``stopped`` says what ended the run: "done" (its epochs),
    "max_steps", "max_minutes" or "interrupted" (a signal: checkpoint saved, run again to resume).

    ``data``: (train, valid or None) sources as ``dfn4lab.data`` makes them (``len()``, ``sample(epoch,
    index)`` with ``noisy``, ``clean``, ``snr``; ``report``); default: ``load_data(run)``. ``callback``
    gets every step and epoch record, e.g. ``viz.TrainBoard().update`` for a live figure in a notebook.
    The default device is restored afterwards (a deterministic run trains on the CPU).
    """
    device = mx.default_device()
    try:
        return Trainer(run, data, callback).fit()
    finally:
        mx.set_default_device(device)


# What a resumed run may change: its budget and bookkeeping, nothing that shapes the weights.
# (Not ``compile``: compiled and eager steps round differently, so the weights differ.)
# Samples are a function of (seed, epoch, index): how many processes mix them is bookkeeping too.
RESUMABLE = ("out", "max_steps", "max_minutes", "progress", "ckpt_every", "keep", "max_bad_steps")
RESUMABLE_DATA = ("workers", "prefetch")


def _changed_settings(saved: dict[str, Any], run: RunConfig) -> list[str]:
    """``key: saved -> now`` for the settings of ``run`` that differ from a checkpoint's, but RESUMABLE."""
    now = json.loads(json.dumps(run.to_dict()))  # tuples as the checkpoint's JSON holds them: lists

    def shaping(k: str, v: Any) -> Any:
        return {a: b for a, b in v.items() if a not in RESUMABLE_DATA} if k == "data" and v else v

    return [
        f"{k}: {saved.get(k)!r} -> {v!r}"
        for k, v in now.items()
        if k not in RESUMABLE and shaping(k, saved.get(k)) != shaping(k, v)
    ]


def _record(line: str) -> dict[str, Any] | None:
    """One ``metrics.jsonl`` record, or None for a line cut short (killed while appending it)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _step_seed(seed: int, step: int) -> int:
    """MLX's RNG seed for a step: a function of (seed, step), so a resumed run draws the same numbers.
    Its own stream (spawn key 3): the samples' streams are (seed, epoch, index), the shuffles' key 2."""
    return int(np.random.default_rng(np.random.SeedSequence([seed, step], spawn_key=(3,))).integers(2**32))


def _trim_log(path: Path, step: int, records: int | None = None) -> int:
    """Keep the first ``records`` records (the log of the checkpoint resumed from; else those up to its
    ``step``), dropping what a run that died after that checkpoint wrote. Returns how many are kept.

    By count, not step: a checkpoint taken at the last batch of an epoch (Ctrl-C) precedes that epoch's
    record of the same step, which the resumed run writes again."""
    if not path.exists():
        return 0
    recs = [line for line in path.read_text().splitlines() if _record(line)]
    keep = recs[:records] if records is not None else [line for line in recs if _record(line)["step"] <= step]
    paths.atomic_write(path, "".join(line + "\n" for line in keep))
    return len(keep)


def read_log(out: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records, epoch records) of a run's ``metrics.jsonl``."""
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    recs = [r for r in map(_record, lines) if r]
    return [r for r in recs if r["kind"] == "step"], [r for r in recs if r["kind"] == "epoch"]


# --- command line ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Run config from ``--config`` (JSON or YAML; optional), then the flags, then ``--set key=value``."""
    ap = argparse.ArgumentParser(prog="python -m dfn4lab.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="run config file (.json, .yaml)")
    ap.add_argument("--out")
    ap.add_argument("--preset")
    ap.add_argument("--backbone", help=" | ".join(BACKBONES))
    ap.add_argument("--data-config")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--max-steps", type=int, help="stop at this step (without --epochs: epochs to hold it)")
    ap.add_argument("--max-minutes", type=float, help="stop after this much training time")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--batch-schedule")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--dynamic-loss", choices=["none", "awesome"])
    ap.add_argument("--init-from", help='"dfn3" or a model folder')
    ap.add_argument("--freeze", nargs="*")
    ap.add_argument("--skip", nargs="*")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--ckpt-every", type=int)
    ap.add_argument("--valid-items", type=int)
    ap.add_argument(
        "--valid-store", help="a datastore folder to validate on (python -m dfn4lab.data.datastore)"
    )
    ap.add_argument("--precision", choices=["float32", "bfloat16"])
    ap.add_argument("--deterministic", action="store_true", default=None)
    ap.add_argument("--no-compile", dest="compile", action="store_false", default=None)
    ap.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. loss.dyn_warmup=500"
    )
    a = ap.parse_args(argv)
    raw = read_run_file(a.config) if a.config else {}
    d = RunConfig.from_dict(raw).to_dict()
    epochs_given = a.epochs is not None or "epochs" in raw
    flags = {
        "out": a.out,
        "preset": a.preset,
        "model.backbone.kind": a.backbone,
        "data_config": a.data_config,
        "epochs": a.epochs,
        "max_steps": a.max_steps,
        "max_minutes": a.max_minutes,
        "batch_size": a.batch_size,
        "batch_schedule": a.batch_schedule,
        "optim.lr": a.lr,
        "loss.dynamic": a.dynamic_loss,
        "init_from": a.init_from,
        "freeze": a.freeze,
        "skip": a.skip,
        "seed": a.seed,
        "ckpt_every": a.ckpt_every,
        "valid_items": a.valid_items,
        "valid_store": a.valid_store,
        "precision": a.precision,
        "deterministic": a.deterministic,
        "compile": a.compile,
        "progress": a.progress,
    }
    for k, v in flags.items():
        if v is not None:
            set_path(d, k, v)
    for kv in a.set:
        k, _, v = kv.partition("=")
        try:
            value = json.loads(v)
        except json.JSONDecodeError:
            value = v
        set_path(d, k, value)
    run = RunConfig.from_dict(d)
    if run.max_steps is not None and not epochs_given:  # the lr schedule spans max_steps, not 10 epochs
        saved = Path(run.out) / "run_config.json"  # resuming: its epochs (the lr schedule spans them)
        resuming = saved.is_file() and started(Path(run.out))  # not a run killed before its first checkpoint
        epochs = RunConfig.load(saved).epochs if resuming else epochs_for(run, run.max_steps)
        run = dataclasses.replace(run, epochs=epochs)
    return run


@command
def main(argv: list[str] | None = None) -> int:
    run = parse_args(argv)
    try:
        h = train(run)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 130 if h["stopped"] == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
