"""The notebooks in a real browser: JupyterLab and Notebook 7 on loopback, in headless Chromium driven by
Playwright.

The first test runs ``notebooks/02_finetune_lora.ipynb`` top to bottom in JupyterLab the way a user's "Run All"
does, then checks what a user would see: every widget rendered (no "Error displaying widget"), the loss plot
holding a point per training step, the monitor's PNG of the final curves below it, and no cell ending in an
error. It saves the notebook and reads the file: the monitor's cell holds that PNG as an ``image/png`` output.
Then it opens the same notebook in Notebook 7 (the same server serves both) on the same kernel: the widgets come
back from the kernel, the plot whole, and the image is there too.

The second, quicker one runs a monitor over a tiny job in Notebook 7 (the image reaches the monitor's cell while
the next cell runs) and again on the finished job, saves, stops the kernel and reopens the notebook in
JupyterLab, as someone would later: the widgets went with the kernel, the saved images still show the curves.

Screenshots of the pages are saved (``QUBRID_LAB_SCREENSHOTS`` names the folder; default: the test's temporary
directory) and their paths printed.

Playwright's own browser download does not work here, so it drives the system's Chromium: Debian's
``chromium`` package (``apt-get install chromium``), or the executable named by ``QUBRID_LAB_CHROMIUM``.
Without one the tests are skipped, saying so.
"""

from __future__ import annotations

import base64
import json
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
import nbformat
import pytest

from tests.e2e.conftest import free_port, model_cache_home
from tests.widgets.conftest import API_KEY, SMALL_RUN
from tests.widgets.test_monitor import assert_draws_both_curves

pytestmark = pytest.mark.browser

NOTEBOOKS = Path(__file__).parents[2] / "notebooks"
NOTEBOOK = "02_finetune_lora.ipynb"
MONITOR_CELL = "monitor = TrainingMonitor("  # how the cell that displays the monitor starts
CHROMIUM = os.environ.get("QUBRID_LAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
STARTUP_SECONDS = 120
RUN_SECONDS = 1500  # the whole notebook on a busy 2-core CPU (training is most of it); never a timing assertion


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab (and Notebook 7, whose pages the same server serves) on a copy of ``notebooks/`` (so the run's
    outputs stay out of the repository); yields its address, its token and the copy's folder."""
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
            # the kernels import the qubrid_lab under test, wherever the installed one points
            "PYTHONPATH": os.pathsep.join(filter(None, [str(NOTEBOOKS.parent), os.getenv("PYTHONPATH")])),
        }
    )
    # JupyterLab 4 and Notebook 7 render only the cells in view by default; the test reads every cell, so all are.
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
                f"--JupyterNotebookApp.user_settings_dir={settings}",
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
        yield url, token, root
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
def test_the_fine_tuning_notebook_runs_in_jupyterlab_and_renders_in_notebook_7(jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright

    url, token, root = jupyterlab
    screenshots = Path(os.environ.get("QUBRID_LAB_SCREENSHOTS") or tmp_path)
    screenshots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            # 1. JupyterLab: run every cell, as "Run All" does, and look at what it shows
            page = _open(browser, f"{url}/lab/tree/{NOTEBOOK}?token={token}")
            _wait_for(lambda: _kernel_state(url, token) == "idle", STARTUP_SECONDS, "the notebook's kernel to start")
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            code_cells = page.locator(".jp-Notebook .jp-CodeCell").count()
            _wait_for(lambda: _finished(page, url, token, code_cells), RUN_SECONDS, "the notebook to run")
            _check_the_widgets(page, screenshots / "jupyterlab-02_finetune_lora.png")

            # 2. saved, the monitor's cell keeps the final curves as a PNG output of its own
            notebook, unsaved = root / NOTEBOOK, (root / NOTEBOOK).stat().st_mtime_ns
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^File$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Save Notebook$")).click()
            _wait_for(lambda: notebook.stat().st_mtime_ns != unsaved, 60, "the notebook to be saved")
            assert_draws_both_curves(_saved_image(notebook))
            page.close()

            # 3. Notebook 7 on the same kernel: the widgets come back from it, whole, and the image is there too
            page = _open(browser, f"{url}/notebooks/{NOTEBOOK}?token={token}")
            playground = page.get_by_role("button", name="Send")  # the last widget of the notebook
            _wait_for(lambda: playground.count() > 0, STARTUP_SECONDS, "Notebook 7's widgets")
            _check_the_widgets(page, screenshots / "notebook7-02_finetune_lora.png")
        finally:
            browser.close()


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium: install Debian's `chromium` package, or set QUBRID_LAB_CHROMIUM to a Chromium executable",
)
def test_the_monitor_runs_in_notebook_7_and_its_image_outlives_the_kernel(
    jupyterlab, server, chat_model, facts_dataset, tmp_path
):
    from playwright.sync_api import sync_playwright

    url, token, root = jupyterlab
    screenshots = Path(os.environ.get("QUBRID_LAB_SCREENSHOTS") or tmp_path)
    screenshots.mkdir(parents=True, exist_ok=True)
    job = {
        "base_model": chat_model,
        "dataset_id": facts_dataset["id"],
        "task_type": "qa",
        "hyperparameters": {**SMALL_RUN, "max_steps": 3, "validation_split": 0.2, "eval_steps": 1},
    }
    connection = f"{server.url!r}, api_key={API_KEY!r}"
    cells = [
        f"from qubrid_lab.widgets import TrainingMonitor\n\n{MONITOR_CELL}{connection}, job={job!r})\nmonitor",
        "job = monitor.wait()\njob['status']",
        f"TrainingMonitor({connection}, job_id=job['id'])",  # run again on the finished job
    ]
    notebook = root / "monitor.ipynb"
    nbformat.write(
        nbformat.v4.new_notebook(
            cells=[nbformat.v4.new_code_cell(source) for source in cells],
            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        ),
        notebook,
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            # 1. Notebook 7: the job trains while the kernel runs the next cell; its image lands in the monitor's
            page = _open(browser, f"{url}/notebooks/{notebook.name}?token={token}")
            _wait_for(lambda: _kernel_state(url, token) == "idle", STARTUP_SECONDS, "the notebook's kernel to start")
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            _wait_for(lambda: _finished(page, url, token, len(cells)), RUN_SECONDS, "the notebook to run")
            _screenshot(page, screenshots / "notebook7-monitor.png")
            assert page.get_by_text("Error displaying widget").count() == 0
            shown, again = page.locator(".jp-CodeCell", has_text="TrainingMonitor(").all()
            for cell in (shown, again):
                assert cell.locator(".js-plotly-plot .scatterlayer .trace").nth(0).locator("path.point").count() == 3
                image = cell.locator(".jp-RenderedImage img")
                assert image.is_visible() and image.evaluate("img => img.naturalWidth") == 800

            # 2. saved: both cells keep the image
            unsaved = notebook.stat().st_mtime_ns
            page.keyboard.press("Control+s")
            _wait_for(lambda: notebook.stat().st_mtime_ns != unsaved, 60, "the notebook to be saved")
            saved = [cell for cell in nbformat.read(notebook, as_version=4).cells if "TrainingMonitor(" in cell.source]
            for cell in saved:
                (image,) = [output for output in cell.outputs if "image/png" in output.get("data", {})]
                assert_draws_both_curves(base64.b64decode(image["data"]["image/png"]))
            page.close()

            # 3. reopened in JupyterLab after the kernel stopped: the widgets went with it, the images stay
            for session in httpx.get(f"{url}/api/sessions", params={"token": token}, timeout=10).json():
                httpx.delete(f"{url}/api/sessions/{session['id']}", params={"token": token}, timeout=60)
            page = _open(browser, f"{url}/lab/tree/{notebook.name}?token={token}")
            images = page.locator(".jp-RenderedImage img")
            _wait_for(lambda: images.count() == 2, STARTUP_SECONDS, "the saved images")
            _screenshot(page, screenshots / "jupyterlab-reopened-monitor.png")
            assert all(image.is_visible() and image.evaluate("i => i.naturalWidth") == 800 for image in images.all())
            assert page.locator(".js-plotly-plot").count() == 0
        finally:
            browser.close()


def _open(browser, address: str):
    """A new page on ``address``, once its notebook's cells are shown."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(address)
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=STARTUP_SECONDS * 1000)
    return page


def _monitor_image(page):
    return page.locator(".jp-CodeCell", has_text=MONITOR_CELL).locator(".jp-RenderedImage img")


def _check_the_widgets(page, shot: Path) -> None:
    """Every widget of the ran notebook shows, the live plot has its points, the monitor's image is below it."""
    plot = page.locator(".js-plotly-plot").first
    training_points = plot.locator(".scatterlayer .trace").nth(0).locator("path.point")
    validation_points = plot.locator(".scatterlayer .trace").nth(1).locator("path.point")
    _wait_for(lambda: training_points.count() == 14, 60, "a point per step on the live plot")  # drawn as it renders
    plot.scroll_into_view_if_needed()
    _screenshot(page, shot)

    assert page.get_by_text("Error displaying widget").count() == 0
    for widget in ("Upload to server", "Create job", "Cancel", "Send"):  # profiler, form, monitor, playground
        assert page.get_by_role("button", name=widget).first.is_visible(), f"no '{widget}' button shown"
    assert "step" in plot.locator(".xtitle").text_content() and "loss" in plot.locator(".ytitle").text_content()
    assert validation_points.count() >= 2  # 14 steps, every 2 evaluated
    image = _monitor_image(page)
    assert image.count() == 1 and image.is_visible() and image.evaluate("img => img.naturalWidth") == 800
    assert shot.stat().st_size > 10_000


def _screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def _saved_image(path: Path) -> bytes:
    """The PNG among the outputs of the monitor's cell in the notebook file."""
    cells = json.loads(path.read_text())["cells"]
    (cell,) = [cell for cell in cells if "".join(cell["source"]).startswith(MONITOR_CELL)]
    (image,) = [output["data"]["image/png"] for output in cell["outputs"] if "image/png" in output.get("data", {})]
    return base64.b64decode(image)


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
