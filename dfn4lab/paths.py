"""Where the workbench keeps its files: the project's ``data/`` (corpora, caches, results) and
``figures/``. Absolute, so notebooks (run from ``notebooks/``) and the CLI agree."""

from __future__ import annotations

from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
DATA = PROJECT / "data"
DEMO = DATA / "demo"  # the demo corpus (make data)
FIGURES = PROJECT / "figures"
