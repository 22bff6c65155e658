"""The SQLite file: migrations from nothing, data that survives reopening, and two writers at once."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest

from qubrid_lab.errors import InternalError
from qubrid_lab.storage.datasets import DatasetStore
from qubrid_lab.storage.db import MIGRATIONS, Database
from qubrid_lab.storage.jobs import JobStore

TABLES = {"datasets", "jobs", "job_events", "fine_tuned_models"}


def write_csv(folder, name="facts.csv", text="question,answer\nWhat is 2+2?,4\nAnd 3+3?,6\n"):
    path = folder / name
    path.write_text(text)
    return path


def test_migrations_build_the_schema_in_a_new_file(tmp_path):
    db = Database(tmp_path / "nested" / "lab.sqlite3")
    assert db.migrate() == len(MIGRATIONS)
    with sqlite3.connect(db.path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert TABLES <= tables


def test_reopening_keeps_the_data_and_migrating_again_changes_nothing(tmp_path):
    path = tmp_path / "lab.sqlite3"
    first = Database(path)
    first.migrate()
    dataset = DatasetStore(first, tmp_path / "files").add(write_csv(tmp_path), "facts.csv")
    job = JobStore(first).create(base_model="m", dataset_id=dataset.id, task_type="qa", hyperparameters={"epochs": 1},
                                 column_mapping=None, suffix="s")

    again = Database(path)
    assert again.migrate() == len(MIGRATIONS)
    assert DatasetStore(again, tmp_path / "files").get(dataset.id) == dataset
    assert JobStore(again).get(job.id) == job


def test_a_database_from_a_newer_version_is_refused(tmp_path):
    db = Database(tmp_path / "lab.sqlite3")
    db.migrate()
    with sqlite3.connect(db.path) as raw:
        raw.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(InternalError, match="newer"):
        db.migrate()


def test_a_second_process_writes_while_this_one_does(tmp_path):
    """The server and a training worker write the same file at once; no write is lost or refused."""
    db = Database(tmp_path / "lab.sqlite3")
    db.migrate()
    dataset = DatasetStore(db, tmp_path / "files").add(write_csv(tmp_path), "facts.csv")
    jobs = JobStore(db)
    job = jobs.create(base_model="m", dataset_id=dataset.id, task_type="qa", hyperparameters={},
                      column_mapping=None, suffix=None)
    writer = textwrap.dedent(f"""
        from qubrid_lab.storage.db import Database
        from qubrid_lab.storage.jobs import JobStore
        jobs = JobStore(Database({str(db.path)!r}))
        for step in range(150):
            jobs.record({job.id!r}, "metrics", f"worker {{step}}", {{"step": step}}, steps_completed=step)
    """)
    other = subprocess.Popen([sys.executable, "-c", writer])
    written = 0
    while other.poll() is None:  # keep writing for as long as the other process does
        jobs.record(job.id, "message", f"server {written}")
        written += 1
    assert other.returncode == 0

    events, has_more = jobs.events(job.id, None, 100_000)
    assert not has_more
    assert len(events) == 1 + 150 + written  # the "created" event, then both writers' events
    assert len({event.id for event in events}) == len(events)
    kinds = [event.type for event in events]
    worker_steps = [event.data["step"] for event in events if event.type == "metrics"]
    assert worker_steps == list(range(150))  # each writer's events keep their order
    first, last = kinds.index("metrics"), len(kinds) - 1 - kinds[::-1].index("metrics")
    assert "message" in kinds[first:last]  # the writes did interleave
    assert jobs.get(job.id).steps_completed == 149
