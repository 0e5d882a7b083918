"""MLX on a Linux CPU: bind an optimized CBLAS before ``mlx.core`` is first imported, keep freed
memory for reuse, limit BLAS threads around latency-bound work.

MLX's Linux wheel resolves ``cblas_sgemm`` from a bundled reference BLAS, which runs
matmuls ~50x slower than an optimized one. Loading an optimized CBLAS with
``RTLD_GLOBAL`` first makes the dynamic linker bind MLX's symbols to it instead.
Candidates in the order measured best here (x86_64, 2 cores): MKL from PyPI (``mkl``) first, then
Debian's OpenBLAS (``libopenblas0-pthread``). OpenBLAS wins a large GEMM (4000x1024x1024: ~200 vs
~160 GFLOP/s) but the model's hot paths are GRU steps, one-row GEMMs where MKL is ~3x faster:
``bench enhance`` 0.57-0.63 s with MKL vs 0.77-0.84 s with OpenBLAS for 10 s of audio (measured
before ``dfn4lab.kernels``, which now run those steps: 0.19 s), and a streaming hop likewise.
``DFN4LAB_BLAS=/path/to/libcblas.so`` picks one explicitly (``none``: skip).
On macOS MLX uses Accelerate/Metal and nothing is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
import platform
import sys
import threading
import warnings

BOUND: str | None = None  # path of the bound library, or None
_LIB: ctypes.CDLL | None = None
_DONE = False


def _candidates() -> list[str]:
    prefix = sys.prefix
    mkl = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
    openblas = [
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
        "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
        "/usr/lib64/libopenblas.so.0",
    ]
    env = os.environ.get("DFN4LAB_BLAS")  # an explicit choice is the only candidate
    return [env] if env else mkl + [p for p in openblas if os.path.exists(p)]


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of returning them to the kernel.

    glibc serves blocks over 32 MB (a DfNet feature map at batch 8 x 500 frames is ~100 MB) with a
    fresh ``mmap`` and unmaps them on free, so every such array's first write page-faults through
    all of its memory. Measured here: copying a 99 MB array 47 -> 5 ms; DFN3's forward at batch 8 x
    500 frames 1260 -> 745 ms (PyTorch's, in the same process, 1080 -> 450 ms: it allocates the same
    way). The cost: the process keeps its peak heap. Returns whether it was applied (glibc;
    ``DFN4LAB_MALLOC=glibc`` keeps glibc's defaults).
    """
    if platform.system() != "Linux" or os.environ.get("DFN4LAB_MALLOC") == "glibc":  # glibc's defaults
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


ENV_SET: dict[str, str] = {}  # the environment variables bind() set (not the user's)


def _setdefault_env(key: str, value: str) -> None:
    if key not in os.environ:
        os.environ[key] = ENV_SET[key] = value


def bind() -> str | None:
    """Load the first usable optimized CBLAS globally; warn once if none. Returns its path."""
    global BOUND, _LIB, _DONE
    if _DONE:
        return BOUND
    _DONE = True
    if platform.system() != "Linux" or os.environ.get("DFN4LAB_BLAS") == "none":
        return None
    if "mlx.core" in sys.modules:
        warnings.warn(
            "dfn4lab: mlx.core was imported before dfn4lab; MLX keeps its slow bundled BLAS. "
            "Import dfn4lab first.",
            stacklevel=3,
        )
        return None
    # MKL picks its threading layer at load time; GNU matches the OpenMP MLX and torch use.
    _setdefault_env("MKL_THREADING_LAYER", "GNU")
    # OpenMP threads that spin between parallel regions starve everything else once the cores are
    # shared (another process, torch's own pool, data workers): a 500-frame GRU at batch 8 took
    # 4180 ms with spinning threads against 140 ms passive, while a large GEMM is unchanged.
    _setdefault_env("OMP_WAIT_POLICY", "PASSIVE")
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            lib.cblas_sgemm  # noqa: B018 - raises AttributeError if it is no CBLAS
        except (OSError, AttributeError):
            continue
        BOUND, _LIB = path, lib
        return path
    warnings.warn(
        "dfn4lab: no optimized BLAS found (pip install mkl, or apt install libopenblas0-pthread); "
        "MLX matmuls on this CPU will be ~50x slower.",
        stacklevel=3,
    )
    return None


@functools.cache  # per streaming hop: look the symbols up once (bind() runs at import, before any call)
def _thread_api() -> tuple | None:
    """(get, set) of the bound BLAS's process-wide thread count (MKL or OpenBLAS), or None."""
    if _LIB is None:
        return None
    if hasattr(_LIB, "MKL_Get_Max_Threads") and hasattr(_LIB, "MKL_Set_Num_Threads_Local"):

        def get() -> int:  # the process-wide count: a thread-local one (torch sets it) would shadow it
            local = _LIB.MKL_Set_Num_Threads_Local(0)
            try:
                return _LIB.MKL_Get_Max_Threads()
            finally:
                _LIB.MKL_Set_Num_Threads_Local(local)

        return get, _LIB.MKL_Set_Num_Threads
    if hasattr(_LIB, "openblas_get_num_threads") and hasattr(_LIB, "openblas_set_num_threads"):
        return _LIB.openblas_get_num_threads, _LIB.openblas_set_num_threads
    return None


_THREADS_LOCK = threading.Lock()
_THREADS_DEPTH = 0
_THREADS_SAVED = 0


@contextlib.contextmanager
def threads(n: int):
    """Run the block with the bound BLAS limited to ``n`` threads (process-wide while any is inside).

    Streaming multiplies batch-1 rows: a second thread only adds wake-up latency (with passive OpenMP
    waiting). Measured per dfn3 hop over a continuous stream: 2.0 ms with MKL's 2 threads, 0.9 ms
    with 1. Nested or concurrent blocks (two streams in two threads) share one setting; the count in
    force before the first is restored when the last ends. A no-op where nothing was bound (macOS).
    """
    global _THREADS_DEPTH, _THREADS_SAVED
    api = _thread_api()
    if api is None:
        yield
        return
    get, set_ = api
    with _THREADS_LOCK:
        if _THREADS_DEPTH == 0:
            _THREADS_SAVED = get()
            set_(n)
        _THREADS_DEPTH += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_DEPTH -= 1
            if _THREADS_DEPTH == 0:
                set_(_THREADS_SAVED)
