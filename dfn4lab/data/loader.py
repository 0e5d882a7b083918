"""Batches for training: (noisy spec, clean spec, feat_erb, feat_spec, snr) as MLX arrays, made ahead
by background worker processes, resumable to the exact batch.

    loader = Loader(Mixer.from_config(cfg, "train"), batch_size=8, workers=2, prefetch=4)
    for batch in loader:              # the rest of the current epoch
        ...                           # train; checkpoint loader.position.to_dict() with the model
    loader = Loader(..., position=DataPosition.from_dict(saved))   # continues with the next batch

Each epoch visits the source in an order drawn from the loader's generator; ``DataPosition`` holds
(epoch, next batch, that generator's state at the epoch start). Samples depend only on (seed,
epoch, index), never on which worker made them, so a resumed run sees exactly the batches an
uninterrupted run would have seen, with any number of workers.

Workers are spawned processes (fork is unsafe once MLX runs; spawn is also what macOS uses). Each
makes whole batches (mixing, STFT, features) and sends numpy arrays back. With ``workers=0`` batches
are made in the calling thread.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Protocol

from dfn4lab import dsp
from dfn4lab.config import DspConfig
from dfn4lab.data.checks import Report
from dfn4lab.data.config import DataConfig
from dfn4lab.data.mixing import Mixer

import mlx.core as mx
import numpy as np


class Batch(NamedTuple):
    """One training batch; complex spectra as real/imag pairs in the last axis, float32."""

    noisy: mx.array  # (batch, time, freq, 2)
    clean: mx.array  # (batch, time, freq, 2)
    feat_erb: mx.array  # (batch, time, nb_erb)
    feat_spec: mx.array  # (batch, time, nb_df, 2)
    snr: mx.array  # (batch,)


class Source(Protocol):
    """What a loader draws from: ``Mixer`` (dynamic mixing) or ``Datastore`` (fixed mixtures)."""

    report: Report

    def __len__(self) -> int: ...

    def sample(self, epoch: int, index: int) -> Any: ...


@dataclass(frozen=True)
class DataPosition:
    """Where a loader stands: the next batch of an epoch and the order generator at the epoch start."""

    epoch: int = 0
    batch: int = 0
    rng: dict | None = None  # numpy PCG64 state; None: fresh from the loader's seed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataPosition:
        return cls(int(d["epoch"]), int(d["batch"]), d.get("rng"))


def featurize(
    noisy: np.ndarray, clean: np.ndarray, cfg: DspConfig, features: bool = True
) -> dict[str, np.ndarray]:
    """``(batch, samples)`` noisy and clean audio -> spectra (and features) as float32 numpy arrays."""
    spec = dsp.stft(mx.array(np.stack([noisy, clean])), cfg)  # (2, batch, time, freq)

    def ri(z: mx.array) -> mx.array:
        return mx.stack([mx.real(z), mx.imag(z)], axis=-1)

    out = {"noisy": ri(spec[0]), "clean": ri(spec[1])}
    if features:
        erb, dfs = dsp.features(spec[0], cfg)
        out.update(feat_erb=erb, feat_spec=ri(dfs))
    mx.eval(out)
    return {k: np.array(v) for k, v in out.items()}


def make_batch(source: Source, epoch: int, indices: list[int], cfg: DspConfig) -> dict[str, Any]:
    """Samples ``indices`` of ``epoch`` stacked and featurised (numpy), plus the source's bad files.

    Samples that carry features (from a ``Datastore``) keep them; only their spectra are computed.
    """
    samples = [source.sample(epoch, i) for i in indices]
    stored = all(hasattr(s, "feat_erb") for s in samples)
    out = featurize(
        np.stack([s.noisy for s in samples]), np.stack([s.clean for s in samples]), cfg, not stored
    )
    if stored:
        out["feat_erb"] = np.stack([s.feat_erb for s in samples])
        out["feat_spec"] = np.stack([s.feat_spec for s in samples])
    out["snr"] = np.array([s.snr for s in samples], dtype=np.float32)
    out["bad"] = list(source.report.bad)
    return out


_worker_source: Source | None = None


def exit_with_parent(poll_s: float = 1.0) -> None:
    """In a worker process: exit when the process that started it is gone (killed outright, it cannot
    shut its pool down; its workers were left blocked on a pipe, for good). Ctrl-C is the parent's to
    handle (a worker would only print its own KeyboardInterrupt traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _init_worker(source: Source) -> None:
    exit_with_parent()
    global _worker_source
    _worker_source = source


def _worker_batch(epoch: int, indices: list[int], cfg: DspConfig) -> dict[str, Any]:
    assert _worker_source is not None
    return make_batch(_worker_source, epoch, indices, cfg)


class Loader:
    """Iterates the batches of one epoch per ``for`` loop, from ``position`` on (one loop at a time)."""

    def __init__(
        self,
        source: Source,
        batch_size: int = 8,
        workers: int = 0,
        prefetch: int = 2,
        seed: int = 0,
        shuffle: bool = True,
        dsp_cfg: DspConfig | None = None,
        position: DataPosition | None = None,
    ):
        if len(source) < batch_size:
            raise ValueError(f"source has {len(source)} samples, fewer than one batch of {batch_size}")
        self.source, self.batch_size, self.workers = source, batch_size, workers
        self.prefetch = max(prefetch, workers, 1)
        self.seed, self.shuffle = seed, shuffle
        own = getattr(source, "dsp_cfg", None)  # a datastore's: its stored features were made with it
        if own is not None and dsp_cfg is not None and own != dsp_cfg:
            raise ValueError("the datastore was built with another DSP config than the one asked for")
        self.dsp_cfg = dsp_cfg or own or DspConfig()
        mix_sr = getattr(getattr(source, "cfg", None), "sr", self.dsp_cfg.sr)  # a Mixer's rate
        if mix_sr != self.dsp_cfg.sr:
            raise ValueError(f"the data is mixed at {mix_sr} Hz but the model's DSP runs at {self.dsp_cfg.sr} Hz")
        self.report = Report()
        self._pos = position or DataPosition()
        if self._pos.rng is None:
            self._pos = DataPosition(self._pos.epoch, self._pos.batch, self._initial_rng(self._pos.epoch))
        self._pool: ProcessPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    @classmethod
    def from_config(
        cls,
        cfg: DataConfig,
        split: str = "train",
        dsp_cfg: DspConfig | None = None,
        position: DataPosition | None = None,
    ) -> Loader:
        """Dynamic mixing of ``split`` with the config's batch size, workers, prefetch and seed;
        shuffled for training only."""
        src = Mixer.from_config(cfg, split)
        return cls(
            src, cfg.batch_size, cfg.workers, cfg.prefetch, cfg.seed, split == "train", dsp_cfg, position
        )

    def __len__(self) -> int:
        """Batches per epoch (a last partial batch is dropped)."""
        return len(self.source) // self.batch_size

    @property
    def position(self) -> DataPosition:
        """The position of the next batch; save it with a checkpoint."""
        return self._pos

    def _initial_rng(self, epoch: int) -> dict:
        g = np.random.default_rng(self.seed)
        for _ in range(epoch):  # the state a run from epoch 0 would have reached
            g.permutation(len(self.source))
        return g.bit_generator.state

    def _order(self) -> tuple[np.ndarray, dict]:
        """This epoch's sample order and the generator state the next epoch starts from."""
        g = np.random.default_rng()
        g.bit_generator.state = self._pos.rng
        perm = g.permutation(len(self.source))
        return (perm if self.shuffle else np.arange(len(self.source))), g.bit_generator.state

    def _submit(self, epoch: int, indices: list[int]) -> Future:
        if self.workers == 0:
            f: Future = Future()
            f.set_result(make_batch(self.source, epoch, indices, self.dsp_cfg))
            return f
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(
                self.workers, ctx, initializer=_init_worker, initargs=(self.source,)
            )
        return self._pool.submit(_worker_batch, epoch, indices, self.dsp_cfg)

    def __iter__(self):
        for f in self._pending:  # left over from an interrupted loop
            f.cancel()
        self._pending.clear()
        order, next_rng = self._order()
        if self._pos.batch >= len(self):
            self._pos = DataPosition(self._pos.epoch + 1, 0, next_rng)
            order, next_rng = self._order()
        epoch, start, rng, bs = self._pos.epoch, self._pos.batch, self._pos.rng, self.batch_size
        todo = deque(range(start, len(self)))
        while todo or self._pending:
            while todo and len(self._pending) < (self.prefetch if self.workers else 1):
                b = todo.popleft()
                self._pending.append(self._submit(epoch, [int(i) for i in order[b * bs : (b + 1) * bs]]))
            out = self._pending.popleft().result()
            self.report.merge(out.pop("bad"))
            b = len(self) - len(todo) - len(self._pending) - 1
            self._pos = DataPosition(epoch, b + 1, rng)
            yield Batch(*(mx.array(out[k]) for k in Batch._fields))
        self._pos = DataPosition(epoch + 1, 0, next_rng)

    def close(self) -> None:
        """Stop the workers (also done when the loader is garbage-collected)."""
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
