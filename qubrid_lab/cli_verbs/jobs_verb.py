"""``qubrid-lab jobs list | show JOB | follow JOB | cancel JOB | events JOB``: fine-tuning jobs on a server."""

from __future__ import annotations

import argparse

from qubrid_lab.cli_verbs.connection import connect
from qubrid_lab.cli_verbs.job_follow import follow_job, report_finished
from qubrid_lab.cli_verbs.terminal import print_result, table
from qubrid_lab.client.jobs_api import JOBS


def _steps(job: dict) -> str:
    return f"{job['training_metrics']['steps_completed']}/{job['total_steps'] or '?'}"


def render_jobs(page: dict) -> str:
    """A page of jobs as a table, then how many there are in all."""
    rows = [
        (job["id"], job["status"], _steps(job), job["base_model"], job["fine_tuned_model"], job["created_at"])
        for job in page["data"]
    ]
    header = ("id", "status", "steps", "base model", "fine-tuned model", "created")
    return "\n".join([*([table(header, rows)] if rows else []), f"{len(rows)} of {page['total']} job(s)"])


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        page = client.request("GET", JOBS, params={"limit": args.limit, "offset": args.offset})
    print_result(page, args.json, render_jobs)
    return 0


def render_job(job: dict) -> str:
    """A job's fields, one per line; hyperparameters on one line."""
    metrics = job["training_metrics"]
    fields = [
        ("id", job["id"]),
        ("status", job["status"] + (f" ({job['status_detail']})" if job.get("status_detail") else "")),
        ("base model", job["base_model"]),
        ("dataset", job["dataset_id"]),
        ("task type", job["task_type"]),
        ("steps", _steps(job)),
        ("epochs completed", metrics["epochs_completed"]),
        ("training loss", metrics["training_loss"]),
        ("validation loss", metrics["validation_loss"]),
        ("fine-tuned model", job["fine_tuned_model"]),
        ("error", job.get("error")),
        ("created", job["created_at"]),
        ("started", job.get("started_at")),
        ("completed", job["completed_at"]),
        ("hyperparameters", " ".join(f"{name}={value}" for name, value in job["hyperparameters"].items())),
    ]
    return table(None, [(name, value) for name, value in fields if value is not None])


def render_events(events: list[dict]) -> str:
    return "\n".join(f"{event['created_at']}  {event['level']:<7}  {event['message']}" for event in events)


def cmd_jobs_show(args: argparse.Namespace) -> int:
    with connect(args) as client:
        print_result(client.jobs.get(args.job), args.json, render_job)
    return 0


def cmd_jobs_follow(args: argparse.Namespace) -> int:
    with connect(args) as client:
        return report_finished(follow_job(client, args.job, cancel_on_interrupt=False), as_json=args.json)


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with connect(args) as client:
        print_result(client.jobs.cancel(args.job), args.json, lambda job: f"job {job['id']} is {job['status']}")
    return 0


def cmd_jobs_events(args: argparse.Namespace) -> int:
    with connect(args) as client:
        print_result(client.jobs.events(args.job), args.json, render_events)
    return 0


def add_jobs_verb(commands, parents: list[argparse.ArgumentParser]) -> None:
    jobs = commands.add_parser("jobs", parents=parents, help="list, show, follow and cancel fine-tuning jobs")
    verbs = jobs.add_subparsers(dest="jobs_command", required=True)

    def verb(name: str, run, help_text: str, *, job: bool = True) -> argparse.ArgumentParser:
        parser = verbs.add_parser(name, parents=parents, help=help_text, description=help_text)
        if job:
            parser.add_argument("job", help="the job's id (ftjob-…)")
        parser.add_argument("--json", action="store_true", help="print the API's JSON")
        parser.set_defaults(run=run)
        return parser

    listing = verb("list", cmd_jobs_list, "jobs newest first: id, status, steps, models, creation time", job=False)
    listing.add_argument("--limit", type=int, default=20, help="how many (default 20, at most 100)")
    listing.add_argument("--offset", type=int, default=0, help="skip this many of the newest first")
    verb("show", cmd_jobs_show, "one job: status, steps, losses, model, hyperparameters")
    verb(
        "follow",
        cmd_jobs_follow,
        "a progress bar until the job ends, then the fine-tuned model's id; Ctrl-C "
        "stops following and leaves the job running",
    )
    verb("cancel", cmd_jobs_cancel, "cancel a queued or running job (a running one stops within a step)")
    verb("events", cmd_jobs_events, "the job's log: time, level, message")
