"""The fine-tuning notebook in a real browser: JupyterLab on loopback, driven in headless Chromium by Playwright.

It runs ``notebooks/02_finetune_lora.ipynb`` top to bottom the way a user's "Run All" does, then checks what a
user would see: every widget rendered (no "Error displaying widget"), the loss plot holding a point per training
step, and no cell ending in an error. A screenshot of the page is saved (``QUBRID_LAB_SCREENSHOTS`` names the
folder; default: the test's temporary directory) and its path printed.

Playwright's own browser download does not work here, so it drives the system's Chromium: Debian's
``chromium`` package (``apt-get install chromium``), or the executable named by ``QUBRID_LAB_CHROMIUM``.
Without one the test is skipped, saying so.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import free_port, model_cache_home

pytestmark = pytest.mark.browser

NOTEBOOKS = Path(__file__).parents[2] / "notebooks"
NOTEBOOK = "02_finetune_lora.ipynb"
CHROMIUM = os.environ.get("QUBRID_LAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
STARTUP_SECONDS = 120
RUN_SECONDS = 1500  # the whole notebook on a busy 2-core CPU (training is most of it); never a timing assertion


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab serving a copy of ``notebooks/`` (so the run's outputs stay out of the repository)."""
    root = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, root, ignore=shutil.ignore_patterns("conftest.py", "__pycache__", ".ipynb_checkpoints"))
    home = tmp_path / "home"
    home.mkdir()
    cache = model_cache_home() / "models"
    cache.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(cache, target_is_directory=True)
    port, token = free_port(), secrets.token_hex(16)
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("QUBRID_LAB_API_KEYS", "QUBRID_LAB_API_KEY_FILE", "QUBRID_LAB_MODELS")
    }
    environment.update(
        {
            "QUBRID_LAB_HOME": str(home),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
        }
    )
    # JupyterLab 4 renders only the cells in view by default; the test reads every cell, so all are rendered.
    settings = tmp_path / "lab-settings"
    (settings / "@jupyterlab" / "notebook-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        '{"windowingMode": "none"}'
    )
    log_path = tmp_path / "jupyterlab.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                "--allow-root",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={port}",
                f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={root}",
                f"--LabApp.user_settings_dir={settings}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not _answers(f"{url}/api/status?token={token}"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url, token
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # its kernels, and their qubrid_lab servers, go with it
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium: install Debian's `chromium` package, or set QUBRID_LAB_CHROMIUM to a Chromium executable",
)
def test_the_fine_tuning_notebook_runs_in_jupyterlab_and_its_widgets_render(jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright

    url, token = jupyterlab
    screenshots = Path(os.environ.get("QUBRID_LAB_SCREENSHOTS") or tmp_path)
    screenshots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={token}")
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=STARTUP_SECONDS * 1000)
            _wait_for(lambda: _kernel_state(url, token) == "idle", STARTUP_SECONDS, "the notebook's kernel to start")

            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            code_cells = page.locator(".jp-Notebook .jp-CodeCell").count()
            _wait_for(lambda: _finished(page, url, token, code_cells), RUN_SECONDS, "the notebook to run")

            page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
            shot = screenshots / "jupyterlab-02_finetune_lora.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")

            assert page.get_by_text("Error displaying widget").count() == 0
            for widget in ("Upload to server", "Create job", "Cancel", "Send"):  # profiler, form, monitor, playground
                assert page.get_by_role("button", name=widget).first.is_visible(), f"no '{widget}' button shown"
            plot = page.locator(".js-plotly-plot").first
            assert "step" in plot.locator(".xtitle").text_content() and "loss" in plot.locator(".ytitle").text_content()
            training_points = plot.locator(".scatterlayer .trace").nth(0).locator("path.point")
            validation_points = plot.locator(".scatterlayer .trace").nth(1).locator("path.point")
            assert training_points.count() == 14 and validation_points.count() >= 2  # 14 steps, every 2 evaluated
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()


def _kernel_state(url: str, token: str) -> str | None:
    kernels = httpx.get(f"{url}/api/kernels", params={"token": token}, timeout=10).json()
    return kernels[0]["execution_state"] if kernels else None


def _finished(page, url: str, token: str, code_cells: int) -> bool:
    """True once every code cell ran and the kernel is idle; fails the test at the first cell that raised."""
    errors = page.locator(
        ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']", has_text="Traceback"
    )
    if errors.count():
        pytest.fail(f"a cell raised:\n{errors.first.inner_text()}")
    prompts = page.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()
    ran = [prompt for prompt in prompts if prompt.strip("[]: ").isdigit()]
    return len(ran) == code_cells and _kernel_state(url, token) == "idle"


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} after {seconds} s")
        time.sleep(2)
