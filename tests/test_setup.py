"""Project set-up: dependencies declared consistently, notebooks clean, BLAS bound, JupyterLab serves."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import tomllib
from conftest import jupyter_lab

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!;~]", req.strip().strip("\"'"), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = py["optional-dependencies"]
    declared = {_name(r) for r in py["dependencies"] + extras["test"] + extras["kernels"] + extras["cpu"]}
    lines = (ROOT / "environment.yml").read_text().splitlines()
    pip_start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    env = {_name(line.strip()[2:]) for line in lines[pip_start + 1 :] if line.strip().startswith("- ")}
    env.discard("-e")
    assert declared == env, f"only in pyproject: {declared - env}; only in environment.yml: {env - declared}"
    assert '-e ".[test,kernels,cpu]"' in (ROOT / "environment.yml").read_text()


def test_torch_is_pinned_everywhere():
    assert '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()
    assert "torch==2.13.0" in (ROOT / "environment.yml").read_text()


def test_notebooks_have_no_outputs():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        dirty = [
            c
            for c in nb["cells"]
            if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))
        ]
        assert not dirty, f"{path.name} is committed with outputs: clear them"


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_large_arrays_reuse_freed_memory_without_page_faults():
    code = (
        "{imp}import mlx.core as mx, resource\n"
        "def faults():\n"
        "    for _ in range(4):  # 64 MB each: glibc would mmap and unmap them\n"
        "        a = mx.ones((16, 1024, 1024)) + 1; mx.eval(a); del a\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "f0 = faults(); print(faults() - f0)\n"
    )
    plain = int(_run(code.format(imp="")).stdout)
    ours = int(_run(code.format(imp="import dfn4lab\n")).stdout)
    assert plain > 4 * 16_000 and ours < 2_000, (plain, ours)  # a 64 MB array spans 16k pages


@pytest.mark.skipif(sys.platform != "linux", reason="BLAS binding is Linux only")
def test_mlx_resolves_sgemm_from_the_bound_blas():
    # The symbol MLX's libmlx.so binds to is the first global provider: it must be ours.
    code = (
        "import ctypes, dfn4lab, mlx.core as mx\n"
        "class Info(ctypes.Structure):\n"
        "    _fields_ = [('fname', ctypes.c_char_p), ('fbase', ctypes.c_void_p),\n"
        "                ('sname', ctypes.c_char_p), ('saddr', ctypes.c_void_p)]\n"
        "libc = ctypes.CDLL(None); addr = ctypes.cast(libc.cblas_sgemm, ctypes.c_void_p)\n"
        "info = Info(); ctypes.CDLL('libdl.so.2').dladdr(addr, ctypes.byref(info))\n"
        "print(dfn4lab._blas.BOUND); print(info.fname.decode())\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    bound, provider = out.stdout.split()
    assert bound != "None", "no optimized BLAS was bound"
    assert os.path.realpath(provider) == os.path.realpath(bound)


@pytest.mark.skipif(sys.platform != "linux", reason="BLAS binding is Linux only")
def test_missing_blas_warns_once_and_still_works():
    out = _run(
        "import dfn4lab, dfn4lab.blas as b, mlx.core as mx; b.bind()\n"
        "print((mx.ones((4, 4)) @ mx.ones((4, 4))).sum().item())",
        DFN4LAB_BLAS="/nonexistent/libblas.so",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "64.0"
    assert out.stderr.count("no optimized BLAS") == 1


def test_mlx_without_a_backend_names_the_extras():
    # what a Linux `pip install -e .` without `[cpu]` or `[cuda]` meets: mlx.core cannot load its library
    out = _run("import sys; sys.modules['mlx.core'] = None; import dfn4lab")
    assert out.returncode == 1
    assert "pip install -e '.[cpu]' or -e '.[cuda]'" in out.stderr.splitlines()[-1]


def test_info_cli():
    out = subprocess.run(
        [sys.executable, "-m", "dfn4lab", "info", "--json"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert {"platform", "mlx_device", "blas", "mlx", "torch"} <= d.keys()


def test_jupyterlab_serves_lab(tmp_path):
    with jupyter_lab(ROOT / "notebooks", tmp_path) as url:
        assert urllib.request.urlopen(f"{url}/lab", timeout=5).status == 200


def test_blas_threads_are_limited_inside_the_block_and_restored():
    # in a fresh process, with a thread-local MKL count set as torch sets one: it must neither be
    # read as the count to restore nor hide the process-wide one
    code = (
        "import dfn4lab.blas as b\n"
        "api = b._thread_api()\n"
        "if api is None: print('none'); raise SystemExit\n"
        "get, set_ = api; set_(2)\n"
        "if hasattr(b._LIB, 'MKL_Set_Num_Threads_Local'): b._LIB.MKL_Set_Num_Threads_Local(3)\n"
        "with b.threads(1):\n"
        "    with b.threads(1): inner = get()\n"
        "    after_inner = get()\n"
        "try:\n"
        "    with b.threads(1): raise RuntimeError\n"
        "except RuntimeError: pass\n"
        "print(inner, after_inner, get())\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = run.stdout.split()
    if out == ["none"]:
        pytest.skip("no BLAS with a thread API is bound here (macOS, or DFN4LAB_BLAS=none)")
    assert out == ["1", "1", "2"]
