"""``client.jobs``: fine-tuning jobs (``/v1/fine-tuning/jobs``), and following one to its end with an ETA."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from qubrid_lab.client.api_errors import RateLimitError, ServerUnavailableError
from qubrid_lab.client.job_progress import JobProgress, ProgressTracker

if TYPE_CHECKING:
    from qubrid_lab.client.api_client import Client

JOBS = "/v1/fine-tuning/jobs"
EVENTS_PAGE = 1000  # the most the events route returns at once
UNREACHABLE_SECONDS = 60.0  # how long a follower keeps retrying a server that does not answer


def _plain(hyperparameters: Any) -> dict | None:
    """A hyperparameters object (anything with ``model_dump()``, such as
    ``qubrid_lab.training.hyperparameters.Hyperparameters``) or a mapping, as the request's JSON object."""
    if hyperparameters is None or isinstance(hyperparameters, Mapping):
        return None if hyperparameters is None else dict(hyperparameters)
    if callable(getattr(hyperparameters, "model_dump", None)):
        return hyperparameters.model_dump()
    raise TypeError(f"hyperparameters: expected a dict or an object with model_dump(), got {type(hyperparameters)}")


class Jobs:
    """Create, list, read, cancel, pause and resume fine-tuning jobs; read their events and checkpoints; follow
    one live (``follow``) or block until it ends (``wait``). Jobs are the server's JSON objects, as dicts."""

    def __init__(self, client: Client):
        self._client = client

    def create(
        self,
        base_model: str,
        dataset_id: str,
        task_type: str,
        hyperparameters: Any = None,
        *,
        suffix: str | None = None,
        column_mapping: dict[str, str] | None = None,
        validation_dataset_id: str | None = None,
    ) -> dict:
        """Queue a job training ``base_model`` on dataset ``dataset_id``.

        ``task_type`` is ``qa``, ``not_qa`` or ``chat`` (a JSONL dataset); ``hyperparameters`` a dict or a
        ``Hyperparameters`` object (unset fields take the server's defaults). Every problem with the request comes
        back in one ``InvalidRequestError`` whose ``param`` names the first field at fault.
        """
        body = {
            "base_model": base_model,
            "dataset_id": dataset_id,
            "task_type": task_type,
            "hyperparameters": _plain(hyperparameters),
            "suffix": suffix,
            "column_mapping": column_mapping,
            "validation_dataset_id": validation_dataset_id,
        }
        return self._client.request(
            "POST", JOBS, json={name: value for name, value in body.items() if value is not None}
        )

    def list(self, limit: int = 20, offset: int = 0) -> list[dict]:
        """Jobs newest first, ``limit`` of them after skipping ``offset``."""
        return self._client.request("GET", JOBS, params={"limit": limit, "offset": offset})["data"]

    def get(self, job_id: str) -> dict:
        return self._client.request("GET", f"{JOBS}/{job_id}")

    def cancel(self, job_id: str) -> dict:
        """Cancel a queued or running job (a running one stops within a step); ``ConflictError`` once it ended."""
        return self._client.request("POST", f"{JOBS}/{job_id}/cancel")

    def pause(self, job_id: str) -> dict:
        """Pause a queued or running job (a running one saves a checkpoint first); it shows as ``queued`` with a
        ``status_detail`` saying it is paused."""
        return self._client.request("POST", f"{JOBS}/{job_id}/pause")

    def resume(self, job_id: str) -> dict:
        """Queue a paused job again; it continues from its newest checkpoint."""
        return self._client.request("POST", f"{JOBS}/{job_id}/resume")

    def events(self, job_id: str, after: str | None = None) -> list[dict]:
        """The job's events oldest first, all of them or only those after the event id ``after``."""
        events: list[dict] = []
        while True:
            params = {"limit": EVENTS_PAGE, **({"after": after} if after else {})}
            page = self._client.request("GET", f"{JOBS}/{job_id}/events", params=params)
            events += page["data"]
            if page["data"]:
                after = page["data"][-1]["id"]
            if not page["has_more"]:
                return events

    def checkpoints(self, job_id: str) -> list[dict]:
        """The checkpoints the job kept, newest first, each with its step, metrics and servable model id."""
        return self._client.request("GET", f"{JOBS}/{job_id}/checkpoints")["data"]

    def follow(
        self,
        job_id: str,
        *,
        poll_seconds: float = 1.0,
        timeout: float | None = None,
        stop: threading.Event | None = None,
        unreachable_seconds: float = UNREACHABLE_SECONDS,
    ) -> Iterator[JobProgress]:
        """Yield a ``JobProgress`` (steps done, total, seconds per step, ETA, new events) whenever the job changes,
        until it has finished; the last one yielded is the finished job's.

        Each poll reads the job, then only the events it has not read yet. A server that cannot be reached or
        answers 5xx/429 is retried for ``unreachable_seconds`` (each failure yields a progress whose
        ``retrying`` says why) before its error is raised; any other error (say ``NotFoundError``) is raised at
        once. ``TimeoutError`` after ``timeout`` seconds; setting ``stop`` ends the iteration early.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        tracker, cursor = ProgressTracker(), None
        failing_since: float | None = None
        job, events = self.get(job_id), None  # a job that cannot be read at first is an error at once
        shown: JobProgress | None = None
        while True:
            try:
                job = job if events is None else self.get(job_id)  # first the job: once it has finished,
                events = self.events(job_id, after=cursor)  # every one of its events is written
            except (ServerUnavailableError, RateLimitError) as exc:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > unreachable_seconds:
                    raise
                shown = tracker.update(job, [], retrying=f"{exc.message} (retrying)")
                yield shown
                events = []
            else:
                failing_since = None
                if events:
                    cursor = events[-1]["id"]
                if shown is None or events or job != shown.job or shown.retrying:
                    shown = tracker.update(job, events)
                    yield shown
                if shown.finished:
                    return
            pause = poll_seconds
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} is still {shown.status} after {timeout:g} s")
                pause = min(pause, left)
            if stop is None:
                time.sleep(pause)
            elif stop.wait(pause):
                return

    def wait(self, job_id: str, timeout: float | None = None, *, poll_seconds: float = 1.0) -> dict:
        """Block until the job has finished (completed, failed or cancelled) and return it.

        ``TimeoutError`` after ``timeout`` seconds; a server unreachable for a minute raises its error.
        """
        for progress in self.follow(job_id, poll_seconds=poll_seconds, timeout=timeout):
            pass
        return progress.job  # follow yields at least once, and the finished job last
