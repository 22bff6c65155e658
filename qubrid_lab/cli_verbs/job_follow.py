"""Following a fine-tuning job in the terminal: a progress bar (steps, live loss, ETA) and the job's messages.

Everything goes to stderr, so stdout keeps only what a script reads (the model id, or the job's JSON). Ctrl-C
either cancels the job (``finetune``, which started it) or only stops following it (``jobs follow``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from qubrid_lab.cli_verbs.terminal import duration, print_json
from qubrid_lab.client.api_errors import ConflictError

if TYPE_CHECKING:
    from qubrid_lab.client import Client, JobProgress

POLL_SECONDS = 1.0
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps{postfix}"


def follow_job(client: Client, job_id: str, *, cancel_on_interrupt: bool) -> JobProgress:
    """Show the job's progress until it ends and return the last progress, the finished job's.

    Ctrl-C asks the server to cancel the job when ``cancel_on_interrupt``, else leaves it running; either way it
    says so and lets ``KeyboardInterrupt`` end the command (exit status 130).
    """
    from tqdm import tqdm

    bar = tqdm(total=None, file=sys.stderr, bar_format=BAR_FORMAT, desc="following", dynamic_ncols=True)
    try:
        for progress in client.jobs.follow(job_id, poll_seconds=POLL_SECONDS):
            for event in progress.events:
                if event["type"] == "message":
                    bar.write(f"{_time_of_day(event['created_at'])}  {event['message']}", file=sys.stderr)
            _show(bar, progress)
    except KeyboardInterrupt:
        bar.close()
        _interrupted(client, job_id, cancel=cancel_on_interrupt)
        raise
    finally:
        bar.close()
    return progress


def _interrupted(client: Client, job_id: str, *, cancel: bool) -> None:
    """After Ctrl-C: cancel the job, or say that it keeps running."""
    if not cancel:
        print(
            f"stopped following; job {job_id} keeps running (`qubrid-lab jobs cancel {job_id}` stops it)",
            file=sys.stderr,
        )
        return
    print(f"interrupted: cancelling job {job_id}", file=sys.stderr)
    try:
        print(f"job {job_id} is {client.jobs.cancel(job_id)['status']}", file=sys.stderr)
    except ConflictError as exc:  # it ended meanwhile
        print(exc.message, file=sys.stderr)


def _time_of_day(iso: str) -> str:
    """``12:00:00`` of the server's ``2025-01-31T12:00:00.250Z``, in local time."""
    from datetime import datetime

    from qubrid_lab.client.job_progress import timestamp

    return datetime.fromtimestamp(timestamp(iso)).strftime("%H:%M:%S")


def _show(bar, progress: JobProgress) -> None:
    """The bar at this progress: status, steps done of the total, the newest losses and the time left."""
    bar.total = progress.total_steps
    bar.n = progress.steps_done
    bar.set_description_str(progress.status, refresh=False)
    shown = [
        f"{label} {progress.metrics[name]:.4f}"
        for name, label in (("training_loss", "loss"), ("validation_loss", "val loss"))
        if name in progress.metrics
    ]
    if not progress.finished:
        shown.append(f"ETA {duration(progress.eta_seconds)}")
    if progress.retrying:
        shown.append(progress.retrying)
    bar.set_postfix_str(", ".join(shown), refresh=False)
    bar.refresh()


def report_finished(progress: JobProgress, *, as_json: bool) -> int:
    """Say on stderr how the job ended, print its JSON (``as_json``) or its fine-tuned model's id on stdout, and
    return the command's exit status: 0 once completed, 1 otherwise."""
    job, job_id, status = progress.job, progress.job["id"], progress.status
    if status == "completed":
        took = f" in {duration(progress.elapsed_seconds)}" if progress.elapsed_seconds is not None else ""
        metrics = job["training_metrics"]
        loss = f", final training loss {metrics['training_loss']:.4f}" if metrics.get("training_loss") else ""
        print(
            f"job {job_id} completed: {metrics['steps_completed']} steps{took}{loss}; "
            f"fine-tuned model {job['fine_tuned_model']}",
            file=sys.stderr,
        )
    elif status == "failed":
        print(f"error: job {job_id} failed: {job.get('error') or 'no reason given'}", file=sys.stderr)
    else:
        print(f"job {job_id} was {status}", file=sys.stderr)
    if as_json:
        print_json(job)
    elif job["fine_tuned_model"]:
        print(job["fine_tuned_model"])
    return 0 if status == "completed" else 1
