"""The SQLite file: migrations from nothing, data that survives reopening, two writers at once, and the
connections kept open between uses (reads stay fresh, threads never share one, a failed use leaves none broken).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from qubrid_lab.errors import InternalError
from qubrid_lab.storage.datasets import DatasetStore
from qubrid_lab.storage.db import IDLE_CONNECTIONS, MIGRATIONS, Database
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
    job = JobStore(first).create(
        base_model="m",
        dataset_id=dataset.id,
        task_type="qa",
        hyperparameters={"epochs": 1},
        column_mapping=None,
        suffix="s",
    )

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
    job = jobs.create(
        base_model="m", dataset_id=dataset.id, task_type="qa", hyperparameters={}, column_mapping=None, suffix=None
    )
    writer = textwrap.dedent(f"""
        import time
        from qubrid_lab.storage.db import Database
        from qubrid_lab.storage.jobs import JobStore
        jobs = JobStore(Database({str(db.path)!r}))
        for step in range(150):
            jobs.record({job.id!r}, "metrics", f"worker {{step}}", {{"step": step}}, steps_completed=step)
            time.sleep(0.002)  # a worker writes between steps: a burst of writes could keep the other out throughout
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


@pytest.fixture
def db(tmp_path) -> Database:
    db = Database(tmp_path / "lab.sqlite3")
    db.migrate()
    yield db
    db.close()


def new_job(db: Database):
    dataset = DatasetStore(db, db.path.parent / "files").add(write_csv(db.path.parent), "facts.csv")
    return JobStore(db).create(
        base_model="m", dataset_id=dataset.id, task_type="qa", hyperparameters={}, column_mapping=None, suffix=None
    )


def record_in_another_process(db: Database, job_id: str, step: int) -> None:
    script = textwrap.dedent(f"""
        from qubrid_lab.storage.db import Database
        from qubrid_lab.storage.jobs import JobStore
        JobStore(Database({str(db.path)!r})).record({job_id!r}, "metrics", "from the worker", {{"step": {step}}},
                                                    steps_completed={step})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)


def test_a_kept_connection_reads_what_another_process_wrote_since(db):
    """A poll reuses the connection of the poll before; it must see the worker's newest step, not an old snapshot."""
    jobs = JobStore(db)
    job = new_job(db)
    with db.connect() as first:
        pass
    for step in (1, 2):
        record_in_another_process(db, job.id, step)
        assert jobs.get(job.id).steps_completed == step
        assert jobs.events(job.id, None, 100)[0][-1].data == {"step": step}
    with db.connect() as again:
        assert again is first


def test_a_connection_moves_between_threads_but_is_never_shared(db):
    with db.connect() as here:
        pass

    def count_jobs() -> tuple[sqlite3.Connection, int]:
        with db.connect() as there:
            return there, there.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(count_jobs).result() == (here, 0)

    users = IDLE_CONNECTIONS + 2
    all_inside = threading.Barrier(users)

    def hold() -> sqlite3.Connection:
        with db.connect() as connection:
            all_inside.wait(timeout=30)
            connection.execute("SELECT 1").fetchone()
            return connection

    with ThreadPoolExecutor(users) as pool:
        held = list(pool.map(lambda _: hold(), range(users)))
    assert len({id(connection) for connection in held}) == users  # each thread had its own

    def is_open(connection: sqlite3.Connection) -> bool:
        try:
            connection.execute("SELECT 1")
        except sqlite3.ProgrammingError:
            return False
        return True

    assert sum(map(is_open, held)) == IDLE_CONNECTIONS  # the extra ones were closed when they came back


def test_a_failed_write_is_rolled_back_and_the_next_write_works(db):
    with pytest.raises(RuntimeError), db.transaction() as failed:
        failed.execute(
            "INSERT INTO jobs (id, status, base_model, dataset_id, task_type, hyperparameters, "
            "created_at) VALUES ('ftjob-x', 'queued', 'm', 'ds-x', 'qa', '{}', 0)"
        )
        raise RuntimeError("the caller's own error")
    with db.transaction() as next_write:
        assert next_write is failed  # reused, and not left inside the failed transaction
        assert next_write.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0

    with pytest.raises(sqlite3.OperationalError), db.connect() as broken:
        broken.execute("SELECT * FROM no_such_table")
    with db.connect() as fresh:
        assert fresh is not broken  # an SQLite error may leave anything behind: that connection is closed


def test_a_write_that_sqlite_rolled_back_itself_fails_with_its_own_error(db):
    with db.transaction() as connection:
        connection.execute("CREATE TRIGGER no_jobs BEFORE INSERT ON jobs BEGIN SELECT RAISE(ROLLBACK, 'no jobs'); END")
    with pytest.raises(sqlite3.IntegrityError, match="no jobs"):  # not "cannot rollback - no transaction is active"
        new_job(db)


def test_a_read_transaction_left_open_is_not_handed_on(db):
    """A stale snapshot must not outlive the use that began it (say, one that failed between BEGIN and COMMIT)."""
    with pytest.raises(RuntimeError), db.connect() as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM jobs").fetchone()
        raise RuntimeError("failed half-way through a read")
    job = new_job(db)
    jobs, total = JobStore(db).page(10, 0)
    assert total == 1 and [j.id for j in jobs] == [job.id]


def test_closing_leaves_everything_in_the_one_file_and_the_database_usable(db):
    job = new_job(db)
    wal = db.path.with_name(db.path.name + "-wal")
    assert wal.exists()  # kept while connections are open
    db.close()
    assert not wal.exists()  # checkpointed: the .sqlite3 file alone holds every commit
    with sqlite3.connect(db.path) as raw:
        assert raw.execute("SELECT id FROM jobs").fetchall() == [(job.id,)]
    assert JobStore(db).get(job.id) == job


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection(db):
    """SQLite forbids using a connection across fork; a child that inherited the pool must not take from it."""
    with db.connect() as parents:
        pass
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        code = 1
        try:
            with db.connect() as childs:
                if childs is not parents and childs.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0:
                    code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with db.connect() as again:
        assert again is parents
