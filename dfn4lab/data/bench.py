"""``python -m dfn4lab.bench data``: loader throughput with 0 and N workers, and how much of a training
step is spent waiting for data.

Samples are 3 s with reverb on every sample and the other augmentations at 0.5, heavier than the
training defaults. The training step is a stand-in: forward and backward of ``dfn3`` on the batch
with a spectral L1 loss (``mlx.nn.value_and_grad``), no optimizer. Uses the demo corpus when it is
built (``make data``), otherwise builds a tiny procedural one in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from dfn4lab.data.config import DataConfig

HEAVY = dict(max_len_s=3.0, p_reverb=1.0, p_eq=0.5, p_bandlimit=0.5, p_clip=0.5, p_interferer=0.5)


def _throughput(loader, batches: int) -> float:
    """Samples per second over ``batches`` batches, in steady state: after the batches made before the
    timer could start (worker start-up, the prefetch queue) are drained, untimed."""
    it = iter(loader)
    for _ in range(1 + (loader.prefetch if loader.workers else 0)):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * loader.batch_size / (time.perf_counter() - t)


def _wait_fraction(loader, steps: int) -> tuple[float, float, float]:
    """(fraction of step time spent waiting for the next batch, median wait s, median step s)."""
    import dfn4lab.inference as inference
    from dfn4lab.config import preset

    import mlx.core as mx
    import mlx.nn as nn

    model = inference.build(preset("dfn3"))

    def loss_fn(model, batch):
        enhanced = model(batch.noisy, batch.feat_erb, batch.feat_spec)[0]
        return mx.mean(mx.abs(enhanced - batch.clean))

    step = nn.value_and_grad(model, loss_fn)
    it = iter(loader)
    waits, steps_t = [], []
    for k in range(steps + 1):  # the first step warms up and is not counted
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        mx.eval(step(model, batch))
        t2 = time.perf_counter()
        if k > 0:
            waits.append(t1 - t0)
            steps_t.append(t2 - t1)
    return sum(waits) / (sum(waits) + sum(steps_t)), statistics.median(waits), statistics.median(steps_t)


def run(args: argparse.Namespace) -> dict:
    from dfn4lab.data import demo
    from dfn4lab.data.loader import Loader
    from dfn4lab.data.mixing import Mixer

    quick = bool(getattr(args, "quick", False))
    workers = int(getattr(args, "workers", 0) or min(4, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        root = demo.DEFAULT_OUT
        if not demo.is_built(root):
            root = Path(tmp) / "demo"
            demo.build(root, demo.DemoConfig.tiny(procedural=(4, 1, 1)), log=lambda *_: None)
        cfg = DataConfig.from_json(root / "data_config.json").replace(mix=HEAVY, samples_per_epoch=100_000)
        mixer = Mixer.from_config(cfg, "train")
        batches, rounds = (3, 1) if quick else (10, 3)
        sps: dict[int, list[float]] = {0: [], workers: []}
        for _ in range(rounds):  # alternated: both see the same machine load
            for w in sps:
                with Loader(mixer, batch_size=8, workers=w, prefetch=2 * w) as lo:
                    sps[w].append(_throughput(lo, batches))
        sps0, spsn = statistics.median(sps[0]), statistics.median(sps[workers])
        with Loader(mixer, batch_size=8, workers=workers, prefetch=2 * workers) as lo:
            frac, wait, step = _wait_fraction(lo, 2 if quick else 5)
    print(
        f"loader ({root}): {sps0:.1f} samples/s with 0 workers, {spsn:.1f} with {workers} "
        f"(3 s samples, reverb and augmentations)"
    )
    print(f"dfn3 fwd+bwd, batch 8: {step:.2f} s/step, {wait * 1000:.1f} ms waiting; wait fraction {frac:.4f}")
    return {
        "samples_per_s_0": round(sps0, 2),
        "samples_per_s_n": round(spsn, 2),
        "samples_per_s_spread": {str(w): [round(min(v), 2), round(max(v), 2)] for w, v in sps.items()},
        "workers": workers,
        "wait_fraction": round(frac, 4),
        "step_s": round(step, 3),
        "wait_s": round(wait, 4),
    }
