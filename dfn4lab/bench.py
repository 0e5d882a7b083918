"""Benchmarks: ``python -m dfn4lab.bench {matmul,enhance,stream,backbones,data}``.

Every case is timed in the same process as its comparison (ratios, not absolute numbers,
are what transfer between noisy machines): warm-up, repeated timings, median and spread.
Each benchmark's last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import dfn4lab  # noqa: F401  (binds the BLAS before mlx.core)
from dfn4lab import kernels, paths
from dfn4lab.cli import command
from dfn4lab.config import BACKBONES, ModelConfig, preset
from dfn4lab.data.bench import run as data_bench
from dfn4lab.inference import matched_config
from dfn4lab.macs import model_macs
from dfn4lab.paths import atomic_write

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` over ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def stats(times: list[float]) -> dict[str, float]:
    """Median, quartiles and inter-quartile range, in the unit of ``times``."""
    q = np.percentile(times, [25, 50, 75])
    return {
        "median": float(q[1]),
        "iqr": float(q[2] - q[0]),
        "q25": float(q[0]),
        "q75": float(q[2]),
        "n": len(times),
    }


def matmul(m: int = 4000, k: int = 1024, n: int = 1024, repeats: int = 7) -> dict[str, float]:
    """float32 GEMM throughput of MLX and PyTorch on the same machine, interleaved."""
    import torch

    a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
    ta, tb = torch.randn(m, k), torch.randn(k, n)
    mx.eval(a, b)
    flop = 2.0 * m * k * n
    mlx_t, torch_t = [], []
    for _ in range(repeats):  # interleaved so both see the same machine load
        mlx_t += timeit(lambda: mx.eval(a @ b), repeats=1)
        torch_t += timeit(lambda: ta @ tb, repeats=1)
    mlx_g = flop / statistics.median(mlx_t) / 1e9
    torch_g = flop / statistics.median(torch_t) / 1e9
    return {
        "mlx_gflops": round(mlx_g, 1),
        "torch_gflops": round(torch_g, 1),
        "mlx_over_torch_gflops": round(mlx_g / torch_g, 3),  # throughput: above 1, MLX faster
        "blas": dfn4lab._blas.BOUND,
        "shape": [m, k, n],
    }


def enhance(seconds: float = 10.0, repeats: int = 3) -> dict[str, float]:
    """One noisy 48 kHz clip through the official runtime and through dfn4lab ``dfn3``, interleaved, both
    warmed up. The runtime is fed 10 ms chunks, its only API (a Python call each: ~1 ms of 10 s's
    ~0.4 s); its start-up (model loading, ~0.08 s) is not timed."""
    from dfn4lab import data, inference

    noisy, _ = data.noisy_clip(seconds=seconds, snr_db=5.0)
    model = inference.load_pretrained("dfn3")
    official, ours = inference.official_enhance(noisy), inference.enhance(noisy, 48000, model)  # warm-up
    official_t, ours_t = [], []
    for _ in range(repeats):  # a fresh runtime per clip, as for ``official``, built outside the timer
        runtime = inference.official_runtime()
        official_t += timeit(lambda: inference.official_enhance(noisy, runtime=runtime), repeats=1, warmup=0)  # noqa: B023
        ours_t += timeit(lambda: inference.enhance(noisy, 48000, model), repeats=1, warmup=0)
    tail = inference.OFFICIAL_DELAY  # the runtime zeroes its flushed tail
    err = official[:-tail] - ours[:-tail]
    agreement = 10 * np.log10(np.sum(official[:-tail] ** 2) / np.sum(err**2))
    o, d = statistics.median(official_t), statistics.median(ours_t)
    print(
        f"official {o:.3f} s (iqr {stats(official_t)['iqr']:.3f}), dfn4lab {d:.3f} s "
        f"(iqr {stats(ours_t)['iqr']:.3f}) for {seconds:.0f} s of audio; agreement {agreement:.1f} dB"
    )
    return {
        "official_s": round(o, 4),
        "dfn4lab_s": round(d, 4),
        "speedup": round(o / d, 3),
        "agreement_snr_db": round(float(agreement), 2),
    }


def _env() -> dict[str, str]:
    """Where a result was measured: versions, CPU, BLAS, date, git commit (as evaluations record it)."""
    from dfn4lab.evaluate import environment

    return environment()


def _batch(cfg: ModelConfig, batch: int, frames: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    d = cfg.dsp
    spec = mx.array(rng.standard_normal((batch, frames, d.freq_bins, 2)).astype(np.float32) * 0.1)
    erb = mx.array((rng.standard_normal((batch, frames, d.nb_erb)) * 0.3 - 0.4).astype(np.float32))
    dfs = mx.array(rng.standard_normal((batch, frames, d.nb_df, 2)).astype(np.float32) * 0.5)
    return spec, erb, dfs


def _mlx_case(cfg: ModelConfig, batch: int, frames: int):
    """Callables for forward, forward+backward and a full AdamW training step of one model, each
    compiled with ``mx.compile`` as MLX code runs in practice (the trainer compiles its step too)."""
    from dfn4lab.inference import build

    import mlx.nn as nn
    import mlx.optimizers as optim

    model = build(cfg)
    x = _batch(cfg, batch, frames)
    target = x[0] * 0.5

    def loss_fn(spec, erb, dfs, target):
        return mx.mean(mx.abs(model(spec, erb, dfs)[0] - target))

    grad_fn = nn.value_and_grad(model, loss_fn)
    opt = optim.AdamW(1e-4, bias_correction=True)  # as torch.optim.AdamW
    opt.init(model.trainable_parameters())
    state = [model.state, opt.state]
    # model.state in and out: training-mode forwards update the BatchNorm running statistics
    fwd_c = mx.compile(lambda *a: model(*a)[0], inputs=model.state, outputs=model.state)
    fwdbwd_c = mx.compile(grad_fn, inputs=model.state, outputs=model.state)

    @partial(mx.compile, inputs=state, outputs=state)
    def step_c(*a):
        loss, grads = grad_fn(*a)
        opt.update(model, grads)
        return loss

    def fwd():
        mx.eval(fwd_c(*x))

    def fwdbwd():
        mx.eval(fwdbwd_c(*x, target), model.state)

    def step():
        mx.eval(step_c(*x, target), state)

    def resident() -> int:
        """Bytes this case keeps between calls: weights, BatchNorm statistics, optimizer state, inputs."""
        return sum(a.nbytes for _, a in tree_flatten([model.parameters(), opt.state, list(x), target]))

    return model, {"fwd": fwd, "fwdbwd": fwdbwd, "step": step}, resident


def batch_macs(cfg: ModelConfig, batch: int, frames: int) -> int:
    """Forward multiply-accumulates of one ``batch`` x ``frames`` batch (counted on a fresh model: the
    count runs a forward, which in training mode would move a timed model's BatchNorm statistics)."""
    from dfn4lab.inference import build

    return model_macs(build(cfg), frames * cfg.dsp.hop_size / cfg.dsp.sr) * batch


MLX_OPS = "mlx-ops"  # the variant run without dfn4lab.kernels
WINDOWED = "window-64"  # matched attention over the last 64 frames only


def _without_kernels(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with kernels.disabled():
            return fn()

    return run


def _peak_mb(fn: Callable[[], object], resident: int) -> float:
    """Peak memory of a call of ``fn``, in MiB: what it allocates on top of what is live before it (every
    case's weights and state), plus its own ``resident`` bytes."""
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    fn()
    return (mx.get_peak_memory() - before + resident) / 2**20


def backbones(
    batch: int = 8,
    frames: int = 500,
    repeats: int = 5,
    quick: bool = False,
    out_dir: str | Path | None = None,
    torch_device: str = "auto",
) -> dict:
    """Each backbone in the whole DfNet (dfn3 topology) at matched parameter count (and the plain
    same-width variant): forward, forward+backward, training step, peak memory; interleaved repeats;
    a sequence-length sweep; MLX vs PyTorch (on ``torch_device``, :func:`torch_device`) on the same
    network and weights. Writes JSON and CSV."""
    from dfn4lab.backbones import param_count

    base = preset("dfn3")
    if quick:
        base = base.replace(conv_ch=16, emb_hidden_dim=64, df_hidden_dim=64)
        batch, frames, repeats = min(batch, 2), min(frames, 40), min(repeats, 3)
        print(f"quick: a smoke test (batch {batch} x {frames} frames, {repeats} repeats, a 0.14 M-parameter")
        print("model): per-call overhead dominates its times, which compare nothing")
    from dfn4lab.inference import build

    # First, before the cases below exist: with them run and alive, the same eager MLX forward once
    # measured 1071 instead of 684 ms (cause not found). Compare the frameworks, not that residue.
    torch_cmp = _mlx_vs_torch(base, batch, frames, repeats, torch_device)
    target = param_count(build(base))
    variants = [("gru", "matched", base)]
    for kind in (k for k in BACKBONES if k != "gru"):
        variants.append((kind, "matched", matched_config(kind, target, base)))
        variants.append((kind, "same-width", base.replace(backbone=kind)))
    # the matched attention with a 64-frame window: its step without the time x time term
    att = next(cfg for k, v, cfg in variants if (k, v) == ("attention", "matched"))
    variants.append(("attention", WINDOWED, att.replace(backbone={"window": 64})))
    if kernels.active():  # the fused CPU kernels (GRU, Mamba's scan, attention) against MLX ops, as on a GPU
        variants += [(k, MLX_OPS, cfg) for k, v, cfg in variants if v == "matched"]
    cases = {}
    for kind, variant, cfg in variants:
        model, fns, resident = _mlx_case(cfg, batch, frames)
        if variant == MLX_OPS:
            fns = {k: _without_kernels(fn) for k, fn in fns.items()}
        times = {k: [] for k in fns}
        cases[(kind, variant)] = {
            "cfg": cfg,
            "model": model,
            "fns": fns,
            "resident": resident,
            "times": times,
        }
    order = np.random.default_rng(0)  # interleaved, in a new order each round: no case always goes first
    for _ in range(repeats):  # every case sees the same machine load
        for case in order.permutation(np.array(list(cases.values()), dtype=object)):
            for name, fn in case["fns"].items():
                case["times"][name] += timeit(fn, repeats=1, warmup=0 if case["times"][name] else 1)
    rows = []
    for (kind, variant), case in cases.items():
        s = {k: stats(v) for k, v in case["times"].items()}
        rows.append(
            {
                "backbone": kind,
                "variant": variant,
                "params": param_count(case["model"]),
                "macs": batch_macs(case["cfg"], batch, frames),
                "hidden": case["cfg"].emb_hidden_dim,
                "cfg": case["cfg"],
                **{f"{k}_ms": round(v["median"] * 1e3, 2) for k, v in s.items()},
                **{f"{k}_iqr_ms": round(v["iqr"] * 1e3, 2) for k, v in s.items()},
                **{f"{k}_{q}_ms": round(v[q] * 1e3, 2) for k, v in s.items() for q in ("q25", "q75")},
                "peak_mb": round(_peak_mb(case["fns"]["step"], case["resident"]()), 1),
            }
        )
    matched = {r["backbone"]: r for r in rows if r["variant"] == "matched"}
    ops = {r["backbone"]: r for r in rows if r["variant"] == MLX_OPS}  # where the kernels run
    windowed = next(r for r in rows if r["variant"] == WINDOWED)
    sweep = _length_sweep(
        {**{k: r["cfg"] for k, r in matched.items()}, "attention-w64": windowed["cfg"]}, quick, repeats
    )
    for r in rows:
        r.pop("cfg")
    result = {
        "cases": [
            {k: r[k] for k in ("backbone", "params", "macs", "fwd_ms", "fwdbwd_ms", "step_ms", "peak_mb")}
            for r in matched.values()
        ],
        "mamba_vs_gru_step": round(matched["mamba"]["step_ms"] / matched["gru"]["step_ms"], 3),
        "attention_vs_gru_step": round(matched["attention"]["step_ms"] / matched["gru"]["step_ms"], 3),
        "attention_w64_vs_gru_step": round(windowed["step_ms"] / matched["gru"]["step_ms"], 3),
        # the work behind those times: at matched parameters attention adds the time x time term
        "attention_vs_gru_macs": round(matched["attention"]["macs"] / matched["gru"]["macs"], 3),
        **torch_cmp["ratios"],
        "kernels": kernels.status(),
    }
    if ops:  # every backbone in MLX ops (as on Metal): the architectures' cost at equal footing
        result["mamba_vs_gru_step_mlx_ops"] = round(ops["mamba"]["step_ms"] / ops["gru"]["step_ms"], 3)
        result["attention_vs_gru_step_mlx_ops"] = round(
            ops["attention"]["step_ms"] / ops["gru"]["step_ms"], 3
        )
    _write(
        Path(out_dir) if out_dir is not None else _out_dir(quick),
        "bench_backbones",
        {
            "batch": batch,
            "frames": frames,
            "repeats": repeats,
            "rows": rows,
            "sweep": sweep,
            "torch": torch_cmp,
            "summary": result,
            "env": _env(),
        },
        rows,
    )
    for r in rows:
        print(
            f"{r['backbone']:>9} {r['variant']:<10} {r['params']:>9,} params  {r['macs'] / 1e9:7.3f} GMAC  "
            f"fwd {r['fwd_ms']:8.1f}  "
            f"fwd+bwd {r['fwdbwd_ms']:8.1f}  step {r['step_ms']:8.1f} ms  peak {r['peak_mb']:.0f} MB"
        )
    return result


def _length_sweep(cfgs: dict[str, ModelConfig], quick: bool, repeats: int) -> list[dict]:
    """Forward time (batch 1) against sequence length for each named config; the configs interleaved
    at each length, median and quartiles of ``repeats`` (at least 3) calls."""
    from dfn4lab.inference import build

    lengths = [25, 50, 100] if quick else [100, 500, 1000, 2000, 4000]
    models = {k: build(cfg).eval() for k, cfg in cfgs.items()}
    out = []
    for n in lengths:
        x = {k: _batch(cfgs[k], 1, n) for k in models}
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(max(repeats, 3)):
            for k, m in models.items():
                times[k] += timeit(
                    lambda m=m, x=x[k]: mx.eval(m(*x)[0]), repeats=1, warmup=0 if times[k] else 1
                )
        out += [{"backbone": k, "frames": n, **_ms("fwd", t)} for k, t in times.items()]
    return out


def _mlx_vs_torch(
    base: ModelConfig, batch: int, frames: int, repeats: int, torch_device: str = "auto"
) -> dict:
    """The same network (``torch_ref``) with the same weights: inference at batch 1, ``batch / 2`` and
    ``batch`` (1/4/8 by default), and a training step at ``batch``; rounds of one call each, in a new
    order each round, ``repeats`` rounds after one of warm-up. PyTorch runs on ``torch_device``
    (:func:`torch_device`: by default beside MLX's device, MPS or CUDA when MLX runs on a GPU).

    PyTorch runs in processes of its own with its own threading (:class:`_TorchWorker`): in one process
    the two share an OpenMP pool, and dfn4lab's passive OpenMP waiting (good for MLX) and MLX's threads
    slowed PyTorch's step 1.1 -> 2.0 s. ``torch``: with dfn4lab's malloc tuning, as MLX has it (equal
    footing); ``torch_glibc`` (on Linux's CPU only, where the tuning applies): glibc's defaults, a plain
    PyTorch process. Ratios are MLX time over PyTorch time (below 1: MLX faster). ``mlx_ops`` runs MLX
    without :mod:`dfn4lab.kernels`, only where they run (the CPU): elsewhere MLX's time is already that.
    """
    import tempfile

    model, fns, _ = _mlx_case(base, batch, frames)
    with_ops = kernels.active()  # then also MLX ops only, where dfn4lab.kernels would run (as on a GPU)
    ops_fns = (
        {k: _without_kernels(f) for k, f in _mlx_case(base, batch, frames)[1].items()} if with_ops else {}
    )
    batches = sorted({1, max(batch // 2, 1), batch})
    xs = {b: _batch(base, b, frames) for b in batches}

    def mlx_infer() -> dict:  # eager, as `enhance` runs (compiling the 500-frame graph measured slower)
        out = {f"infer_{b}": timeit(lambda b=b: mx.eval(model(*xs[b])[0]), 1, 0)[0] for b in batches}
        if with_ops:
            out["ops_infer"] = timeit(_without_kernels(lambda: mx.eval(model(*xs[batch])[0])), 1, 0)[0]
        return out

    def mlx_step() -> dict:
        out = {"step": timeit(fns["step"], 1, 0)[0]}
        return out | ({"ops_step": timeit(ops_fns["step"], 1, 0)[0]} if with_ops else {})

    order = np.random.default_rng(0)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))

        def worker(side: str, malloc: str) -> _TorchWorker:
            return stack.enter_context(
                _TorchWorker(model, tmp / side, batches, batch, frames, malloc, torch_device)
            )

        workers = {"torch": worker("torch", "dfn4lab")}
        devices = {"mlx": mx.default_device().type.name, "torch": workers["torch"].env["device"]}
        if torch_device == "auto" and devices["mlx"] == "gpu" and devices["torch"] == "cpu":
            warnings.warn(
                "PyTorch has no GPU here: it is timed on the CPU against MLX on the GPU", stacklevel=2
            )
        if devices["torch"] == "cpu" and workers["torch"].env["malloc_tuned"]:
            workers["torch_glibc"] = worker("torch_glibc", "glibc")
        sides = ("mlx", *workers)
        times: dict[str, dict[str, list[float]]] = {side: {} for side in sides}
        # all inference rounds, then all steps: a mode switch between them re-traced the compiled step
        # (median MLX step 2.1 s, quartiles 1.56-2.14)
        for mode, mlx_fn in (("infer", mlx_infer), ("step", mlx_step)):
            model.train(mode == "step")
            for r in range(repeats + 1):  # round 0 warms everything up
                for side in order.permutation(sides):
                    got = mlx_fn() if side == "mlx" else workers[side].run(mode)
                    for k, v in got.items():
                        times[side].setdefault(k, []).extend([v] if r else [])
    m = times["mlx"]
    rows = [
        {"batch": b, **{k: v for s in sides for k, v in _ms(s, times[s][f"infer_{b}"]).items()}}
        for b in batches
    ]
    step = {"batch": batch, **{k: v for s in sides for k, v in _ms(s, times[s]["step"]).items()}}
    if with_ops:  # measured only where the kernels run: elsewhere it is MLX's own time
        rows[-1] |= _ms("mlx_ops", m["ops_infer"])
        step |= _ms("mlx_ops", m["ops_step"])
    infer = rows[-1]

    def ratio(r: dict, a: str, b: str) -> float | None:
        return round(r[f"{a}_ms"] / r[f"{b}_ms"], 3) if f"{b}_ms" in r else None  # no such side

    ratios = {
        "mlx_vs_torch_infer": ratio(infer, "mlx", "torch"),
        "mlx_vs_torch_step": ratio(step, "mlx", "torch"),
        **{f"mlx_vs_torch_infer_b{r['batch']}": ratio(r, "mlx", "torch") for r in rows},
        "mlx_vs_torch_glibc_infer": ratio(infer, "mlx", "torch_glibc"),
        "mlx_vs_torch_glibc_step": ratio(step, "mlx", "torch_glibc"),
        "mlx_ops_vs_torch_infer": ratio(infer, "mlx_ops", "torch"),
        "mlx_ops_vs_torch_step": ratio(step, "mlx_ops", "torch"),
    }
    return {
        "frames": frames,
        "devices": devices,
        "infer": rows,
        "step": step,
        "torch_env": {side: w.env for side, w in workers.items()},
        "ratios": {k: v for k, v in ratios.items() if v is not None},
    }


class _TorchWorker:
    """``torch_ref``'s copy of an MLX model timed in a child process with PyTorch's own BLAS and OpenMP
    settings (``DFN4LAB_BLAS=none``; none of the variables ``blas.bind`` set here). The child imports
    dfn4lab (for ``torch_ref``, which loads MLX but runs nothing in it while timing), so it shares
    dfn4lab's malloc tuning (``blas.keep_freed_memory``) unless ``malloc="glibc"``: a plain PyTorch
    process. :meth:`run` times one call of each case of a kind there, on ``device`` (:func:`torch_device`)."""

    def __init__(
        self,
        model,
        folder: Path,
        batches: list[int],
        batch: int,
        frames: int,
        malloc: str = "dfn4lab",
        device: str = "auto",
    ):
        import subprocess

        from dfn4lab import blas, convert

        convert.save(folder, model, model.cfg)
        env = {k: v for k, v in os.environ.items() if k not in blas.ENV_SET} | {"DFN4LAB_BLAS": "none"}
        if malloc == "glibc":
            env["DFN4LAB_MALLOC"] = "glibc"
        spec = {"folder": str(folder), "batches": batches, "batch": batch, "frames": frames, "device": device}
        spec = json.dumps(spec | {"mlx_gpu": mx.default_device().type == mx.DeviceType.gpu})
        code = "import sys; from dfn4lab.bench import torch_worker; torch_worker(sys.argv[1])"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            self.env = self._read() | {"malloc": malloc}  # its threads and OpenMP settings, once ready
        except BaseException:
            self._stop(kill=True)
            raise

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch benchmark process ended (exit {self.proc.wait()})")
        got = json.loads(line)
        if "error" in got:
            raise RuntimeError(f"PyTorch side of the benchmark: {got['error']}")
        return got

    def run(self, kind: str) -> dict:
        """``"infer"``: one inference call at every batch size; ``"step"``: one training step."""
        self.proc.stdin.write(kind + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _stop(self, kill: bool) -> None:
        """End the child: at the end of its input, or at once (an error or Ctrl-C here: it may be busy)."""
        import subprocess

        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        if not kill:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self) -> _TorchWorker:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self._stop(kill=exc_type is not None)


def torch_device(requested: str = "auto", mlx_gpu: bool = False) -> str:
    """PyTorch's device for the comparison: ``requested``, checked, or for ``auto`` the one beside MLX's:
    MPS (Apple) or else CUDA when MLX runs on a GPU, the CPU when MLX does."""
    import torch

    available = {"cpu": True, "mps": torch.backends.mps.is_available(), "cuda": torch.cuda.is_available()}
    if requested == "auto":
        return next((d for d in ("mps", "cuda") if available[d]), "cpu") if mlx_gpu else "cpu"
    if requested not in available:
        raise ValueError(f"unknown PyTorch device {requested!r}; choose from auto, {', '.join(available)}")
    if not available[requested]:
        have = ", ".join(d for d, ok in available.items() if ok)
        raise ValueError(f"PyTorch has no {requested} device here (it has: {have})")
    return requested


def torch_worker(spec: str) -> None:
    """The child of :class:`_TorchWorker`: builds ``torch_ref``'s network from the saved MLX model and
    the bench's seeded inputs on its device, prints its environment, then one JSON line of times per
    line read (``infer`` or ``step``, as :meth:`_TorchWorker.run`); an error as ``{"error": ...}``."""
    try:
        _torch_worker(json.loads(spec))
    except Exception as e:  # to the parent, which raises it as a one-line error (DFN4LAB_DEBUG: traceback)
        if os.environ.get("DFN4LAB_DEBUG"):
            import traceback

            traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0]
        print(json.dumps({"error": f"{type(e).__name__}: {first}"}), flush=True)
        sys.exit(1)


def _torch_worker(s: dict) -> None:
    from dfn4lab import blas, inference, torch_ref

    import torch

    device = torch_device(s["device"], s["mlx_gpu"])
    # a GPU runs asynchronously: each timed call waits for its work, as mx.eval does
    sync = {"mps": lambda: torch.mps.synchronize(), "cuda": lambda: torch.cuda.synchronize()}
    sync = sync.get(device, lambda: None)
    mlx_model = inference.load(s["folder"])
    tmodel = torch_ref.from_mlx(mlx_model).to(device)
    cfg, batches, batch, frames = mlx_model.cfg, s["batches"], s["batch"], s["frames"]
    del mlx_model
    xs = {b: [torch.from_numpy(np.array(a)).to(device) for a in _batch(cfg, b, frames)] for b in batches}
    target = xs[batch][0] * 0.5
    opt = torch.optim.AdamW(tmodel.parameters(), 1e-4)

    def infer(b: int) -> None:
        tmodel(*xs[b])
        sync()

    def step() -> None:
        opt.zero_grad()
        (tmodel(*xs[batch])[0] - target).abs().mean().backward()
        opt.step()
        sync()

    env = {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ""),
        "malloc_tuned": blas.keep_freed_memory(),  # applied at import unless DFN4LAB_MALLOC=glibc
    }
    print(json.dumps(env), flush=True)
    for line in sys.stdin:
        if line.strip() == "infer":
            tmodel.eval()
            with torch.inference_mode():
                out = {f"infer_{b}": timeit(lambda b=b: infer(b), 1, 0)[0] for b in batches}
        else:
            tmodel.train()
            out = {"step": timeit(step, 1, 0)[0]}
        print(json.dumps(out), flush=True)


def _ms(name: str, times: list[float]) -> dict[str, float]:
    """``{name}_ms`` (median) and its quartiles ``{name}_q25_ms``, ``{name}_q75_ms`` of ``times`` (s)."""
    s = stats(times)
    return {
        f"{name}_{q}ms": round(s[k] * 1e3, 2) for q, k in (("", "median"), ("q25_", "q25"), ("q75_", "q75"))
    }


def torch_table(torch_cmp: dict) -> str:
    """``backbones``' MLX-vs-PyTorch block (``result["torch"]``) as a Markdown table, a ratio per row."""
    dev = torch_cmp.get("devices")  # results saved before devices were recorded have none
    where = f"MLX on {dev['mlx']}, PyTorch on {dev['torch']}. " if dev else ""
    lines = [
        f"{torch_cmp['frames']} frames; ms: median (quartiles); ratio = MLX / PyTorch (below 1: MLX faster). "
        f"{where}PyTorch with dfn4lab's malloc tuning, as MLX has it; 'glibc': a plain PyTorch process.",
        "",
        "| case | MLX | PyTorch | ratio | PyTorch, glibc malloc | ratio | MLX ops only | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict, name: str) -> str:
        return f"{r[f'{name}_ms']:.1f} ({r[f'{name}_q25_ms']:.1f}-{r[f'{name}_q75_ms']:.1f})"

    rows = [(f"inference, batch {r['batch']}", r) for r in torch_cmp["infer"]]
    rows.append((f"training step, batch {torch_cmp['step']['batch']}", torch_cmp["step"]))
    for what, r in rows:
        ratio = f"{r['mlx_ms'] / r['torch_ms']:.2f}"
        glibc = (
            f"{cell(r, 'torch_glibc')} | {r['mlx_ms'] / r['torch_glibc_ms']:.2f}"
            if "torch_glibc_ms" in r
            else " | "
        )
        ops = f"{cell(r, 'mlx_ops')} | {r['mlx_ops_ms'] / r['torch_ms']:.2f}" if "mlx_ops_ms" in r else " | "
        lines.append(f"| {what} | {cell(r, 'mlx')} | {cell(r, 'torch')} | {ratio} | {glibc} | {ops} |")
    return "\n".join(lines)


def _write(out_dir: Path, name: str, result: dict, rows: list[dict]) -> None:
    """``out_dir/name.json`` (everything) and ``out_dir/name.csv`` (the table), atomically."""
    import csv
    import io

    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    for suffix, text in ((".json", json.dumps(result, indent=2, default=str)), (".csv", buf.getvalue())):
        atomic_write(out_dir / f"{name}{suffix}", text)


def _stream_bench(args: argparse.Namespace) -> dict:
    """Per-hop streaming time for dfn3/dfn4 x every backbone beside the official runtime."""
    from dfn4lab import stream

    return stream.benchmark(seconds=1.5 if args.quick else 10.0, rounds=1 if args.quick else 3)


BENCHES: dict[str, Callable[[argparse.Namespace], dict]] = {
    "matmul": lambda a: matmul(repeats=a.repeats),
    "backbones": lambda a: backbones(a.batch, a.frames, a.repeats, a.quick, torch_device=a.torch_device),
    "enhance": lambda a: enhance(seconds=3.0 if a.quick else 10.0, repeats=min(a.repeats, 5)),
    "stream": _stream_bench,
    "data": data_bench,
}


def _out_dir(quick: bool) -> Path:
    """Where results go: ``figures/`` (``figures/quick/`` for quick runs, so CI never overwrites them)."""
    out = paths.FIGURES / ("quick" if quick else "")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _positive(s: str) -> int:
    n = int(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfn4lab.bench", description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHES))
    parser.add_argument("--repeats", type=_positive, default=7)
    parser.add_argument("--batch", type=_positive, default=8)
    parser.add_argument("--frames", type=_positive, default=500)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (CI)")
    parser.add_argument(
        "--torch-device",
        choices=("auto", "cpu", "mps", "cuda"),
        default="auto",
        help="PyTorch's device in `backbones` (auto: beside MLX's; MPS or CUDA when MLX runs on a GPU)",
    )
    args = parser.parse_args(argv)
    result = BENCHES[args.name](args)
    if args.name != "backbones":  # which writes its own, fuller file
        saved = json.dumps({**result, "env": _env()}, indent=1)
        atomic_write(_out_dir(args.quick) / f"bench_{args.name}.json", saved)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
