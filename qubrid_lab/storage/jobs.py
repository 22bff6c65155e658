"""Fine-tuning jobs, their event log and the fine-tuned models they produce, in SQLite.

Status changes are compare-and-set (``UPDATE ... WHERE status IN (...)``), so a cancel racing a completion,
or a server thread racing a worker process, can never move a job out of a final status.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from qubrid_lab.errors import InvalidRequestError, NotFoundError
from qubrid_lab.storage.db import OWNED, Database, new_id

# a job's result file (OpenAI's step metrics CSV): its columns, and the event fields they come from
METRICS_COLUMNS = (
    "step",
    "train_loss",
    "valid_loss",
    "valid_mean_token_accuracy",
    "learning_rate",
    "grad_norm",
    "tokens",
    "tokens_per_second",
)
METRICS_NAMES = {
    "training_loss": "train_loss",
    "validation_loss": "valid_loss",
    "validation_mean_token_accuracy": "valid_mean_token_accuracy",
}
ACTIVE_STATUSES = ("queued", "running", "paused")  # not finished: cancellable, and their dataset is in use
FINAL_STATUSES = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class JobRecord:
    """One row of ``jobs``; JSON columns decoded, times in seconds since the epoch."""

    id: str
    status: str
    base_model: str
    dataset_id: str
    task_type: str
    hyperparameters: dict
    column_mapping: dict[str, str] | None
    suffix: str | None
    fine_tuned_model: str | None
    training_loss: float | None
    validation_loss: float | None
    steps_completed: int
    epochs_completed: float
    total_steps: int | None
    error: str | None
    created_at: float
    started_at: float | None
    completed_at: float | None
    owner: str | None = None  # the id of the key that created it; None: the admin's
    validation_dataset_id: str | None = None  # validated on this dataset instead of a split of the training one

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        fields = dict(row)
        fields["hyperparameters"] = json.loads(fields["hyperparameters"])
        fields["column_mapping"] = json.loads(fields["column_mapping"]) if fields["column_mapping"] else None
        return cls(**fields)


@dataclass(frozen=True)
class EventRecord:
    """One line of a job's log: a status message or a metrics record (``data`` holds the numbers)."""

    id: str
    job_id: str
    created_at: float
    level: str
    type: str
    message: str
    data: dict

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> EventRecord:
        fields = dict(row)
        del fields["seq"]
        return cls(**{**fields, "data": json.loads(fields["data"])})


@dataclass(frozen=True)
class FineTunedModelRecord:
    """A fine-tuned model: the LoRA adapter a completed job wrote, servable on its base model."""

    id: str
    base_model: str
    job_id: str
    status: str
    adapter_dir: Path
    created_at: float
    owner: str | None = None  # the job's owner

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> FineTunedModelRecord:
        return cls(**{**dict(row), "adapter_dir": Path(row["adapter_dir"])})


def _no_job(job_id: str) -> NotFoundError:
    return NotFoundError(f"No fine-tuning job '{job_id}'.", param="job_id")


def _insert_event(
    connection: sqlite3.Connection, job_id: str, type_: str, message: str, data: dict | None = None, level: str = "info"
) -> None:
    connection.execute(
        "INSERT INTO job_events (id, job_id, created_at, level, type, message, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (new_id("ftevent"), job_id, time.time(), level, type_, message, json.dumps(data or {})),
    )


class JobStore:
    """Reads and writes jobs, events and fine-tuned models; each method borrows one connection for its work."""

    def __init__(self, db: Database):
        self.db = db

    # --- jobs ---------------------------------------------------------------------------------------

    def create(
        self,
        *,
        base_model: str,
        dataset_id: str,
        task_type: str,
        hyperparameters: dict,
        column_mapping: dict[str, str] | None,
        suffix: str | None,
        owner: str | None = None,
        validation_dataset_id: str | None = None,
    ) -> JobRecord:
        """A new queued job; fails if a dataset was deleted since the request was validated."""
        job_id = new_id("ftjob")
        with self.db.transaction() as connection:
            for field, used in (("dataset_id", dataset_id), ("validation_dataset_id", validation_dataset_id)):
                if (
                    used
                    and not connection.execute(
                        f"SELECT 1 FROM datasets WHERE id = ? AND {OWNED}", (used, owner, owner)
                    ).fetchone()
                ):
                    raise InvalidRequestError(f"{field}: no dataset '{used}'.", param=field)
            connection.execute(
                "INSERT INTO jobs (id, status, base_model, dataset_id, task_type, hyperparameters, column_mapping,"
                " suffix, created_at, owner, validation_dataset_id) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    base_model,
                    dataset_id,
                    task_type,
                    json.dumps(hyperparameters),
                    json.dumps(column_mapping) if column_mapping else None,
                    suffix,
                    time.time(),
                    owner,
                    validation_dataset_id,
                ),
            )
            _insert_event(connection, job_id, "message", f"Created fine-tuning job {job_id}; it is queued.")
        return self.get(job_id)

    def get(self, job_id: str, scope: str | None = None) -> JobRecord:
        """The job, if ``scope`` (an owner id; None: everyone's) may see it; else 404."""
        with self.db.connect() as connection:
            row = connection.execute(f"SELECT * FROM jobs WHERE id = ? AND {OWNED}", (job_id, scope, scope)).fetchone()
        if row is None:
            raise _no_job(job_id)
        return JobRecord.from_row(row)

    def find(self, job_id: str, scope: str | None = None) -> JobRecord | None:
        try:
            return self.get(job_id, scope)
        except NotFoundError:
            return None

    def page(self, limit: int, offset: int, scope: str | None = None) -> tuple[list[JobRecord], int]:
        """Jobs ``scope`` may see newest first, ``limit`` of them after skipping ``offset``, and how many in all."""
        with self.db.connect() as connection:
            connection.execute("BEGIN")
            total = connection.execute(f"SELECT COUNT(*) FROM jobs WHERE {OWNED}", (scope, scope)).fetchone()[0]
            rows = connection.execute(
                f"SELECT * FROM jobs WHERE {OWNED} ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
                (scope, scope, limit, offset),
            ).fetchall()
            connection.execute("COMMIT")
        return [JobRecord.from_row(row) for row in rows], total

    def page_after(self, after: str | None, limit: int, scope: str | None = None) -> tuple[list[JobRecord], bool]:
        """Jobs ``scope`` may see newest first, those older than job ``after`` when given, and whether more follow
        (OpenAI's cursor paging)."""
        with self.db.connect() as connection:
            cursor = (float("inf"), 2**63 - 1)
            if after:
                row = connection.execute(
                    f"SELECT created_at, rowid FROM jobs WHERE id = ? AND {OWNED}", (after, scope, scope)
                ).fetchone()
                if row is None:
                    raise InvalidRequestError(f"after: no fine-tuning job '{after}'.", param="after")
                cursor = (row[0], row[1])
            rows = connection.execute(
                f"SELECT * FROM jobs WHERE {OWNED} AND (created_at < ? OR (created_at = ? AND rowid < ?))"
                " ORDER BY created_at DESC, rowid DESC LIMIT ?",
                (scope, scope, cursor[0], cursor[0], cursor[1], limit + 1),
            ).fetchall()
        return [JobRecord.from_row(row) for row in rows[:limit]], len(rows) > limit

    def with_status(self, status: str) -> list[JobRecord]:
        """Jobs in ``status``, oldest first (the order the queue serves them)."""
        with self.db.connect() as connection:
            rows = connection.execute(
                "SELECT * FROM jobs WHERE status = ? ORDER BY created_at, rowid", (status,)
            ).fetchall()
        return [JobRecord.from_row(row) for row in rows]

    def transition(
        self,
        job_id: str,
        expected: tuple[str, ...],
        status: str,
        *,
        message: str | None = None,
        level: str = "info",
        **fields,
    ) -> bool:
        """Move the job to ``status`` (setting ``fields``) only if it is in one of ``expected``; log ``message``."""
        assignments = ", ".join(["status = ?", *(f"{name} = ?" for name in fields)])
        marks = ", ".join("?" * len(expected))
        with self.db.transaction() as connection:
            moved = (
                connection.execute(
                    f"UPDATE jobs SET {assignments} WHERE id = ? AND status IN ({marks})",
                    (status, *fields.values(), job_id, *expected),
                ).rowcount
                == 1
            )
            if moved and message:
                _insert_event(connection, job_id, "message", message, level=level)
        return moved

    def record(
        self,
        job_id: str,
        type_: str,
        message: str,
        data: dict | None = None,
        *,
        level: str = "info",
        while_running: bool = False,
        **metrics,
    ) -> None:
        """Log an event and, in the same transaction, update the job's metric columns given in ``metrics``.

        With ``while_running`` (a worker's reports) nothing is written once the job has left ``running``: a
        cancelled job's record stays as it was when it was cancelled, though its worker may finish a step. A
        paused job's is written: what its worker does before it stops (a step, the checkpoint it resumes from)
        is kept.
        """
        with self.db.transaction() as connection:
            if while_running:
                row = connection.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None or row["status"] not in ("running", "paused"):
                    return
            if metrics:
                assignments = ", ".join(f"{name} = ?" for name in metrics)
                connection.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*metrics.values(), job_id))
            _insert_event(connection, job_id, type_, message, data, level)

    def set_error(self, job_id: str, error: str) -> None:
        """Record why the job failed, unless a reason is already recorded (the first one is the cause)."""
        with self.db.transaction() as connection:
            connection.execute("UPDATE jobs SET error = ? WHERE id = ? AND error IS NULL", (error, job_id))

    def counts(self) -> dict[str, int]:
        with self.db.connect() as connection:
            rows = connection.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {status: count for status, count in rows}

    # --- events -------------------------------------------------------------------------------------

    def trained_tokens(self, job_id: str) -> int:
        """Tokens the job's training steps have trained on (every epoch's)."""
        with self.db.connect() as connection:
            row = connection.execute(
                "SELECT SUM(json_extract(data, '$.tokens')) FROM job_events WHERE job_id = ? AND type = 'metrics'",
                (job_id,),
            ).fetchone()
        return int(row[0] or 0)

    def metrics_csv(self, job_id: str) -> str:
        """The job's step metrics as OpenAI's result file: a row per step, empty cells where none was measured."""
        with self.db.connect() as connection:
            rows = connection.execute(
                "SELECT data FROM job_events WHERE job_id = ? AND type = 'metrics' ORDER BY seq", (job_id,)
            ).fetchall()
        by_step: dict[int, dict] = {}
        for row in rows:
            data = json.loads(row["data"])
            by_step.setdefault(data["step"], {"step": data["step"]}).update(
                {
                    METRICS_NAMES.get(name, name): value
                    for name, value in data.items()
                    if METRICS_NAMES.get(name, name) in METRICS_COLUMNS
                }
            )
        out = io.StringIO()
        writer = csv.DictWriter(out, METRICS_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(by_step[step] for step in sorted(by_step))
        return out.getvalue()

    def events(
        self, job_id: str, after: str | None, limit: int, scope: str | None = None, newest_first: bool = False
    ) -> tuple[list[EventRecord], bool]:
        """The job's events in the order they happened, those after the event ``after`` when given; with
        ``newest_first`` (OpenAI's order), the latest first, those before ``after``."""
        with self.db.connect() as connection:
            if not connection.execute(
                f"SELECT 1 FROM jobs WHERE id = ? AND {OWNED}", (job_id, scope, scope)
            ).fetchone():
                raise _no_job(job_id)
            since = 2**63 - 1 if newest_first else 0
            if after:
                row = connection.execute(
                    "SELECT seq FROM job_events WHERE id = ? AND job_id = ?", (after, job_id)
                ).fetchone()
                if row is None:
                    raise InvalidRequestError(f"after: job {job_id} has no event '{after}'.", param="after")
                since = row["seq"]
            rows = connection.execute(
                "SELECT * FROM job_events WHERE job_id = ? AND "
                + ("seq < ? ORDER BY seq DESC" if newest_first else "seq > ? ORDER BY seq")
                + " LIMIT ?",
                (job_id, since, limit + 1),
            ).fetchall()
        return [EventRecord.from_row(row) for row in rows[:limit]], len(rows) > limit

    # --- fine-tuned models --------------------------------------------------------------------------

    def complete(self, job_id: str, model: FineTunedModelRecord, message: str, **metrics) -> bool:
        """Mark a running job completed and register its model, atomically; False if it was no longer running."""
        with self.db.transaction() as connection:
            assignments = ", ".join(f"{name} = ?" for name in metrics)
            moved = (
                connection.execute(
                    f"UPDATE jobs SET status = 'completed', fine_tuned_model = ?, completed_at = ?"
                    f"{', ' + assignments if assignments else ''} WHERE id = ? AND status = 'running'",
                    (model.id, model.created_at, *metrics.values(), job_id),
                ).rowcount
                == 1
            )
            if moved:
                connection.execute(
                    "INSERT INTO fine_tuned_models (id, base_model, job_id, status, adapter_dir, created_at, owner)"
                    " SELECT ?, ?, ?, ?, ?, ?, owner FROM jobs WHERE id = ?",
                    (
                        model.id,
                        model.base_model,
                        model.job_id,
                        model.status,
                        str(model.adapter_dir),
                        model.created_at,
                        job_id,
                    ),
                )
                _insert_event(connection, job_id, "message", message)
        return moved

    def models(self, scope: str | None = None) -> list[FineTunedModelRecord]:
        """Fine-tuned models ``scope`` may see, newest first."""
        with self.db.connect() as connection:
            rows = connection.execute(
                f"SELECT * FROM fine_tuned_models WHERE {OWNED} ORDER BY created_at DESC, rowid DESC", (scope, scope)
            ).fetchall()
        return [FineTunedModelRecord.from_row(row) for row in rows]

    def model_owners(self) -> dict[str, str | None]:
        """Each fine-tuned model's owner id, for filtering the served models by key."""
        with self.db.connect() as connection:
            return {row["id"]: row["owner"] for row in connection.execute("SELECT id, owner FROM fine_tuned_models")}

    def get_model(self, model_id: str, scope: str | None = None) -> FineTunedModelRecord:
        with self.db.connect() as connection:
            row = connection.execute(
                f"SELECT * FROM fine_tuned_models WHERE id = ? AND {OWNED}", (model_id, scope, scope)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"No fine-tuned model '{model_id}'.", param="model_id")
        return FineTunedModelRecord.from_row(row)

    def delete_model(self, model_id: str, scope: str | None = None) -> FineTunedModelRecord:
        """Remove the model's row and return it (its files are the caller's to delete)."""
        with self.db.transaction() as connection:
            row = connection.execute(
                f"SELECT * FROM fine_tuned_models WHERE id = ? AND {OWNED}", (model_id, scope, scope)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"No fine-tuned model '{model_id}'.", param="model_id")
            connection.execute("DELETE FROM fine_tuned_models WHERE id = ?", (model_id,))
            _insert_event(connection, row["job_id"], "message", f"Fine-tuned model {model_id} was deleted.")
        return FineTunedModelRecord.from_row(row)
