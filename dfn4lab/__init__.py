"""dfn4lab: a research workbench for DeepFilterNet4 speech enhancement in MLX.

Importing the package binds an optimized BLAS for MLX on Linux and keeps freed memory for reuse
(see ``dfn4lab.blas``), so import ``dfn4lab`` before ``mlx.core``.
"""

from dfn4lab import blas as _blas

_blas.bind()
_blas.keep_freed_memory()

try:
    import mlx.core  # noqa: F401 - on Linux its library comes from a backend package
except ImportError as e:
    raise ImportError(
        f"MLX does not load ({e}); on Linux install dfn4lab with a backend: "
        "pip install -e '.[cpu]' or -e '.[cuda]' (make does)"
    ) from None

__version__ = "0.1.0"
