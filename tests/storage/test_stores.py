"""Datasets, jobs, events and fine-tuned models as stored: what the API layer relies on."""

from __future__ import annotations

import pytest

from qubrid_lab.data.csv_ingest import DatasetError
from qubrid_lab.errors import ConflictError, InvalidRequestError, NotFoundError
from qubrid_lab.storage.datasets import INCOMING, DatasetStore
from qubrid_lab.storage.db import Database
from qubrid_lab.storage.jobs import FineTunedModelRecord, JobStore


@pytest.fixture
def stores(tmp_path):
    db = Database(tmp_path / "lab.sqlite3")
    db.migrate()
    return DatasetStore(db, tmp_path / "files"), JobStore(db)


def upload(datasets: DatasetStore, text: str, filename: str = "facts.csv"):
    incoming = datasets.incoming_file()
    incoming.write_text(text)
    return datasets.add(incoming, filename)


def new_job(jobs: JobStore, dataset_id: str):
    return jobs.create(
        base_model="m", dataset_id=dataset_id, task_type="qa", hyperparameters={}, column_mapping=None, suffix=None
    )


def test_a_dataset_is_kept_under_the_files_dir(stores, tmp_path):
    datasets, _ = stores
    record = upload(datasets, "question,answer\nq1,a1\nq2,a2\n")
    assert record.path.parent == tmp_path / "files" and record.path.read_text().startswith("question,answer")
    assert (record.row_count, record.columns, record.name) == (2, ["question", "answer"], "facts.csv")
    assert list((tmp_path / "files" / INCOMING).iterdir()) == []


def test_a_rejected_file_leaves_nothing_behind(stores, tmp_path):
    datasets, _ = stores
    with pytest.raises(DatasetError):
        upload(datasets, "question,answer\n")
    assert [p for p in (tmp_path / "files").rglob("*") if p.is_file()] == []
    assert datasets.all() == []


def test_a_dataset_in_use_cannot_be_deleted_until_its_job_ends(stores):
    datasets, jobs = stores
    record = upload(datasets, "question,answer\nq,a\n")
    job = new_job(jobs, record.id)
    with pytest.raises(ConflictError, match=job.id):
        datasets.delete(record.id)
    assert jobs.transition(job.id, ("queued",), "running")
    with pytest.raises(ConflictError, match="running"):
        datasets.delete(record.id)
    assert jobs.transition(job.id, ("running",), "failed", error="boom")
    datasets.delete(record.id)
    assert not record.path.exists()
    with pytest.raises(NotFoundError):
        datasets.get(record.id)


def test_a_job_on_a_deleted_dataset_is_refused(stores):
    datasets, jobs = stores
    record = upload(datasets, "question,answer\nq,a\n")
    datasets.delete(record.id)
    with pytest.raises(InvalidRequestError, match=record.id):
        new_job(jobs, record.id)


def test_status_changes_only_leave_the_expected_statuses(stores, tmp_path):
    datasets, jobs = stores
    job = new_job(jobs, upload(datasets, "question,answer\nq,a\n").id)
    assert jobs.transition(job.id, ("queued",), "running", started_at=1.0, message="Job started.")
    model = FineTunedModelRecord(f"ft:m::{job.id}", "m", job.id, "available", tmp_path / "adapter", 2.0)
    assert jobs.complete(job.id, model, "done", steps_completed=3)
    assert not jobs.transition(job.id, ("queued", "running"), "cancelled")  # a finished job stays finished
    assert not jobs.complete(job.id, model, "again")
    stored = jobs.get(job.id)
    assert (stored.status, stored.fine_tuned_model, stored.steps_completed, stored.completed_at) == (
        "completed",
        model.id,
        3,
        2.0,
    )
    assert jobs.models() == [model] and jobs.get_model(model.id) == model
    assert jobs.delete_model(model.id) == model
    assert jobs.models() == []
    with pytest.raises(NotFoundError):
        jobs.delete_model(model.id)


def test_the_first_error_recorded_is_kept(stores):
    datasets, jobs = stores
    job = new_job(jobs, upload(datasets, "question,answer\nq,a\n").id)
    jobs.set_error(job.id, "out of memory")
    jobs.set_error(job.id, "a later symptom")
    assert jobs.get(job.id).error == "out of memory"


def test_events_page_forward_from_a_cursor(stores):
    datasets, jobs = stores
    job = new_job(jobs, upload(datasets, "question,answer\nq,a\n").id)
    for step in range(1, 6):
        jobs.record(job.id, "metrics", f"step {step}", {"step": step})
    first, more = jobs.events(job.id, None, 3)
    assert more and [e.message for e in first][1:] == ["step 1", "step 2"]
    rest, more = jobs.events(job.id, first[-1].id, 10)
    assert not more and [e.data["step"] for e in rest] == [3, 4, 5]
    assert jobs.events(job.id, rest[-1].id, 10) == ([], False)
    with pytest.raises(InvalidRequestError, match="after"):
        jobs.events(job.id, "ftevent-nope", 10)


def test_a_workers_reports_stop_counting_once_its_job_is_cancelled(stores):
    datasets, jobs = stores
    job = new_job(jobs, upload(datasets, "question,answer\nq,a\n").id)
    jobs.transition(job.id, ("queued",), "running", started_at=1.0, message="Job started.")
    jobs.record(job.id, "metrics", "step 1", {"step": 1}, while_running=True, steps_completed=1, training_loss=2.0)
    jobs.transition(job.id, ("running",), "cancelled", completed_at=2.0, message="Job cancelled.")
    jobs.record(job.id, "metrics", "step 2", {"step": 2}, while_running=True, steps_completed=2, training_loss=1.0)
    stored = jobs.get(job.id)
    assert (stored.steps_completed, stored.training_loss) == (1, 2.0)
    assert [e.message for e in jobs.events(job.id, None, 10)[0]][-1] == "Job cancelled."
