"""Build dfn4lab's CPU kernels into this package: ``python -m dfn4lab.kernels`` (``make kernels``).

CMake compiles the ``.cpp`` files here against the MLX installed in this environment (its headers
and ``libmlx``) with nanobind (the ``kernels`` extra); ~20 s. Exits 1 with one line naming the log
when it cannot build: the pure-MLX code then runs instead.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parent


def build(build_dir: Path | None = None) -> Path:
    """Configure and build; returns the module's path. Raises RuntimeError (one line) on failure."""
    # one build folder per checkout: CMake refuses a cache made for another source folder (a second
    # clone or worktree sharing this environment)
    tag = hashlib.sha1(str(SOURCE).encode()).hexdigest()[:8]
    build_dir = build_dir or Path(sys.prefix) / f"dfn4lab-kernels-build-{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    cmake = shutil.which("cmake", path=os.path.dirname(sys.executable)) or shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("cmake not found (pip install 'dfn4lab[kernels]')")
    _remove_built()  # never leave a module built against another MLX, nor a half-linked one
    steps = [
        [cmake, "-S", str(SOURCE), "-B", str(build_dir), f"-DPython_EXECUTABLE={sys.executable}"],
        [cmake, "--build", str(build_dir), "--parallel"],
    ]
    with open(log, "w") as out:
        for step in steps:
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode:
                _remove_built()
                raise RuntimeError(f"build failed, see {log}")
    built = sorted(SOURCE.glob("_kernels*.so"))
    if not built:
        raise RuntimeError(f"cmake produced no module, see {log}")
    return built[0]


def _remove_built() -> None:
    for path in SOURCE.glob("_kernels*.so"):
        path.unlink()


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m dfn4lab.kernels", description=__doc__.split("\n\n")[0]
    ).parse_args(argv)
    try:
        path = build()
    except RuntimeError as e:
        print(f"dfn4lab.kernels: {e}; the pure-MLX loops run instead", file=sys.stderr)
        return 1
    print(f"dfn4lab.kernels: built {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
