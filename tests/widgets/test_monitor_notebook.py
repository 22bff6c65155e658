"""What a saved notebook keeps of the TrainingMonitor: the final loss curves as an ``image/png`` cell output.

nbclient runs the cells a user writes in a real IPython kernel (ipykernel) against the widget tests' server: one
displays a monitor over a tiny job, the next waits for the job, a third displays a monitor of the finished job
again. The notebook is saved with nbformat and read back from the file. The first cell's image is sent by the
monitor's polling thread while the second cell runs, so this also shows where a thread's display lands.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

import qubrid_lab
from tests.widgets.conftest import API_KEY, SMALL_RUN
from tests.widgets.test_monitor import JOB_SECONDS, assert_draws_both_curves

REPOSITORY = Path(qubrid_lab.__file__).parents[1]


def run_notebook(cells: list[str], path: Path) -> nbformat.NotebookNode:
    """Run ``cells`` in a fresh kernel, save the notebook at ``path`` and read it back."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    # the kernel imports the qubrid_lab these tests import, wherever the installed one points
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.getenv("PYTHONPATH")])),
    }
    client = NotebookClient(
        notebook, timeout=JOB_SECONDS, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute(env=environment)
    nbformat.write(notebook, path)
    saved = nbformat.read(path, as_version=4)
    nbformat.validate(saved)
    return saved


def images(cell: nbformat.NotebookNode) -> list[bytes]:
    return [
        base64.b64decode(output["data"]["image/png"])
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]


def test_a_saved_notebook_keeps_the_final_loss_curves_as_png(server, chat_model, facts_dataset, tmp_path):
    job = {
        "base_model": chat_model,
        "dataset_id": facts_dataset["id"],
        "task_type": "qa",
        "hyperparameters": {**SMALL_RUN, "max_steps": 3, "validation_split": 0.2, "eval_steps": 1},
    }
    connection = f"{server.url!r}, api_key={API_KEY!r}"
    saved = run_notebook(
        [
            "from qubrid_lab.widgets import TrainingMonitor\n"
            f"monitor = TrainingMonitor({connection}, job={job!r}, poll_seconds=0.2)\n"
            "running_when_shown = monitor.polling\n"
            "monitor",
            f"job = monitor.wait(timeout={JOB_SECONDS})\nprint(job['status'], running_when_shown)",
            f"TrainingMonitor({connection}, job_id=job['id'])",
        ],
        tmp_path / "monitor.ipynb",
    )
    shown, waited, again = saved.cells
    assert waited.outputs[0]["text"] == "completed True\n"  # the job ran on while the first cell ended
    for cell in (shown, again):
        widget, image = cell.outputs
        assert "application/vnd.jupyter.widget-view+json" in widget["data"]
        assert image["output_type"] == "display_data"
        assert_draws_both_curves(images(cell)[0])
    assert images(waited) == []  # the thread's image went to the monitor's cell, not to the one running
