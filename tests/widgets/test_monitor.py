"""TrainingMonitor: a live loss plot fed by the events endpoint, progress, cancel, attaching to any job, and the
PNG of the final curves (what a saved notebook keeps: tests/widgets/test_monitor_notebook.py)."""

from __future__ import annotations

import io
import threading
import time

import pytest
from PIL import Image

from qubrid_lab.widgets import HyperparameterForm, TrainingMonitor
from qubrid_lab.widgets.loss_image import CURVES
from tests.widgets.conftest import SMALL_RUN

JOB_SECONDS = 240  # bound for a tiny job on a busy 2-core machine; never a timing assertion


def assert_draws_both_curves(png: bytes) -> None:
    """``png`` is the monitor's 800x360 image of a job of a few steps, both loss curves in the live plot's colours."""
    image = Image.open(io.BytesIO(png))
    assert (image.format, image.size) == ("PNG", (800, 360))
    pixels = {colour: count for count, colour in image.convert("RGB").getcolors(image.width * image.height)}
    for key, (_, colour) in CURVES.items():
        # three points joined make well over a hundred pixels, even half hidden under the other curve; a legend
        # entry and a single point make fewer
        assert pixels.get(tuple(bytes.fromhex(colour[1:])), 0) > 120, f"no {key} curve drawn"


def wait_until(condition, what: str, seconds: float = JOB_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def finished(server, facts_dataset):
    """A 3-step job with a validation loss at every step, created by the form and followed to its end."""
    form = HyperparameterForm(server, dataset_id=facts_dataset["id"])
    form.update(**SMALL_RUN, max_steps=3, validation_split=0.2, eval_steps=1, suffix="widgets")
    job = form.submit()
    monitor = TrainingMonitor(server, job_id=job["id"], poll_seconds=0.2)
    assert monitor.polling and not monitor.cancel_button.disabled
    started = time.monotonic()
    done = monitor.wait(timeout=JOB_SECONDS)
    return monitor, done, time.monotonic() - started


def test_the_plot_has_a_point_per_step_for_both_losses(finished):
    monitor, job, _ = finished
    assert job["status"] == "completed", job
    training, validation = monitor.figure.data
    assert (training.name, validation.name) == ("training loss", "validation loss")
    assert list(training.x) == [1, 2, 3] and list(validation.x) == [1, 2, 3]
    assert all(loss > 0 for loss in training.y + validation.y)
    assert list(training.y)[-1] == pytest.approx(job["training_metrics"]["training_loss"])
    assert monitor.figure.layout.xaxis.title.text == "step" and monitor.figure.layout.yaxis.title.text == "loss"
    # what a view opened later (a reloaded page, another front end on the kernel) is sent: the same points
    state = monitor.figure.get_state()
    assert [list(trace["x"]) for trace in state["_widget_data"]] == [[1, 2, 3], [1, 2, 3]]
    assert list(state["_widget_data"][0]["y"]) == list(training.y)
    assert state["_widget_layout"]["xaxis"]["range"] == [0, 3.5]


def test_the_ended_job_leaves_its_curves_as_a_png(finished):
    monitor, _, _ = finished
    assert_draws_both_curves(monitor.png)


def test_progress_status_and_final_metrics_follow_the_job(finished):
    monitor, job, _ = finished
    assert (monitor.progress.value, monitor.progress.max, monitor.progress.bar_style) == (3, 3, "success")
    assert monitor.eta.value.startswith("3/3 steps in ")
    assert "completed" in monitor.status.value and monitor.cancel_button.disabled
    assert job["fine_tuned_model"] in monitor.metrics.value and "training loss" in monitor.metrics.value
    assert "validation token accuracy" in monitor.metrics.value  # the other numbers the events carry
    assert {"learning_rate", "grad_norm", "tokens_per_second", "validation_mean_token_accuracy"} <= set(monitor.latest)
    assert not monitor.polling and monitor.wait(timeout=0) is job


def test_a_monitor_attaches_to_a_finished_job_and_draws_it_whole(server, finished):
    first, job, _ = finished
    again = TrainingMonitor(server, job_id=job["id"])
    assert not again.polling and again.png is not None  # read whole as it was built: a cell shows it at once
    assert again.wait(timeout=0)["status"] == "completed"
    assert again.points == first.points and list(again.figure.data[0].x) == [1, 2, 3]


def test_a_launched_job_updates_live_while_the_kernel_is_free_and_cancels(server, chat_model, facts_dataset):
    payload = {
        "base_model": chat_model,
        "dataset_id": facts_dataset["id"],
        "task_type": "qa",
        "hyperparameters": {**SMALL_RUN, "max_steps": 500},
    }
    monitor = TrainingMonitor(server, job=payload, poll_seconds=0.2)
    assert monitor.job["status"] in {"queued", "running"}
    assert threading.current_thread() is threading.main_thread()  # this test thread is not blocked: it goes on

    wait_until(lambda: len(monitor.figure.data[0].x) >= 2, "two points on the live plot")
    assert monitor.progress.max == 500 and 0 < monitor.progress.value < 500
    wait_until(lambda: "left" in monitor.eta.value, "an estimate of the time left", 30)
    wait_until(lambda: "tokens/s" in monitor.eta.value and "grad norm" in monitor.eta.value, "live step metrics", 30)

    watcher = TrainingMonitor(server, job_id=monitor.job["id"], poll_seconds=0.2)
    watcher.close()  # closing a widget stops its polling thread
    wait_until(lambda: not watcher.polling, "the closed monitor stop polling", 10)
    with pytest.raises(RuntimeError, match="closed"):
        watcher.wait(timeout=1)

    monitor.cancel_button.click()
    job = monitor.wait(timeout=60)
    assert job["status"] == "cancelled" and job["fine_tuned_model"] is None
    assert monitor.cancel_button.disabled and "cancelled" in monitor.status.value
    assert monitor.progress.bar_style == "warning"
    assert monitor.png is not None and watcher.png is None  # a closed monitor saw no end to draw


def test_problems_are_shown_instead_of_a_traceback(server, facts_dataset):
    missing = TrainingMonitor(server, job_id="ftjob-missing")
    assert not missing.polling and "ftjob-missing" in missing.status.value and missing.png is None
    with pytest.raises(RuntimeError, match="ftjob-missing"):
        missing.wait(timeout=1)

    refused = TrainingMonitor(
        server,
        job={
            "base_model": "no-such/model",
            "dataset_id": facts_dataset["id"],
            "task_type": "qa",
            "hyperparameters": {"learning_rate": 0},
        },
    )
    assert "base_model" in refused.status.value and "learning_rate" in refused.status.value
    with pytest.raises(RuntimeError, match="not in the model catalogue"):
        refused.wait(timeout=1)
    with pytest.raises(ValueError, match="job_id"):
        TrainingMonitor(server)
