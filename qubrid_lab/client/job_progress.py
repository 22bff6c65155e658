"""A fine-tuning job's progress as a follower sees it: steps done, the pace of training and the time left.

``ProgressTracker`` takes each poll's job and new events and returns a ``JobProgress``. The pace is measured
from the step events' own timestamps (written by the trainer), not from when they were read, so it holds
however often the job is polled; a run resumed from a checkpoint (its steps count from an earlier step again)
starts a new measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

FINISHED_STATUSES = frozenset({"completed", "failed", "cancelled"})


def timestamp(iso: str) -> float:
    """Seconds since the epoch of the server's ISO 8601 UTC time (``2025-01-31T12:00:00.250Z``)."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class JobProgress:
    """One poll's news about a job.

    ``job`` is the job as the server sent it; ``events`` the events that are new since the previous progress
    (oldest first); ``steps_done`` and ``total_steps`` (None until training has planned its steps) count optimizer
    steps; ``seconds_per_step`` is the training rate (None until two steps of the current run were seen);
    ``eta_seconds`` the time left at that rate (0 once the job has finished); ``metrics`` the newest value of each
    number the metrics events carried (``training_loss``, ``learning_rate``, ``tokens_per_second``, ...);
    ``retrying`` says why the last poll failed while the follower tries again (None when it succeeded).
    """

    job: dict
    events: list[dict]
    steps_done: int
    total_steps: int | None
    seconds_per_step: float | None
    eta_seconds: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    retrying: str | None = None

    @property
    def status(self) -> str:
        return self.job["status"]

    @property
    def finished(self) -> bool:
        """Whether the job has ended (completed, failed or cancelled)."""
        return self.job["status"] in FINISHED_STATUSES

    @property
    def elapsed_seconds(self) -> float | None:
        """Seconds from the start of training to the job's end; None unless both are known."""
        if not (self.job.get("started_at") and self.job.get("completed_at")):
            return None
        return timestamp(self.job["completed_at"]) - timestamp(self.job["started_at"])


class ProgressTracker:
    """Turns a job's successive polls into ``JobProgress``, remembering what earlier events said."""

    def __init__(self) -> None:
        self.total_steps: int | None = None  # from the "training started" event, before the job record has it
        self.metrics: dict[str, float] = {}
        self._run_start: tuple[int, float] | None = None  # (step, time) where the current run of steps began
        self._last_step: tuple[int, float] | None = None

    def update(self, job: dict, events: list[dict], retrying: str | None = None) -> JobProgress:
        """The progress after ``events`` (new since the last update), with ``job`` as the server sent it now."""
        for event in events:
            data = event["data"]
            if "total_steps" in data:
                self.total_steps = data["total_steps"]
            if event["type"] != "metrics":
                continue
            if "training_loss" in data:
                self._time_step(data["step"], timestamp(event["created_at"]))
            self.metrics.update(
                {name: value for name, value in data.items() if name != "step" and isinstance(value, (int, float))}
            )
        total = job.get("total_steps") or self.total_steps
        done = job["training_metrics"]["steps_completed"]
        rate = self._seconds_per_step()
        if job["status"] in FINISHED_STATUSES:
            eta = 0.0
        else:
            eta = max(total - done, 0) * rate if total and rate is not None else None
        return JobProgress(
            job=job,
            events=list(events),
            steps_done=done,
            total_steps=total,
            seconds_per_step=rate,
            eta_seconds=eta,
            metrics=dict(self.metrics),
            retrying=retrying,
        )

    def _time_step(self, step: int, at: float) -> None:
        if self._last_step is None or step <= self._last_step[0]:
            self._run_start = (step, at)
        self._last_step = (step, at)

    def _seconds_per_step(self) -> float | None:
        if self._run_start is None or self._last_step is None or self._last_step[0] <= self._run_start[0]:
            return None
        return (self._last_step[1] - self._run_start[1]) / (self._last_step[0] - self._run_start[0])
