"""Datastore: a fixed set of precomputed mixtures and features in sharded safetensors, for fast start-up.

    python -m dfn4lab.data.datastore build --config data/demo/data_config.json --split valid \\
        --samples 256 --output data/demo/store-valid
    python -m dfn4lab.data.datastore info data/demo/store-valid
    python -m dfn4lab.data.datastore verify data/demo/store-valid

Each shard ``shard-NNNNN.safetensors`` holds ``noisy`` and ``clean`` ``(n, samples)``, ``feat_erb``
``(n, time, nb_erb)``, ``feat_spec`` ``(n, time, nb_df, 2)`` and ``snr`` ``(n,)``, float32.
``manifest.json`` records how they were made (mixing and DSP configs, seed, split, epoch), every
sample's metadata, and each shard's size and SHA-256. ``Datastore`` reads single samples through
memory maps and is a ``Loader`` source like ``Mixer`` (the same mixtures every epoch).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import shutil
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dfn4lab.cli import command
from dfn4lab.config import DspConfig
from dfn4lab.data.checks import Report
from dfn4lab.data.config import DataConfig
from dfn4lab.data.loader import exit_with_parent, featurize
from dfn4lab.data.mixing import Mixer
from dfn4lab.paths import check_replaceable, publish, staging

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

VERSION = 1
MANIFEST_KEYS = ("version", "samples", "shard_size", "shards", "meta")  # what makes a folder a datastore
TENSORS = ("noisy", "clean", "feat_erb", "feat_spec", "snr")


@dataclass
class StoredSample:
    """One stored mixture: audio ``(samples,)``, features ``(time, ...)``, SNR and metadata."""

    noisy: np.ndarray
    clean: np.ndarray
    feat_erb: np.ndarray
    feat_spec: np.ndarray
    snr: float
    meta: dict = field(default_factory=dict)


def _chunk(
    mixer: Mixer, epoch: int, indices: list[int], cfg: DspConfig
) -> tuple[dict[str, np.ndarray], list]:
    samples = [mixer.sample(epoch, i) for i in indices]
    noisy = np.stack([s.noisy for s in samples])
    clean = np.stack([s.clean for s in samples])
    f = featurize(noisy, clean, cfg)
    arrays = {"noisy": noisy, "clean": clean, "feat_erb": f["feat_erb"], "feat_spec": f["feat_spec"]}
    arrays["snr"] = np.array([s.snr for s in samples], dtype=np.float32)
    return arrays, [(s.meta, list(mixer.report.bad)) for s in samples]


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build(
    out: str | Path,
    mixer: Mixer,
    samples: int,
    epoch: int = 0,
    shard_size: int = 64,
    dsp_cfg: DspConfig | None = None,
    workers: int = 0,
    info: dict | None = None,
) -> dict:
    """Mix samples ``0..samples-1`` of ``epoch`` into ``out`` (replacing it); returns the manifest."""
    if samples < 1 or shard_size < 1 or workers < 0:
        raise ValueError(f"samples, shard_size >= 1 and workers >= 0, got {samples}, {shard_size}, {workers}")
    cfg = dsp_cfg or DspConfig()
    if mixer.cfg.sr != cfg.sr:  # the features would be computed for another rate than the audio's
        raise ValueError(f"the data mixes at {mixer.cfg.sr} Hz, the model's features are for {cfg.sr} Hz")
    out = Path(out)
    check_replaceable(out, "manifest.json", MANIFEST_KEYS)  # a user's folder is never replaced
    chunks = [list(range(i, min(i + shard_size, samples))) for i in range(0, samples, shard_size)]
    report, meta, shards = Report(), [], []
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, ctx, initializer=exit_with_parent) if workers > 0 else None
    with contextlib.ExitStack() as stack:  # failed or interrupted: no half-built folder, no workers mixing
        tmp = stack.enter_context(staging(out))
        if pool is not None:
            stack.callback(pool.shutdown, cancel_futures=True)
        if pool is not None:
            results = pool.map(_chunk, *zip(*[(mixer, epoch, c, cfg) for c in chunks], strict=True))
        else:
            results = (_chunk(mixer, epoch, c, cfg) for c in chunks)
        for k, (arrays, metas) in enumerate(results):
            name = f"shard-{k:05d}.safetensors"
            try:
                save_file(arrays, str(tmp / name), metadata={"first": str(chunks[k][0]), "version": str(VERSION)})
            except SafetensorError as e:  # a full disk, say: one line, not the library's traceback
                raise OSError(f"{out}: cannot write {name} ({e})") from None
            for m, bad in metas:
                meta.append(m)
                report.merge(bad)
            size, digest = (tmp / name).stat().st_size, sha256(tmp / name)
            shards.append(
                {"file": name, "first": chunks[k][0], "n": len(chunks[k]), "bytes": size, "sha256": digest}
            )
        manifest = {
            "version": VERSION,
            "samples": samples,
            "shard_size": shard_size,
            "epoch": epoch,
            "seed": mixer.seed,
            "length": mixer.cfg.samples,
            "mix": asdict(mixer.cfg),
            "dsp": asdict(cfg),
            "info": info or {},
            "shards": shards,
            "report": report.to_dict(),
            "meta": meta,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        publish(tmp, out, marker="manifest.json", keys=MANIFEST_KEYS)
    return manifest


class Datastore:
    """Read access to a built datastore; a ``Loader`` source (``sample`` ignores the epoch)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise FileNotFoundError(f"{self.path} is not a datastore (no manifest.json)")
        try:
            self.manifest = json.loads(mf.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{mf}: not valid JSON ({e})") from None
        if not isinstance(self.manifest, dict) or not all(k in self.manifest for k in MANIFEST_KEYS):
            raise ValueError(f"{self.path} is not a datastore (its manifest.json has no shards)")
        if self.manifest["version"] != VERSION:
            raise ValueError(f"{self.path}: datastore version {self.manifest['version']}, this reads {VERSION}")
        self.report = Report()
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self.manifest["samples"])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    @property
    def dsp_cfg(self) -> DspConfig:
        return DspConfig(**self.manifest["dsp"])

    def _shard(self, k: int):
        if k not in self._open:
            self._open[k] = safe_open(str(self.path / self.manifest["shards"][k]["file"]), framework="numpy")
        return self._open[k]

    def sample(self, epoch: int, index: int) -> StoredSample:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a datastore of {len(self)}")
        k, j = divmod(index, int(self.manifest["shard_size"]))
        try:
            f = self._shard(k)
            row = {t: f.get_slice(t)[j] for t in TENSORS}
        except (OSError, SafetensorError) as e:  # missing or truncated since it was built
            shard = self.manifest["shards"][k]["file"]
            raise ValueError(f"{self.path / shard}: unreadable ({e}); check with `verify`") from None
        meta = self.manifest["meta"][index]
        return StoredSample(
            row["noisy"], row["clean"], row["feat_erb"], row["feat_spec"], float(row["snr"]), meta
        )

    def info(self) -> dict:
        m = self.manifest
        return {
            "path": str(self.path),
            "samples": m["samples"],
            "seconds_per_sample": m["length"] / m["mix"]["sr"],
            "shards": len(m["shards"]),
            "bytes": sum(s["bytes"] for s in m["shards"]),
            "split": m["info"].get("split"),
            "epoch": m["epoch"],
            "seed": m["seed"],
            "snr_counts": {str(k): v for k, v in sorted(Counter(x["snr"] for x in m["meta"]).items())},
            "skipped_files": m["report"]["skipped"],
        }

    def verify(self) -> list[str]:
        """Problems found (empty if none): missing or altered shards, wrong shapes, non-finite values."""
        m, problems = self.manifest, []
        if sum(s["n"] for s in m["shards"]) != m["samples"] or len(m["meta"]) != m["samples"]:
            problems.append("manifest: shard sizes or metadata do not add up to the sample count")
        t = m["length"] // m["dsp"]["hop_size"]
        shapes = {
            "noisy": (m["length"],),
            "clean": (m["length"],),
            "feat_erb": (t, m["dsp"]["nb_erb"]),
            "feat_spec": (t, m["dsp"]["nb_df"], 2),
            "snr": (),
        }
        for s in m["shards"]:
            p = self.path / s["file"]
            if not p.is_file():
                problems.append(f"{s['file']}: missing")
                continue
            if p.stat().st_size != s["bytes"] or sha256(p) != s["sha256"]:
                problems.append(f"{s['file']}: checksum mismatch (altered or truncated)")
                continue
            with safe_open(str(p), framework="numpy") as f:
                for name in TENSORS:
                    x = f.get_tensor(name)
                    if x.shape != (s["n"], *shapes[name]) or x.dtype != np.float32:
                        problems.append(f"{s['file']}: {name} has shape {x.shape} {x.dtype}")
                    elif not np.isfinite(x).all():
                        problems.append(f"{s['file']}: {name} has NaN or inf")
        return problems


@command
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dfn4lab.data.datastore", description=__doc__.split("\n\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="mix and store a fixed set of samples")
    b.add_argument("--config", required=True, help="data config JSON (python -m dfn4lab.data.lists)")
    b.add_argument("--split", default="valid", choices=("train", "valid", "test"))
    b.add_argument("--samples", type=int, default=256)
    b.add_argument("--epoch", type=int, default=0)
    b.add_argument("--shard-size", type=int, default=64)
    b.add_argument("--workers", type=int, default=0)
    b.add_argument("--output", required=True)
    for name in ("info", "verify"):
        sub.add_parser(name).add_argument("path")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        cfg = DataConfig.from_json(args.config)
        mixer = Mixer.from_config(cfg, args.split)
        info = {"config": str(args.config), "split": args.split}
        m = build(
            args.output, mixer, args.samples, args.epoch, args.shard_size, workers=args.workers, info=info
        )
        n, skipped = len(m["shards"]), m["report"]["skipped"]
        print(f"{m['samples']} samples, {n} shards in {args.output}; {skipped} input files skipped")
        return 0
    store = Datastore(args.path)
    if args.cmd == "info":
        print(json.dumps(store.info(), indent=1))
        return 0
    problems = store.verify()
    for p in problems:
        print(f"FAIL {p}")
    print(f"{args.path}: {'OK' if not problems else f'{len(problems)} problems'} ({len(store)} samples)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
