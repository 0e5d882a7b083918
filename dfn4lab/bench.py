"""Benchmarks: ``python -m dfn4lab.bench {matmul,enhance}``.

Every case is timed in the same process as its comparison (ratios, not absolute numbers,
are what transfer between noisy machines): warm-up, repeated timings, median and spread.
Each benchmark's last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import dfn4lab  # noqa: F401  (binds the BLAS before mlx.core)

import mlx.core as mx
import numpy as np


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
    """Median and inter-quartile range, in the unit of ``times``."""
    q = np.percentile(times, [25, 50, 75])
    return {"median": float(q[1]), "iqr": float(q[2] - q[0]), "n": len(times)}


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
        "ratio": round(mlx_g / torch_g, 3),
        "blas": dfn4lab._blas.BOUND,
        "shape": [m, k, n],
    }


def enhance(seconds: float = 10.0, repeats: int = 3) -> dict[str, float]:
    """One noisy 48 kHz clip through the official runtime and through dfn4lab ``dfn3``, interleaved."""
    from dfn4lab import data, inference

    noisy, _ = data.noisy_clip(seconds=seconds, snr_db=5.0)
    model = inference.load_pretrained("dfn3")
    official_t, ours_t = [], []
    for _ in range(repeats):
        official_t += timeit(lambda: inference.official_enhance(noisy), repeats=1, warmup=0)
        ours_t += timeit(lambda: inference.enhance(noisy, 48000, model), repeats=1)
    official, ours = inference.official_enhance(noisy), inference.enhance(noisy, 48000, model)
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


BENCHES: dict[str, Callable[[argparse.Namespace], dict]] = {
    "matmul": lambda a: matmul(repeats=a.repeats),
    "enhance": lambda a: enhance(seconds=3.0 if a.quick else 10.0, repeats=min(a.repeats, 5)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfn4lab.bench", description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (CI)")
    args = parser.parse_args(argv)
    print(json.dumps(BENCHES[args.name](args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
