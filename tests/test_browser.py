"""A person's view: JupyterLab in Debian's Chromium (driven by Playwright) runs notebook 02 top to bottom.

Needs /usr/bin/chromium (Debian package ``chromium``; ``make`` installs it on Debian as root) and the
``playwright`` Python package, which must not download a browser of its own.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import jupyter_lab

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
if not Path(CHROMIUM).exists():
    pytest.skip(
        f"{CHROMIUM} missing: apt-get install chromium (make does this on Debian as root)",
        allow_module_level=True,
    )


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server serving a copy of notebooks/ (outputs never touch the repo), in quick mode."""
    nbdir = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", nbdir)
    with jupyter_lab(nbdir, tmp_path / "rt", DFN4LAB_QUICK="1") as url:
        yield url


def test_notebook_02_runs_in_chromium(lab):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{lab}/lab/tree/02_model.ipynb", timeout=120_000)
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
        page.click(".jp-NotebookPanel .jp-Cell >> nth=0")
        page.keyboard.press("Escape")
        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()
        # The last cell's result appears when every cell ran.
        cells = page.locator(".jp-NotebookPanel .jp-CodeCell")
        last = cells.nth(cells.count() - 1)
        last.locator(".jp-OutputArea-output").first.wait_for(timeout=300_000)
        errors = page.locator(
            ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'], "
            ".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']"
        )
        assert errors.count() == 0, errors.first.inner_text()
        assert page.locator(".jp-OutputArea-output img").count() >= 4  # figures rendered
        assert page.locator(".jp-OutputArea audio").count() >= 3  # noisy, enhanced, clean players
        shot = ROOT / "figures" / "browser_02_model.png"
        shot.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(shot), full_page=False)
        browser.close()
