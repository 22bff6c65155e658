"""Uploaded datasets (CSV, or JSONL conversations): the file under ``<home>/files``, its summary in SQLite."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from qubrid_lab.data.dataset_files import dataset_suffix, inspect_dataset
from qubrid_lab.errors import ConflictError, NotFoundError
from qubrid_lab.storage.db import OWNED, Database, new_id
from qubrid_lab.storage.jobs import ACTIVE_STATUSES

INCOMING = ".incoming"  # uploads in progress; whatever is left here after a crash is deleted at start


@dataclass(frozen=True)
class DatasetRecord:
    """A stored dataset: what the API shows plus where its file lies."""

    id: str
    name: str
    filename: str
    path: Path
    size_bytes: int
    row_count: int
    columns: list[str]
    created_at: float
    owner: str | None = None  # the id of the key that uploaded it; None: the admin's


class DatasetStore:
    """Adds, lists and deletes datasets; a dataset is only recorded once its file is checked and in place."""

    def __init__(self, db: Database, files_dir: Path):
        self.db = db
        self.files_dir = Path(files_dir)

    def _record(self, row: sqlite3.Row) -> DatasetRecord:
        fields = dict(row)
        stored_as = fields.pop("stored_as")
        return DatasetRecord(**{**fields, "path": self.files_dir / stored_as, "columns": json.loads(row["columns"])})

    def incoming_file(self) -> Path:
        """A fresh path to stream an upload into (on the same disk as the store, so keeping it is a rename)."""
        folder = self.files_dir / INCOMING
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{uuid.uuid4().hex}.part"

    def clear_incoming(self) -> None:
        shutil.rmtree(self.files_dir / INCOMING, ignore_errors=True)

    def add(self, upload: Path, filename: str, name: str | None = None, owner: str | None = None) -> DatasetRecord:
        """Check the file at ``upload`` (CSV, or JSONL by its ``filename``) and keep it as a new dataset; the upload
        file is gone afterwards either way.

        Raises the data package's ``DatasetError`` (400, naming the line) when the file is not a usable dataset.
        """
        try:
            summary = inspect_dataset(upload, filename)
            dataset_id = new_id("ds")
            stored_as = f"{dataset_id}{dataset_suffix(filename)}"
            self.files_dir.mkdir(parents=True, exist_ok=True)
            os.replace(upload, self.files_dir / stored_as)
            try:
                with self.db.transaction() as connection:
                    connection.execute(
                        "INSERT INTO datasets (id, name, filename, stored_as, size_bytes, row_count, columns,"
                        " created_at, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            dataset_id,
                            name or filename,
                            filename,
                            stored_as,
                            summary.size_bytes,
                            summary.row_count,
                            json.dumps(summary.columns),
                            time.time(),
                            owner,
                        ),
                    )
            except BaseException:
                (self.files_dir / stored_as).unlink(missing_ok=True)
                raise
        finally:
            upload.unlink(missing_ok=True)
        return self.get(dataset_id)

    def get(self, dataset_id: str, scope: str | None = None) -> DatasetRecord:
        """The dataset, if ``scope`` (an owner id; None: everyone's) may see it; else 404."""
        with self.db.connect() as connection:
            row = connection.execute(
                f"SELECT * FROM datasets WHERE id = ? AND {OWNED}", (dataset_id, scope, scope)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"No dataset '{dataset_id}'.", param="dataset_id")
        return self._record(row)

    def find(self, dataset_id: str, scope: str | None = None) -> DatasetRecord | None:
        try:
            return self.get(dataset_id, scope)
        except NotFoundError:
            return None

    def all(self, scope: str | None = None) -> list[DatasetRecord]:
        """Every dataset ``scope`` may see, newest first."""
        with self.db.connect() as connection:
            rows = connection.execute(
                f"SELECT * FROM datasets WHERE {OWNED} ORDER BY created_at DESC, rowid DESC", (scope, scope)
            ).fetchall()
        return [self._record(row) for row in rows]

    def delete(self, dataset_id: str, scope: str | None = None) -> None:
        """Forget the dataset and delete its file; refused while a queued or running job trains on it."""
        marks = ", ".join("?" * len(ACTIVE_STATUSES))
        with self.db.transaction() as connection:
            row = connection.execute(
                f"SELECT stored_as FROM datasets WHERE id = ? AND {OWNED}", (dataset_id, scope, scope)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"No dataset '{dataset_id}'.", param="dataset_id")
            users = connection.execute(
                "SELECT id, status FROM jobs WHERE (dataset_id = ? OR validation_dataset_id = ?)"
                f" AND status IN ({marks}) ORDER BY created_at",
                (dataset_id, dataset_id, *ACTIVE_STATUSES),
            ).fetchall()
            if users:
                jobs = ", ".join(f"{job['id']} ({job['status']})" for job in users)
                raise ConflictError(
                    f"Dataset '{dataset_id}' is in use by fine-tuning job {jobs}; cancel the job or wait for it to "
                    "finish, then delete the dataset.",
                    param="dataset_id",
                )
            connection.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,))
        (self.files_dir / row["stored_as"]).unlink(missing_ok=True)
