"""OpenAI's fine-tuning API end to end with the official ``openai`` SDK against a real server on the tiny model:
file to job to served model, and the same objects seen through the platform's API."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import start_tiny_server

pytestmark = pytest.mark.e2e

DATA = Path(__file__).parent.parent / "data"
QA_CSV = DATA / "qa_facts.csv"
TEXT_CSV = DATA / "text_notes.csv"
CHATS = DATA / "chat_facts.jsonl"
JOB_SECONDS = 300  # generous: a worker process starts, then the tiny model trains a few steps


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    with start_tiny_server(tmp_path_factory.mktemp("openai-ft"), tiny_model_dir) as server:
        yield server


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def platform(served):
    with httpx.Client(base_url=f"{served.base_url}/v1", timeout=60) as session:
        yield session


def wait(client, job_id: str, statuses=("succeeded", "failed", "cancelled")):
    deadline = time.monotonic() + JOB_SECONDS
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} is still {job.status} after {JOB_SECONDS}s")


@pytest.fixture(scope="module")
def trained(client):
    """One job trained through the SDK for the module's tests: (file, job once succeeded)."""
    with QA_CSV.open("rb") as handle:
        file = client.files.create(file=handle, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=file.id, suffix="lighthouse", seed=7, hyperparameters={"n_epochs": 2}
    )
    assert job.status in ("queued", "running") and job.fine_tuned_model is None
    return file, wait(client, job.id)


def test_a_file_is_a_dataset_of_both_apis(client, platform):
    with TEXT_CSV.open("rb") as handle:
        file = client.files.create(file=handle, purpose="fine-tune")
    assert (file.object, file.purpose, file.filename, file.bytes) == (
        "file",
        "fine-tune",
        "text_notes.csv",
        TEXT_CSV.stat().st_size,
    )
    assert client.files.retrieve(file.id).id == file.id
    assert client.files.content(file.id).read() == TEXT_CSV.read_bytes()
    assert file.id in [f.id for f in client.files.list(purpose="fine-tune")]
    assert platform.get(f"/fine-tuning/datasets/{file.id}").json()["columns"] == ["text"]
    assert client.files.delete(file.id).deleted is True
    assert platform.get(f"/fine-tuning/datasets/{file.id}").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file.id)


def test_only_fine_tune_files_are_kept(client):
    with QA_CSV.open("rb") as handle, pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=handle, purpose="assistants")
    assert caught.value.body["param"] == "purpose"


def test_a_job_trains_and_its_model_answers_at_once(client, trained):
    file, job = trained
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith("ft:tiny:lighthouse:")
    assert (job.model, job.training_file, job.seed, job.user_provided_suffix) == ("tiny", file.id, 7, "lighthouse")
    rows = len(QA_CSV.read_text().strip().splitlines()) - 1
    # n_epochs as given; "auto" batch size (0.2% of the rows, at least 1) and learning-rate multiplier (1)
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (2, max(1, round(rows * 0.002)))
    assert job.hyperparameters.learning_rate_multiplier == 1
    assert job.trained_tokens > rows  # every row at least once, each several tokens
    assert job.finished_at >= job.created_at
    answer = client.chat.completions.create(
        model=job.fine_tuned_model, max_tokens=3, messages=[{"role": "user", "content": "Hi"}]
    )
    assert answer.choices[0].message.content and answer.model == job.fine_tuned_model


def test_a_completed_job_has_a_result_file_of_step_metrics(client, trained):
    _, job = trained
    [result_id] = job.result_files
    result = client.files.retrieve(result_id)
    assert (result.purpose, result.filename) == ("fine-tune-results", "step_metrics.csv")
    lines = client.files.content(result_id).read().decode().splitlines()
    assert lines[0].startswith("step,train_loss,valid_loss,valid_mean_token_accuracy,learning_rate,grad_norm")
    steps = [int(line.split(",")[0]) for line in lines[1:]]
    assert steps == list(range(1, len(steps) + 1)) and len(lines[1].split(",")) == 8
    assert result.bytes == len("\n".join(lines)) + 1
    assert result_id in [f.id for f in client.files.list(purpose="fine-tune-results")]
    assert result_id not in [f.id for f in client.files.list(purpose="fine-tune")]
    every = [f.id for f in client.files.list()]
    assert [f.id for f in client.files.list(after=every[0])] == every[1:]
    with pytest.raises(openai.ConflictError):
        client.files.delete(result_id)


def test_events_come_newest_first_with_metrics_and_page_with_after(client, trained):
    _, job = trained
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    assert events[-1].message.startswith("Created fine-tuning job")
    metrics = [e for e in events if e.type == "metrics" and "training_loss" in e.data]
    assert metrics and all(e.data["tokens"] > 0 for e in metrics)
    first = client.fine_tuning.jobs.list_events(job.id, limit=2)
    rest = client.fine_tuning.jobs.list_events(job.id, after=first.data[-1].id, limit=1000)
    assert first.has_more and [e.id for e in first.data + rest.data] == [e.id for e in events]


def test_checkpoints_are_listed_and_each_is_served_as_a_model(client, platform, trained):
    _, job = trained
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    steps = [c.step_number for c in checkpoints]
    assert len(steps) == 3 and steps == sorted(steps, reverse=True)  # save_total_limit 3, newest first
    oldest = checkpoints[-1]
    assert oldest.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{oldest.step_number}"
    assert oldest.metrics.step == oldest.step_number and oldest.metrics.train_loss > 0
    later = client.fine_tuning.jobs.checkpoints.list(job.id, after=checkpoints[0].id, limit=1)
    assert [c.id for c in later.data] == [checkpoints[1].id] and later.has_more
    listed = platform.get(f"/fine-tuning/jobs/{job.id}/checkpoints").json()["data"]
    assert [c["id"] for c in listed] == [c.id for c in checkpoints]
    answer = client.chat.completions.create(
        model=oldest.fine_tuned_model_checkpoint,
        max_tokens=3,
        temperature=0,
        messages=[{"role": "user", "content": "Hi"}],
    )
    assert answer.model == oldest.fine_tuned_model_checkpoint
    assert oldest.fine_tuned_model_checkpoint in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError):  # a step that was not kept
        client.chat.completions.create(
            model=f"{job.fine_tuned_model}:ckpt-step-1", max_tokens=3, messages=[{"role": "user", "content": "Hi"}]
        )


def test_one_job_system_under_both_apis(client, platform, trained):
    file, job = trained
    assert platform.get(f"/fine-tuning/jobs/{job.id}").json()["status"] == "completed"
    made = platform.post(
        "/fine-tuning/jobs",
        json={"base_model": "tiny", "dataset_id": file.id, "task_type": "qa", "hyperparameters": {"epochs": 100}},
    ).json()
    listed = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in listed.data] == [made["id"]] and listed.has_more
    older = client.fine_tuning.jobs.list(after=made["id"]).data
    assert job.id in [j.id for j in older] and made["id"] not in [j.id for j in older]
    assert client.fine_tuning.jobs.cancel(made["id"]).status == "cancelled"
    assert platform.get(f"/fine-tuning/jobs/{made['id']}").json()["status"] == "cancelled"


def test_a_jsonl_chat_file_trains_every_assistant_turn_and_validates_on_its_validation_file(client, platform, tmp_path):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("\n".join(CHATS.read_text().splitlines()[:2]) + "\n")
    with CHATS.open("rb") as handle, held_out.open("rb") as validation_handle:
        file = client.files.create(file=handle, purpose="fine-tune")
        validation = client.files.create(file=validation_handle, purpose="fine-tune")
    assert platform.get(f"/fine-tuning/datasets/{file.id}").json()["columns"] == ["messages"]
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=file.id,
        validation_file=validation.id,
        hyperparameters={"n_epochs": 2, "eval_steps": 2},
    )
    assert job.validation_file == validation.id
    job = wait(client, job.id)
    assert job.status == "succeeded", job.error
    assert platform.get(f"/fine-tuning/jobs/{job.id}").json()["task_type"] == "chat"
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    started = next(e for e in events if e.message.startswith("Training started"))
    assert (started.data["train_rows"], started.data["validation_rows"]) == (len(CHATS.read_text().splitlines()), 2)
    assert [e for e in events if "validation_loss" in e.data]
    assert all(c.metrics.valid_loss is not None for c in client.fine_tuning.jobs.checkpoints.list(job.id).data)


@pytest.mark.parametrize(
    "fields, param, says",
    [
        ({"model": "nope"}, "model", "not in the model catalogue"),
        ({"training_file": "file-missing"}, "training_file", "POST /v1/files"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "n_epochs"),
        ({"validation_file": "file-x"}, "validation_file", "no dataset 'file-x'"),
        (
            {"hyperparameters": {"validation_split": 0.2}, "validation_file": "TRAINING"},
            "hyperparameters.validation_split",
            "not both",
        ),
        ({"method": {"type": "dpo"}}, "method.type", "supervised"),
        (
            {"hyperparameters": {"early_stopping_patience": 2}},
            "hyperparameters.early_stopping_patience",
            "validation_split",
        ),
    ],
)
def test_bad_jobs_get_a_400_in_openais_field_names(client, trained, fields, param, says):
    file, _ = trained
    if fields.get("validation_file") == "TRAINING":
        fields = {**fields, "validation_file": file.id}
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(**{"model": "tiny", "training_file": file.id, **fields})
    assert caught.value.body["param"] == param and says in caught.value.body["message"]
