"""The fine-tuning API in-process: datasets, job validation, the queue, cancel, events, errors.

The queue is paused here (``max_running_jobs=0``), so jobs stay queued and no worker starts; the training
runs themselves are in ``test_fine_tuning_jobs.py``. Every app gets its own home: a real SQLite file.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from qubrid_lab.engine.registry import ModelRegistry
from qubrid_lab.models.catalogue import Catalogue, ModelEntry
from qubrid_lab.server.app import create_app
from qubrid_lab.settings import Settings
from tests.server.test_api import assert_error

DATA = Path(__file__).parent.parent / "data"
QA_CSV = DATA / "qa_facts.csv"
TEXT_CSV = DATA / "text_notes.csv"
CHATS = DATA / "chat_facts.jsonl"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
ISO_UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")  # events: milliseconds, for live plots
PREFIXES = ("/api/v1", "/v1")


@pytest.fixture
def catalogue(tiny_model_dir) -> Catalogue:
    catalogue = Catalogue()
    catalogue.register(ModelEntry("tiny", "chat", f"dir:{tiny_model_dir}", owned_by="test"))
    catalogue.register(ModelEntry("tiny-embedder", "embedding", f"dir:{tiny_model_dir}", owned_by="test"))
    return catalogue


@pytest.fixture
def app_for(tmp_path, catalogue):
    """Builds a client for an app with its home in ``tmp_path/home``; apps built twice share the home."""
    with ExitStack() as stack:

        def build(**settings) -> TestClient:
            settings = {"home": tmp_path / "home", "max_running_jobs": 0, **settings}
            app = create_app(Settings(**settings), ModelRegistry(), close_registry=False, catalogue=catalogue)
            return stack.enter_context(TestClient(app))

        yield build


@pytest.fixture
def client(app_for) -> TestClient:
    return app_for()


def files_dir(client: TestClient) -> Path:
    return client.app.state.settings.files_dir


def stored_files(client: TestClient) -> list[Path]:
    folder = files_dir(client)
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def upload(client, content: bytes | Path = QA_CSV, filename: str | None = None, prefix: str = "/v1", **fields):
    if isinstance(content, Path):
        filename, content = filename or content.name, content.read_bytes()
    return client.post(f"{prefix}/fine-tuning/datasets", files={"file": (filename, content, "text/csv")}, data=fields)


def dataset_id(client, path: Path = QA_CSV) -> str:
    response = upload(client, path)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def create_job(client, **fields):
    body = {"base_model": "tiny", "task_type": "qa", **fields}
    return client.post("/v1/fine-tuning/jobs", json=body)


# --- datasets -------------------------------------------------------------------------------------


def test_an_upload_is_summarised_and_stored(client):
    response = upload(client, prefix="/api/v1")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert set(dataset) == {"id", "name", "size_bytes", "row_count", "columns", "created_at"}
    assert dataset["id"].startswith("ds-")
    assert dataset["name"] == "qa_facts.csv"
    assert dataset["size_bytes"] == QA_CSV.stat().st_size
    assert dataset["row_count"] == len(QA_CSV.read_text().strip().splitlines()) - 1
    assert dataset["columns"] == ["question", "answer"]
    assert ISO_UTC.match(dataset["created_at"])
    [stored] = stored_files(client)
    assert stored.read_bytes() == QA_CSV.read_bytes()
    assert client.get(f"/v1/fine-tuning/datasets/{dataset['id']}").json() == dataset
    assert client.get("/api/v1/fine-tuning/datasets").json() == {"data": [dataset]}


def test_a_dataset_name_is_optional_and_at_most_256_characters(client):
    assert upload(client, name="Lighthouse facts").json()["name"] == "Lighthouse facts"
    error = assert_error(upload(client, name="x" * 257), 400, "invalid_request", "name")
    assert "256" in error["message"]
    assert len(stored_files(client)) == 1


@pytest.mark.parametrize(
    ("filename", "content", "words"),
    [
        ("facts.txt", b"question,answer\nq,a\n", ["facts.txt", ".csv"]),
        ("facts.csv", b"", ["empty"]),
        ("facts.csv", b"question,answer\n", ["no data rows"]),
        ("facts.csv", b"question,answer\nq1,a1\nq2,caf\xe9\n", ["UTF-8", "line 3"]),
        ("facts.csv", b"question,answer\nq1,a1\nq2,a2,extra\n", ["line 3", "3 fields"]),
        ("facts.csv", b'question,answer\nq1,"never closed\n', ["line 2", "quote"]),
        ("facts.csv", b"question,question\nq,a\n", ["same name"]),
    ],
)
def test_a_bad_upload_is_400_saying_what_and_where_and_leaves_nothing(client, filename, content, words):
    error = assert_error(upload(client, content, filename), 400, "invalid_request")
    assert all(word in error["message"] for word in words), error["message"]
    assert stored_files(client) == []
    assert client.get("/v1/fine-tuning/datasets").json() == {"data": []}


def test_an_upload_over_the_dataset_limit_is_413_and_leaves_nothing(app_for):
    client = app_for(max_dataset_bytes=1024)
    rows = "".join(f"question {i},answer {i}\n" for i in range(100))
    body = ("question,answer\n" + rows).encode()
    assert len(body) > 1024
    error = assert_error(upload(client, body, "big.csv"), 413, "payload_too_large")
    assert "1024" in error["message"] and "QUBRID_LAB_MAX_DATASET_BYTES" in error["message"]
    huge = assert_error(upload(client, body * 200, "huge.csv"), 413, "payload_too_large")  # refused unread
    assert "QUBRID_LAB_MAX_DATASET_BYTES" in huge["message"]
    assert stored_files(client) == []
    assert upload(client, b"question,answer\nq,a\n", "small.csv").status_code == 201


def test_a_streamed_upload_over_the_limit_is_413(app_for):
    client = app_for(max_dataset_bytes=1024)
    boundary = "qubridboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n'
        "Content-Type: text/csv\r\n\r\nquestion,answer\n"
    ).encode()
    chunks = iter([head, *[b"q,a\n" * 128] * 8, f"\r\n--{boundary}--\r\n".encode()])
    response = client.post(
        "/v1/fine-tuning/datasets",
        content=chunks,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert_error(response, 413, "payload_too_large")
    assert stored_files(client) == []


def test_a_dataset_may_be_larger_than_the_json_body_limit(app_for):
    client = app_for(max_request_bytes=1024)
    rows = "".join(f"question {i},answer {i}\n" for i in range(200))
    response = upload(client, ("question,answer\n" + rows).encode(), "large.csv")
    assert response.status_code == 201, response.text
    assert response.json()["row_count"] == 200
    too_big = client.post("/v1/fine-tuning/jobs", json={"base_model": "tiny", "suffix": "x" * 2000})
    assert_error(too_big, 413, "payload_too_large")


def test_an_upload_must_be_multipart_with_a_file(client):
    not_multipart = client.post("/v1/fine-tuning/datasets", json={"file": "question,answer\nq,a\n"})
    error = assert_error(not_multipart, 400, "invalid_request", "file")
    assert "multipart/form-data" in error["message"]
    no_file = client.post("/v1/fine-tuning/datasets", files={"name": (None, "just a name")})
    assert_error(no_file, 400, "invalid_request", "file")
    text_field = client.post("/v1/fine-tuning/datasets", files={"file": (None, "question,answer\nq,a\n")})
    assert_error(text_field, 400, "invalid_request", "file")
    assert stored_files(client) == []


def test_a_dataset_is_deleted_with_its_file(client):
    first, second = dataset_id(client), dataset_id(client, TEXT_CSV)
    assert client.delete(f"/api/v1/fine-tuning/datasets/{first}").status_code == 204
    assert_error(client.get(f"/v1/fine-tuning/datasets/{first}"), 404, "not_found")
    assert_error(client.delete(f"/v1/fine-tuning/datasets/{first}"), 404, "not_found")
    assert [d["id"] for d in client.get("/v1/fine-tuning/datasets").json()["data"]] == [second]
    assert [p.name for p in stored_files(client)] == [f"{second}.csv"]


def test_a_dataset_used_by_a_queued_job_cannot_be_deleted(client):
    dataset = dataset_id(client)
    job = create_job(client, dataset_id=dataset).json()
    error = assert_error(client.delete(f"/v1/fine-tuning/datasets/{dataset}"), 409, "conflict")
    assert job["id"] in error["message"] and "queued" in error["message"]
    assert client.post(f"/v1/fine-tuning/jobs/{job['id']}/cancel").status_code == 200
    assert client.delete(f"/v1/fine-tuning/datasets/{dataset}").status_code == 204


# --- jobs -----------------------------------------------------------------------------------------


def test_a_job_is_created_queued_with_every_hyperparameter_resolved(client):
    dataset = dataset_id(client)
    response = create_job(
        client,
        dataset_id=dataset,
        suffix="lighthouse",
        hyperparameters={"epochs": 2, "learning_rate": 1e-3, "lora_rank": 8},
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["id"].startswith("ftjob-")
    assert (job["status"], job["base_model"], job["dataset_id"], job["task_type"]) == ("queued", "tiny", dataset, "qa")
    hyperparameters = job["hyperparameters"]
    assert (hyperparameters["epochs"], hyperparameters["learning_rate"], hyperparameters["lora_rank"]) == (2, 1e-3, 8)
    assert hyperparameters["validation_split"] == 0.0 and hyperparameters["batch_size"] >= 1  # defaults filled in
    assert job["fine_tuned_model"] is None and job["completed_at"] is None and job["error"] is None
    assert job["training_metrics"] == {
        "training_loss": None,
        "validation_loss": None,
        "steps_completed": 0,
        "epochs_completed": 0,
    }
    assert ISO_UTC.match(job["created_at"]) and job["suffix"] == "lighthouse"
    assert client.get(f"/api/v1/fine-tuning/jobs/{job['id']}").json() == job


def test_every_problem_with_a_job_is_reported_at_once(client):
    response = create_job(
        client,
        base_model="gpt-9",
        dataset_id="ds-missing",
        suffix="bad suffix!",
        hyperparameters={"epochs": 0, "learning_rate": -1, "validation_split": 1, "warp": 9},
    )
    error = assert_error(response, 400, "invalid_request", "base_model")
    message = error["message"]
    for words in (
        "base_model",
        "gpt-9",
        "tiny",
        "dataset_id",
        "ds-missing",
        "hyperparameters.epochs",
        "hyperparameters.learning_rate",
        "hyperparameters.validation_split",
        "hyperparameters.warp",
        "suffix",
    ):
        assert words in message, (words, message)
    assert "tiny-embedder" not in message  # only chat models can be fine-tuned


def test_an_embedding_model_or_an_unknown_task_is_refused(client):
    dataset = dataset_id(client)
    error = assert_error(create_job(client, dataset_id=dataset, base_model="tiny-embedder"), 400, "invalid_request")
    assert "embedding model" in error["message"]
    error = assert_error(
        create_job(client, dataset_id=dataset, task_type="summarise"), 400, "invalid_request", "task_type"
    )
    assert "not_qa" in error["message"] and "chat" in error["message"]


def test_settings_that_need_validation_data_or_a_tracker_are_checked_at_creation(client):
    dataset = dataset_id(client)
    error = assert_error(
        create_job(
            client,
            dataset_id=dataset,
            hyperparameters={"early_stopping_patience": 2, "load_best_at_end": True, "report_to": "wandb"},
        ),
        400,
        "invalid_request",
    )
    assert "early_stopping_patience: it needs validation data" in error["message"]
    assert "load_best_at_end: it needs validation data" in error["message"]
    assert "pip install wandb" in error["message"]
    ok = create_job(
        client,
        dataset_id=dataset,
        hyperparameters={
            "early_stopping_patience": 2,
            "load_best_at_end": True,
            "validation_split": 0.2,
            "report_to": "tensorboard",
        },
    )
    assert ok.status_code == 201, ok.text


def test_a_validation_dataset_is_checked_and_in_use_while_its_job_is_queued(client):
    training, held_out, chats = dataset_id(client), dataset_id(client), dataset_id(client, CHATS)
    error = assert_error(
        create_job(client, dataset_id=training, validation_dataset_id=chats),
        400,
        "invalid_request",
        "validation_dataset_id",
    )
    assert "is JSONL" in error["message"]
    both = create_job(
        client, dataset_id=training, validation_dataset_id=held_out, hyperparameters={"validation_split": 0.2}
    )
    assert "not both" in assert_error(both, 400, "invalid_request")["message"]
    job = create_job(
        client, dataset_id=training, validation_dataset_id=held_out, hyperparameters={"early_stopping_patience": 2}
    )  # validation data: early stopping is allowed
    assert job.status_code == 201 and job.json()["validation_dataset_id"] == held_out
    assert_error(client.delete(f"/v1/fine-tuning/datasets/{held_out}"), 409, "conflict")


def test_a_max_seq_length_that_leaves_no_row_anything_to_train_is_refused_naming_the_rows(client):
    rows = len(QA_CSV.read_text().strip().splitlines()) - 1
    error = assert_error(
        create_job(client, dataset_id=dataset_id(client), hyperparameters={"max_seq_length": 16}),
        400,
        "invalid_request",
        "dataset_id",
    )
    assert "max_seq_length 16 leaves no token to train on in any row" in error["message"]
    assert f"rows 1-{rows}" in error["message"]
    assert create_job(client, dataset_id=dataset_id(client), hyperparameters={"max_seq_length": 64}).status_code == 201


def test_chat_jobs_train_on_jsonl_and_column_tasks_on_csv(client):
    chats = dataset_id(client, CHATS)
    assert client.get(f"/v1/fine-tuning/datasets/{chats}").json()["columns"] == ["messages"]
    assert [path.suffix for path in stored_files(client)] == [".jsonl"]
    job = create_job(client, dataset_id=chats, task_type="chat")
    assert job.status_code == 201 and job.json()["task_type"] == "chat"
    error = assert_error(create_job(client, dataset_id=chats, task_type="qa"), 400, "invalid_request", "task_type")
    assert "JSONL" in error["message"]
    error = assert_error(
        create_job(client, dataset_id=dataset_id(client), task_type="chat"), 400, "invalid_request", "task_type"
    )
    assert "is CSV" in error["message"]


def test_columns_that_do_not_fit_the_task_are_named_with_the_accepted_ones(client):
    notes = dataset_id(client, TEXT_CSV)
    error = assert_error(create_job(client, dataset_id=notes), 400, "invalid_request")
    assert "'text'" in error["message"] and "question" in error["message"] and "column_mapping" in error["message"]
    facts = dataset_id(client)
    assert_error(create_job(client, dataset_id=facts, task_type="not_qa"), 400, "invalid_request")
    mapped = create_job(client, dataset_id=facts, task_type="not_qa", column_mapping={"text": "answer"})
    assert mapped.status_code == 201 and mapped.json()["column_mapping"] == {"text": "answer"}
    wrong = create_job(client, dataset_id=facts, column_mapping={"question": "nope"})
    assert "nope" in assert_error(wrong, 400, "invalid_request", "column_mapping")["message"]


def test_jobs_are_listed_newest_first_a_page_at_a_time(client):
    dataset = dataset_id(client)
    created = [create_job(client, dataset_id=dataset).json()["id"] for _ in range(5)]
    everything = client.get("/v1/fine-tuning/jobs").json()
    assert everything["total"] == 5 and [j["id"] for j in everything["data"]] == created[::-1]
    page = client.get("/api/v1/fine-tuning/jobs", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 5 and [j["id"] for j in page["data"]] == created[::-1][1:3]
    last = client.get("/v1/fine-tuning/jobs", params={"limit": 2, "offset": 4}).json()
    assert [j["id"] for j in last["data"]] == [created[0]]
    assert client.get("/v1/fine-tuning/jobs", params={"offset": 5}).json() == {"data": [], "total": 5}
    for params, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"offset": -1}, "offset")):
        assert_error(client.get("/v1/fine-tuning/jobs", params=params), 400, "invalid_request", param)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/fine-tuning/jobs/ftjob-nope"),
        ("POST", "/api/v1/fine-tuning/jobs/ftjob-nope/cancel"),
        ("GET", "/v1/fine-tuning/jobs/ftjob-nope/events"),
        ("GET", "/v1/fine-tuning/datasets/ds-nope"),
        ("DELETE", "/api/v1/fine-tuning/datasets/ds-nope"),
        ("DELETE", "/v1/fine-tuning/models/ft:org/base:sfx:ftjob-nope"),
    ],
)
def test_unknown_ids_are_404_not_found(client, method, path):
    error = assert_error(client.request(method, path), 404, "not_found")
    assert "nope" in error["message"]


def test_a_queued_job_is_cancelled_at_once_and_only_once(client):
    job = create_job(client, dataset_id=dataset_id(client)).json()
    response = client.post(f"/v1/fine-tuning/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    cancelled = response.json()
    assert cancelled["status"] == "cancelled" and ISO_UTC.match(cancelled["completed_at"])
    assert client.get(f"/v1/fine-tuning/jobs/{job['id']}").json()["status"] == "cancelled"
    error = assert_error(client.post(f"/v1/fine-tuning/jobs/{job['id']}/cancel"), 409, "conflict")
    assert "cancelled" in error["message"]


def test_events_are_read_forward_from_a_cursor(client):
    job = create_job(client, dataset_id=dataset_id(client)).json()
    client.post(f"/v1/fine-tuning/jobs/{job['id']}/cancel")
    url = f"/v1/fine-tuning/jobs/{job['id']}/events"
    response = client.get(url)
    assert response.headers["content-type"] == "application/json"
    listing = response.json()
    assert listing["object"] == "list" and listing["has_more"] is False
    events = listing["data"]
    assert [e["message"] for e in events] == [f"Created fine-tuning job {job['id']}; it is queued.", "Job cancelled."]
    for event in events:
        assert event["object"] == "fine_tuning.job.event" and event["id"].startswith("ftevent-")
        assert (event["level"], event["type"], event["data"]) == ("info", "message", {})
        assert ISO_UTC_MS.match(event["created_at"])
    first = client.get(url, params={"limit": 1}).json()
    assert first["data"] == events[:1] and first["has_more"] is True
    assert client.get(url, params={"after": events[0]["id"]}).json()["data"] == events[1:]
    assert client.get(url, params={"after": events[1]["id"]}).json() == {
        "object": "list",
        "data": [],
        "has_more": False,
    }
    assert_error(client.get(url, params={"after": "ftevent-unknown"}), 400, "invalid_request", "after")


def test_fine_tuning_routes_need_the_api_key_when_keys_are_set(app_for):
    client = app_for(api_keys=["qbt_ft"])
    for prefix in PREFIXES:
        assert_error(client.get(f"{prefix}/fine-tuning/jobs"), 401, "invalid_api_key")
        assert_error(upload(client, prefix=prefix), 401, "invalid_api_key")
        assert_error(client.get(f"{prefix}/fine-tuning/models"), 401, "invalid_api_key")
    key = {"Authorization": "Bearer qbt_ft"}
    assert client.get("/api/v1/fine-tuning/jobs", headers=key).status_code == 200
    assert client.get("/v1/fine-tuning/datasets", headers=key).status_code == 200
    assert stored_files(client) == []


def test_a_restart_loses_nothing(app_for):
    first = app_for()
    dataset = dataset_id(first)
    job = create_job(first, dataset_id=dataset).json()
    database = first.app.state.settings.database_path
    first.__exit__(None, None, None)
    assert not database.with_name(database.name + "-wal").exists()  # a stopped server's file holds every commit

    again = app_for()
    assert again.get(f"/v1/fine-tuning/datasets/{dataset}").json()["row_count"] == 15
    retrieved = again.get(f"/v1/fine-tuning/jobs/{job['id']}")
    assert retrieved.headers["content-type"] == "application/json" and retrieved.json() == job
    assert again.get("/v1/fine-tuning/models").json() == {"data": []}
