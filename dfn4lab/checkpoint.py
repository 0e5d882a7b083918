"""Training checkpoints: folders that resume a run exactly, written so a crash never leaves a partial one.

A checkpoint folder is a model folder (``model.safetensors`` + ``config.json``, so ``inference.load``
reads it) plus ``trainer.safetensors``: optimizer state as arrays; step, data position, RNG seeding,
metrics and the run config as metadata. A run keeps its newest ones as ``checkpoints/step-NNNNNNNN/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dfn4lab import convert
from dfn4lab.model import DfNet
from dfn4lab.paths import atomic_write, publish, recover

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten


def save_checkpoint(folder: Path, model: DfNet, opt: optim.Optimizer, meta: dict[str, Any]) -> Path:
    """Write a checkpoint folder atomically: a model folder plus ``trainer.safetensors`` (optimizer, meta)."""
    for stale in folder.parent.glob(f".tmp-{folder.name}-*"):  # a killed save's (one writer per run)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    convert.save(tmp, model, model.cfg, meta={"step": str(meta["step"])})
    arrays = {f"opt.{k}": v for k, v in tree_flatten(opt.state)}
    metadata = {"meta": json.dumps(meta)}
    atomic_write(tmp / "trainer.safetensors", lambda p: mx.save_safetensors(p, arrays, metadata=metadata))
    return publish(tmp, folder, marker="trainer.safetensors")


def save_step(out: Path, model: DfNet, opt: optim.Optimizer, meta: dict[str, Any], keep: int) -> Path:
    """Save ``out/checkpoints/step-NNNNNNNN`` (the step of ``meta``) and drop all but the newest ``keep``,
    and any half-written folder a killed save left (``.tmp-*``; one run writes its folder at a time)."""
    folder = save_checkpoint(out / "checkpoints" / f"step-{meta['step']:08d}", model, opt, meta)
    for old in checkpoints(out)[:-keep] + list(folder.parent.glob(".tmp-*")):
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _set_aside(out: Path) -> list[Path]:
    """Checkpoints of ``out`` that a save killed while replacing them left as ``.step-N.old.PID``."""
    return list((out / "checkpoints").glob(".step-*.old.*"))


def started(out: Path) -> bool:
    """Whether run folder ``out`` has checkpoints to resume from (set-aside ones count: see below)."""
    return bool(checkpoints(out) or _set_aside(out))


def recover_saves(out: Path) -> list[Path]:
    """Put back the checkpoints (and ``best/``) of run folder ``out`` that a save killed while replacing
    them left aside (:func:`dfn4lab.paths.recover`); returns them. Without this, a run whose only
    checkpoint was being replaced would start over."""
    names = {p.name[1:].rsplit(".old.", 1)[0] for p in _set_aside(out)}
    return [d for d in [*(out / "checkpoints" / n for n in sorted(names)), out / "best"] if recover(d)]


def checkpoints(out: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    steps = (p for p in (out / "checkpoints").glob("step-*") if p.is_dir())
    found = [(int(m[1]), p) for p in steps if (m := re.fullmatch(r"step-(\d+)", p.name))]
    return [p for _, p in sorted(found)]  # "step-00000010 copy" and the like are not the run's


def read_checkpoint(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, mx.array], dict[str, Any]]:
    """(model weights, trainer arrays, meta) of a checkpoint; raises if anything is missing or unreadable."""
    _, weights = convert.load_folder(folder)
    arrays, metadata = mx.load(str(folder / "trainer.safetensors"), return_metadata=True)
    return weights, arrays, json.loads(metadata["meta"])


def latest_checkpoint(out: Path, log: Callable[[str], None] = print):
    """The newest readable checkpoint of ``out`` as (folder, weights, arrays, meta), or None when there
    is none. Unreadable newer ones are renamed ``damaged-step-N`` (kept, no longer the run's: pruning
    would otherwise count them and delete the checkpoints the resumed run writes). Raises ValueError
    when there are checkpoints but none is readable: starting over would drop the run's log."""
    found = checkpoints(out)
    damaged = []
    for folder in reversed(found):
        try:
            loaded = (folder, *read_checkpoint(folder))
        except Exception as e:  # a damaged folder: say so and fall back to the one before
            log(f"skipping unreadable checkpoint {folder.name}: {type(e).__name__}: {str(e)[:120]}")
            damaged.append(folder)
            continue
        for d in damaged:
            d.rename(d.with_name(f"damaged-{d.name}"))
        return loaded
    if found:
        raise ValueError(f"none of the {len(found)} checkpoints in {out / 'checkpoints'} is readable")
    return None


def restore(
    model: DfNet, opt: optim.Optimizer, weights: dict[str, np.ndarray], arrays: dict[str, mx.array]
) -> None:
    """Load model weights and optimizer state from a checkpoint."""
    convert.load_weights(model, weights)
    opt.state = tree_unflatten([(k[4:], v) for k, v in arrays.items() if k.startswith("opt.")])
    opt.init(model.trainable_parameters())
