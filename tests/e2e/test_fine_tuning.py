"""Fine-tuning end to end: upload a CSV, train SmolLM2 in the server's worker, chat with the result at once.

The dataset (``tests/data/qa_facts.csv``) is made-up facts that no base model can know; each answer ends
with an invented word. After a short LoRA run the fine-tuned model answers with those words and the base
model does not.
"""

from __future__ import annotations

import csv
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import API_KEY, CHAT_MODEL, start_server, stop_server

pytestmark = pytest.mark.e2e

FACTS = Path(__file__).parents[1] / "data" / "qa_facts.csv"
JOB_SECONDS = 900  # bound for a job on a busy 2-core CPU; never a timing assertion
# Every row in one batch, every linear layer adapted: the loss is ~0.01 after about ten steps.
LEARN_THE_FACTS = {
    "epochs": 14,
    "max_steps": 14,
    "learning_rate": 2e-3,
    "batch_size": 16,
    "lora_rank": 16,
    "lora_alpha": 32,
    "target_modules": "all-linear",
    "validation_split": 0,
}


def facts() -> list[tuple[str, str]]:
    with FACTS.open(newline="") as handle:
        return [(row["question"], row["answer"]) for row in csv.DictReader(handle)]


def upload(http: httpx.Client, path: Path = FACTS, **data) -> dict:
    with path.open("rb") as handle:
        response = http.post("/v1/fine-tuning/datasets", files={"file": (path.name, handle, "text/csv")}, data=data)
    assert response.status_code == 201, response.text
    return response.json()


def create_job(http: httpx.Client, dataset_id: str, prefix: str = "/v1", **hyperparameters) -> dict:
    response = http.post(
        f"{prefix}/fine-tuning/jobs",
        json={
            "base_model": CHAT_MODEL,
            "dataset_id": dataset_id,
            "task_type": "qa",
            "suffix": "facts",
            "hyperparameters": hyperparameters,
        },
    )
    assert response.status_code == 201, response.text
    return response.json()


def wait_for(http: httpx.Client, job_id: str, done, what: str) -> dict:
    """Poll the job until ``done(job)``; fail with the job and the server's view of it after JOB_SECONDS."""
    deadline = time.monotonic() + JOB_SECONDS
    while time.monotonic() < deadline:
        job = http.get(f"/v1/fine-tuning/jobs/{job_id}").json()
        if done(job):
            return job
        assert job["status"] not in {"failed", "cancelled"} or what in {"failed", "cancelled"}, job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} never got {what}: {job}")


def events(http: httpx.Client, job_id: str, after: str | None = None) -> list[dict]:
    params = {"limit": 1000, **({"after": after} if after else {})}
    return http.get(f"/v1/fine-tuning/jobs/{job_id}/events", params=params).json()["data"]


def ask(client, model: str, question: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24
    )
    return reply.choices[0].message.content


def test_a_job_trains_and_its_model_answers_what_the_data_says(http, client):
    dataset = upload(http, name="Invented facts")
    assert (dataset["name"], dataset["row_count"], dataset["columns"]) == ("Invented facts", 15, ["question", "answer"])
    assert dataset["size_bytes"] == FACTS.stat().st_size

    job = create_job(http, dataset["id"], prefix="/api/v1", **LEARN_THE_FACTS)
    assert (job["status"], job["fine_tuned_model"], job["completed_at"]) == ("queued", None, None)

    running = wait_for(http, job["id"], lambda j: j["training_metrics"]["steps_completed"] >= 1, "a first step")
    assert running["status"] == "running" and running["training_metrics"]["training_loss"] > 0
    first_events = events(http, job["id"])
    done = wait_for(http, job["id"], lambda j: j["status"] == "completed", "completed")

    metrics = done["training_metrics"]
    assert metrics["steps_completed"] == 14 and metrics["epochs_completed"] == 14
    assert metrics["training_loss"] < 0.2 < running["training_metrics"]["training_loss"]
    assert done["completed_at"] >= done["created_at"]
    model_id = done["fine_tuned_model"]
    assert model_id == f"ft:{CHAT_MODEL}:facts:{job['id']}"

    # The event log, read in two pieces with the cursor, holds every step in order.
    later = events(http, job["id"], after=first_events[-1]["id"])
    steps = [e["data"]["step"] for e in first_events + later if e["type"] == "metrics" and "training_loss" in e["data"]]
    assert steps == list(range(1, 15))

    listed = http.get("/v1/fine-tuning/models").json()["data"]
    assert [(m["id"], m["status"], m["job_id"]) for m in listed] == [(model_id, "available", job["id"])]
    assert model_id in [m.id for m in client.models.list()]

    tuned_right = base_right = 0
    for question, answer in facts()[:5]:
        word = answer.rstrip(".").split()[-1]
        tuned_right += word in ask(client, model_id, question)
        base_right += word in ask(client, CHAT_MODEL, question)
    assert tuned_right >= 4 and base_right == 0

    completion = client.completions.create(
        model=model_id, prompt="The password to the Archive of Lumen Vale is", max_tokens=5, temperature=0
    )
    assert completion.model == model_id and completion.usage.completion_tokens > 0

    # Deleting the fine-tuned model takes it out of both lists and out of service.
    assert http.delete(f"/v1/fine-tuning/models/{model_id}").status_code == 204
    assert http.get("/v1/fine-tuning/models").json()["data"] == []
    assert model_id not in [m.id for m in client.models.list()]
    gone = http.post("/v1/chat/completions", json={"model": model_id, "messages": [{"role": "user", "content": "Hi"}]})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_a_running_job_reports_validation_loss_and_cancels_within_seconds(http):
    dataset = upload(http)
    job = create_job(
        http,
        dataset["id"],
        max_steps=200,
        epochs=100,
        batch_size=2,
        max_seq_length=64,
        validation_split=0.2,
        eval_steps=1,
    )
    assert http.delete(f"/v1/fine-tuning/datasets/{dataset['id']}").json()["error"]["code"] == "conflict"
    evaluated = wait_for(
        http, job["id"], lambda j: j["training_metrics"]["validation_loss"] is not None, "a validation loss"
    )
    assert evaluated["status"] == "running"

    asked = time.monotonic()
    assert http.post(f"/v1/fine-tuning/jobs/{job['id']}/cancel").status_code == 200
    cancelled = wait_for(http, job["id"], lambda j: j["status"] == "cancelled", "cancelled")
    assert time.monotonic() - asked < 30
    assert cancelled["fine_tuned_model"] is None and cancelled["completed_at"]
    steps = cancelled["training_metrics"]["steps_completed"]
    time.sleep(3)
    assert http.get(f"/v1/fine-tuning/jobs/{job['id']}").json()["training_metrics"]["steps_completed"] == steps

    again = http.post(f"/v1/fine-tuning/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    assert http.delete(f"/v1/fine-tuning/datasets/{dataset['id']}").status_code == 204


def test_fine_tuning_errors_name_the_problem(http, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("question,answer\nA,B\n")
    with bad.open("rb") as handle:
        response = http.post("/v1/fine-tuning/datasets", files={"file": ("notes.txt", handle, "text/plain")})
    assert response.status_code == 400 and ".csv" in response.json()["error"]["message"]

    ragged = tmp_path / "ragged.csv"
    ragged.write_text("question,answer\nA,B\nC,D,E\n")
    with ragged.open("rb") as handle:
        response = http.post("/v1/fine-tuning/datasets", files={"file": ("ragged.csv", handle, "text/csv")})
    assert response.status_code == 400 and "line 3" in response.json()["error"]["message"]

    texts = tmp_path / "texts.csv"
    texts.write_text("body\nSome text.\n")
    dataset = upload(http, texts)
    response = http.post(
        "/v1/fine-tuning/jobs",
        json={
            "base_model": "sentence-transformers/all-MiniLM-L6-v2",
            "dataset_id": dataset["id"],
            "task_type": "qa",
            "hyperparameters": {"learning_rate": 0, "validation_split": 1.0},
        },
    )
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    for expected in ("base_model", "body", "question", "learning_rate", "validation_split"):
        assert expected in message, message

    for path in ("/v1/fine-tuning/jobs/ftjob-missing", "/v1/fine-tuning/datasets/ds-missing"):
        response = http.get(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert httpx.get(http.base_url.join("/v1/fine-tuning/jobs")).status_code == 401


def test_a_job_interrupted_by_a_server_crash_resumes_from_its_checkpoint(tmp_path):
    environment = {"QUBRID_LAB_API_KEYS": API_KEY}
    server = start_server(tmp_path, env=environment)
    try:
        with httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
        ) as http:
            job = create_job(
                http, upload(http)["id"], max_steps=6, epochs=10, batch_size=4, max_seq_length=64, save_steps=2
            )
            wait_for(
                http,
                job["id"],
                lambda j: any("Checkpoint" in e["message"] for e in events(http, j["id"])),
                "a checkpoint",
            )
            os.kill(server.process.pid, signal.SIGKILL)  # the server dies; its worker must notice and stop
            server.process.wait()
    finally:
        stop_server(server)
    time.sleep(5)

    server = start_server(tmp_path, env=environment)
    try:
        with httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
        ) as http:
            done = wait_for(http, job["id"], lambda j: j["status"] == "completed", "completed")
            log = events(http, job["id"])
    finally:
        stop_server(server)
    resumed = [i for i, e in enumerate(log) if "resumes from its checkpoint" in e["message"]]
    assert resumed, [e["message"] for e in log]
    checkpoint_step = max(e["data"]["step"] for e in log[: resumed[0]] if "Checkpoint" in e["message"])
    after = [e["data"]["step"] for e in log[resumed[0] :] if e["type"] == "metrics" and "training_loss" in e["data"]]
    assert after == list(range(checkpoint_step + 1, 7))
    assert done["training_metrics"]["steps_completed"] == 6 and done["fine_tuned_model"]
