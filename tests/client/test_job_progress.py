"""The progress a follower computes from a job's polls: steps, pace, time left, newest metrics."""

from __future__ import annotations

import pytest

from qubrid_lab.client.job_progress import ProgressTracker

START = "2025-01-31T12:00:00.000Z"


def job(status: str = "running", done: int = 0, total: int | None = None, **fields) -> dict:
    return {
        "id": "ftjob-1",
        "status": status,
        "total_steps": total,
        "training_metrics": {"steps_completed": done},
        "started_at": None,
        "completed_at": None,
        **fields,
    }


def started(total: int, event_id: str = "e0") -> dict:
    return {
        "id": event_id,
        "created_at": START,
        "type": "message",
        "message": f"Training started: {total} steps",
        "data": {"total_steps": total},
    }


def step(number: int, seconds: float, loss: float = 1.0, **data) -> dict:
    """The metrics event of optimizer step ``number``, written ``seconds`` after START."""
    created = f"2025-01-31T12:{int(seconds) // 60:02d}:{seconds % 60:06.3f}Z"
    return {
        "id": f"s{number}-{seconds}",
        "created_at": created,
        "type": "metrics",
        "message": f"Step {number}",
        "data": {"step": number, "training_loss": loss, **data},
    }


def test_the_pace_and_time_left_come_from_the_step_events_timestamps():
    tracker = ProgressTracker()
    waiting = tracker.update(job("queued"), [])
    assert waiting.steps_done == 0 and waiting.total_steps is None
    assert waiting.seconds_per_step is None and waiting.eta_seconds is None
    first = tracker.update(job(done=1), [started(10), step(1, 2.0)])
    assert first.total_steps == 10 and first.seconds_per_step is None and first.eta_seconds is None  # one step: no pace

    later = tracker.update(job(done=3, total=10), [step(2, 3.5), step(3, 5.0)])
    assert later.seconds_per_step == pytest.approx(1.5)  # steps 1 -> 3 took 3 s
    assert later.eta_seconds == pytest.approx(7 * 1.5)  # seven steps left
    assert [event["data"]["step"] for event in later.events] == [2, 3] and not later.finished


def test_a_resumed_run_measures_its_own_pace():
    tracker = ProgressTracker()
    tracker.update(job(done=4, total=10), [started(10), step(3, 1.0), step(4, 2.0)])
    resumed = tracker.update(job(done=3, total=10), [step(3, 60.0)])  # from the checkpoint at step 2, much later
    assert resumed.seconds_per_step is None and resumed.eta_seconds is None  # not the minute spent paused
    going = tracker.update(job(done=5, total=10), [step(4, 64.0), step(5, 68.0)])
    assert going.seconds_per_step == pytest.approx(4.0) and going.eta_seconds == pytest.approx(20.0)


def test_metrics_keep_the_newest_of_each_number_and_a_finished_job_has_nothing_left():
    tracker = ProgressTracker()
    tracker.update(job(done=1, total=2), [step(1, 1.0, loss=2.0, learning_rate=1e-3)])
    evaluation = {
        "id": "v1",
        "created_at": START,
        "type": "metrics",
        "message": "validation",
        "data": {"step": 1, "validation_loss": 1.8, "validation_mean_token_accuracy": 0.25},
    }
    done = tracker.update(
        job("completed", done=2, total=2, started_at=START, completed_at="2025-01-31T12:01:05Z"),
        [evaluation, step(2, 2.0, loss=1.5, learning_rate=5e-4)],
    )
    assert done.metrics == {
        "training_loss": 1.5,
        "learning_rate": 5e-4,
        "validation_loss": 1.8,
        "validation_mean_token_accuracy": 0.25,
    }
    assert done.finished and done.status == "completed" and done.eta_seconds == 0.0
    assert done.elapsed_seconds == pytest.approx(65.0)
    assert tracker.update(job("cancelled", done=1), []).eta_seconds == 0.0
