"""Shared test helpers: a tiny model config and random inputs for it, the tiny demo corpus, a JupyterLab
server. Test modules import the plain helpers (``from conftest import tiny_cfg``); fixtures come by name."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import dfn4lab  # noqa: F401  (binds the BLAS before mlx.core)
from dfn4lab.config import ModelConfig, preset
from dfn4lab.data import demo

import mlx.core as mx
import numpy as np
import pytest

# Every layer of a preset at a few thousand parameters instead of millions: fast, same code paths.
TINY = {
    "conv_ch": 8,
    "emb_hidden_dim": 32,
    "df_hidden_dim": 32,
    "enc_linear_groups": 8,
    "linear_groups": 4,
    "df_linear_groups": 4,
}


def tiny_cfg(name: str = "dfn3", **overrides) -> ModelConfig:
    """Preset ``name`` shrunk to ``TINY``, then ``overrides`` (which may also change TINY's fields)."""
    return preset(name, **{**TINY, **overrides})


def model_inputs(cfg: ModelConfig, t: int, batch: int = 2, seed: int = 0) -> tuple[mx.array, ...]:
    """Random model inputs of ``t`` frames: spec ``(batch, t, freq, 2)``, feat_erb ``(batch, t, nb_erb)``
    around a normalised level, feat_spec ``(batch, t, nb_df, 2)``; float32."""
    rng = np.random.default_rng(seed)
    d = cfg.dsp
    spec = rng.standard_normal((batch, t, d.freq_bins, 2)) * 0.1
    erb = rng.standard_normal((batch, t, d.nb_erb)) * 0.3 - 0.4
    dfs = rng.standard_normal((batch, t, d.nb_df, 2)) * 0.5
    return tuple(mx.array(x.astype(np.float32)) for x in (spec, erb, dfs))


class SpeechInPink:
    """A data source of real speech (alsa-utils' prompts) in pink noise at ``snr`` dB, 1 s crops at 48 kHz
    (``dfn4lab.data``'s interface): DFN3 knows what to do with it."""

    def __init__(self, n: int, snr: float = 5.0):
        from dfn4lab import data
        from dfn4lab.data.checks import Report

        self.speech, self.n, self.snr, self.report = data.real_speech(48000, 12.0), n, snr, Report()

    def __len__(self) -> int:
        return self.n

    def sample(self, epoch: int, index: int) -> SimpleNamespace:
        from dfn4lab import data

        start = int(np.random.default_rng((epoch, index)).integers(0, self.speech.size - 48000))
        clean = self.speech[start : start + 48000]
        noisy = data.mix(clean, data.pink_noise(clean.size, seed=1000 * epoch + index), self.snr)
        return SimpleNamespace(noisy=noisy, clean=clean, snr=self.snr)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """The tiny demo corpus (``DemoConfig.tiny()``), built once per session. Read only: copy it to
    change it."""
    out = tmp_path_factory.mktemp("corpus") / "demo"
    demo.build(out, demo.DemoConfig.tiny(), log=lambda *_: None)
    return out


@contextlib.contextmanager
def jupyter_lab(notebook_dir: Path, runtime_dir: Path, **env: str) -> Iterator[str]:
    """A JupyterLab server on a free port serving ``notebook_dir``, without token or password; yields its
    URL once ``/lab`` answers (fails after 90 s) and stops the server after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "jupyter"),
            "lab",
            "--no-browser",
            f"--port={port}",
            "--ip=127.0.0.1",
            "--IdentityProvider.token=",
            "--ServerApp.password=",
            "--allow-root",
            f"--notebook-dir={notebook_dir}",
            "--LabApp.news_url=None",
            "--LabApp.collaborative=False",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime_dir), **env},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        status, deadline = None, time.time() + 90
        while time.time() < deadline and status != 200:
            try:
                status = urllib.request.urlopen(f"{url}/lab", timeout=5).status
            except OSError:
                time.sleep(0.5)
        assert status == 200, f"JupyterLab did not serve {url}/lab within 90 s"
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
