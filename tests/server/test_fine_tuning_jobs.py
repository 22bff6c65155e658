"""Fine-tuning jobs that really train: the tiny model, the real worker subprocess, a real SQLite file.

Each test starts one or two worker processes (a few seconds each to import torch and transformers), with a
handful of steps, so the whole file stays well under a minute or two on a small CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from fastapi.testclient import TestClient

from qubrid_lab.engine.registry import ModelRegistry
from qubrid_lab.models.catalogue import Catalogue, ModelEntry
from qubrid_lab.server.app import create_app
from qubrid_lab.settings import Settings
from qubrid_lab.storage.datasets import DatasetStore
from qubrid_lab.storage.db import Database
from qubrid_lab.storage.jobs import JobStore
from tests.server.test_api import assert_error

QA_CSV = Path(__file__).parent.parent / "data" / "qa_facts.csv"
QUICK = {
    "max_steps": 4,
    "batch_size": 4,
    "validation_split": 0.2,
    "eval_steps": 2,
    "save_steps": 2,
    "lora_rank": 4,
    "max_seq_length": 64,
}
ENDLESS = {
    **QUICK,
    "epochs": 100,
    "max_steps": 100_000,
    "eval_steps": 100_000,
    "save_steps": 2,
}  # 300 steps: time to act
TIMEOUT = 240


@pytest.fixture
def catalogue(tiny_model_dir) -> Catalogue:
    catalogue = Catalogue()
    catalogue.register(ModelEntry("tiny", "chat", f"dir:{tiny_model_dir}", owned_by="test"))
    catalogue.register(ModelEntry("broken", "chat", "dir:/nonexistent/model", owned_by="test"))
    return catalogue


@pytest.fixture
def start(tmp_path, catalogue):
    """Starts an app (home ``tmp_path/home``, training on the CPU); all are stopped at the end."""
    clients = []

    def build(registry: ModelRegistry | None = None) -> TestClient:
        settings = Settings(home=tmp_path / "home", training_device="cpu")
        app = create_app(settings, registry or ModelRegistry(), close_registry=False, catalogue=catalogue)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


def submit(client: TestClient, hyperparameters: dict, base_model: str = "tiny", **fields) -> str:
    upload = client.post("/v1/fine-tuning/datasets", files={"file": (QA_CSV.name, QA_CSV.read_bytes())})
    body = {
        "base_model": base_model,
        "dataset_id": upload.json()["id"],
        "task_type": "qa",
        "hyperparameters": hyperparameters,
        **fields,
    }
    response = client.post("/v1/fine-tuning/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def events(client: TestClient, job_id: str) -> list[dict]:
    return client.get(f"/v1/fine-tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]


def wait_for(client: TestClient, job_id: str, done, seen: list | None = None) -> dict:
    """Poll the job until ``done(job)``; ``seen`` collects every status observed on the way."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine-tuning/jobs/{job_id}").json()
        if seen is not None and (not seen or seen[-1] != job["status"]):
            seen.append(job["status"])
        if done(job):
            return job
        time.sleep(0.1)
    log = client.app.state.job_manager.job_dir(job_id) / "worker.log"
    raise AssertionError(
        f"job did not get there in {TIMEOUT}s: {job}\n{events(client, job_id)}\n"
        f"{log.read_text()[-3000:] if log.exists() else ''}"
    )


def wait_for_exit(client: TestClient, job_id: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while client.app.state.job_manager.worker_pid(job_id) is not None:
        assert time.monotonic() < deadline, "the worker is still running"
        time.sleep(0.1)


def served_ids(client: TestClient) -> list[str]:
    return [model["id"] for model in client.get("/v1/models").json()["data"]]


def chat(client: TestClient, model: str):
    return client.post(
        "/v1/chat/completions",
        json={"model": model, "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": "Hello"}]},
    )


def test_a_job_trains_reports_and_its_model_is_served_at_once(start, engine_factory):
    client = start(ModelRegistry(chat={"tiny": engine_factory("tiny")}))
    job_id = submit(client, {**QUICK, "load_best_at_end": True, "report_to": "tensorboard"}, suffix="facts")
    statuses: list[str] = []
    job = wait_for(client, job_id, lambda j: j["status"] not in ("queued", "running"), statuses)

    assert job["status"] == "completed", job
    assert statuses[-2:] == ["running", "completed"]
    model_id = f"ft:tiny:facts:{job_id}"
    assert job["fine_tuned_model"] == model_id and job["completed_at"] and job["error"] is None
    metrics = job["training_metrics"]
    assert metrics["steps_completed"] == 4 and metrics["epochs_completed"] >= 1
    assert metrics["training_loss"] > 0 and metrics["validation_loss"] > 0
    assert job["total_steps"] == 4 and job["started_at"]

    log = events(client, job_id)
    messages = [e["message"] for e in log if e["type"] == "message"]
    assert messages[1] == "Job started." and messages[2].startswith("Training started: 4 steps on 12 rows")
    assert "Checkpoint saved at step 2." in messages
    evaluations = [e["data"] for e in log if "validation_loss" in e["data"]]
    assert [e["step"] for e in evaluations] == [2, 4]
    assert all(0 <= e["validation_mean_token_accuracy"] <= 1 for e in evaluations)
    best = min(evaluations, key=lambda e: e["validation_loss"])["step"]
    assert messages[-1] == (
        f"Job completed; fine-tuned model {model_id} is ready; it holds the best checkpoint's weights (step {best})."
    )
    steps = [e["data"] for e in log if e["type"] == "metrics" and "training_loss" in e["data"]]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(s["learning_rate"] > 0 and s["tokens"] > 0 and s["epoch"] > 0 for s in steps)
    assert all(s["grad_norm"] > 0 and s["tokens_per_second"] > 0 for s in steps)
    # the run reported to TensorBoard under the job's directory
    assert list((client.app.state.job_manager.job_dir(job_id) / "tensorboard").glob("events.out.tfevents.*"))

    # both checkpoints are listed with their metrics, and one is served as a model on its first request
    checkpoints = client.get(f"/v1/fine-tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step"] for c in checkpoints] == [4, 2]
    assert checkpoints[1]["metrics"]["valid_loss"] == pytest.approx(evaluations[0]["validation_loss"])
    checkpoint_model = checkpoints[1]["fine_tuned_model_checkpoint"]
    assert checkpoint_model == f"{model_id}:ckpt-step-2" and checkpoint_model not in served_ids(client)
    assert chat(client, checkpoint_model).json()["model"] == checkpoint_model
    assert checkpoint_model in served_ids(client)

    [listed] = client.get("/api/v1/fine-tuning/models").json()["data"]
    assert (listed["id"], listed["base_model"], listed["job_id"], listed["status"]) == (
        model_id,
        "tiny",
        job_id,
        "available",
    )
    assert model_id in served_ids(client)
    reply = chat(client, model_id)
    assert reply.status_code == 200 and reply.json()["model"] == model_id

    # A restarted server serves the stored model again; deleting it unloads it and removes its files.
    client.__exit__(None, None, None)
    again = start(ModelRegistry(chat={"tiny": engine_factory("tiny")}))
    assert model_id in served_ids(again) and chat(again, model_id).status_code == 200
    adapter_dir = again.app.state.job_manager.job_dir(job_id) / "adapter"
    assert (adapter_dir / "adapter_config.json").is_file()
    assert chat(again, checkpoint_model).status_code == 200
    assert again.delete(f"/v1/fine-tuning/models/{model_id}").status_code == 204
    assert served_ids(again) == ["tiny"]  # its checkpoints too
    assert_error(chat(again, checkpoint_model), 404, "model_not_found")
    assert again.get(f"/v1/fine-tuning/jobs/{job_id}/checkpoints").json()["data"] == []
    assert_error(chat(again, model_id), 404, "model_not_found")
    assert not adapter_dir.exists()
    assert again.get("/v1/fine-tuning/models").json() == {"data": []}
    assert_error(again.delete(f"/v1/fine-tuning/models/{model_id}"), 404, "not_found")


def test_a_running_job_is_cancelled_within_seconds(start):
    client = start()
    job_id = submit(client, ENDLESS)
    wait_for(client, job_id, lambda j: j["training_metrics"]["steps_completed"] >= 1)
    asked = time.monotonic()
    response = client.post(f"/v1/fine-tuning/jobs/{job_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    wait_for_exit(client, job_id)
    assert time.monotonic() - asked < 20
    job = client.get(f"/v1/fine-tuning/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["fine_tuned_model"] is None and job["completed_at"]
    assert client.get("/v1/fine-tuning/models").json() == {"data": []}
    assert_error(client.post(f"/v1/fine-tuning/jobs/{job_id}/cancel"), 409, "conflict")


def test_a_paused_job_saves_a_checkpoint_and_resumes_from_it(start):
    client = start()
    job_id = submit(client, {**ENDLESS, "save_steps": 100_000})  # no checkpoint but the pause's own
    wait_for(client, job_id, lambda j: j["training_metrics"]["steps_completed"] >= 2)
    paused = client.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    shown = client.get(f"/v1/fine-tuning/jobs/{job_id}").json()  # the platform's view has no "paused"
    assert shown["status"] == "queued" and shown["status_detail"].startswith("paused")
    wait_for_exit(client, job_id)
    saved = [e["data"]["step"] for e in events(client, job_id) if e["message"].startswith("Checkpoint saved")]
    stopped_at = client.get(f"/v1/fine-tuning/jobs/{job_id}").json()["training_metrics"]["steps_completed"]
    assert saved == [stopped_at]  # saved at the step it stopped after
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "paused"  # and it stays paused
    assert_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/pause"), 409, "conflict")

    resumed = client.post(f"/v1/fine-tuning/jobs/{job_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] in ("queued", "running")  # the queue may be quick
    wait_for(client, job_id, lambda j: j["training_metrics"]["steps_completed"] > stopped_at)
    assert f"Resumed from step {stopped_at}." in [e["message"] for e in events(client, job_id)]
    assert_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/resume"), 409, "conflict")
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    wait_for_exit(client, job_id)


def test_a_killed_worker_fails_the_job_with_the_reason(start):
    client = start()
    job_id = submit(client, ENDLESS)
    wait_for(client, job_id, lambda j: j["training_metrics"]["steps_completed"] >= 1)
    os.kill(client.app.state.job_manager.worker_pid(job_id), signal.SIGKILL)
    job = wait_for(client, job_id, lambda j: j["status"] != "running")
    assert job["status"] == "failed"
    assert "killed by signal 9" in job["error"] and "out of memory?" in job["error"]
    assert events(client, job_id)[-1]["level"] == "error"


def test_a_worker_error_fails_the_job_in_words(start):
    client = start()
    job_id = submit(client, QUICK, base_model="broken")
    job = wait_for(client, job_id, lambda j: j["status"] not in ("queued", "running"))
    assert job["status"] == "failed" and "/nonexistent/model" in job["error"], job
    assert "Traceback" not in job["error"]
    assert events(client, job_id)[-1]["message"] == f"Job failed: {job['error']}"


def test_a_job_running_when_the_server_stopped_resumes_from_its_checkpoint(start):
    first = start()
    job_id = submit(first, ENDLESS)
    wait_for(first, job_id, lambda j: any(e["message"].startswith("Checkpoint saved") for e in events(first, job_id)))
    first.__exit__(None, None, None)  # the server stops; the job is left running, to resume
    saved = max(e["data"]["step"] for e in events(first, job_id) if e["message"].startswith("Checkpoint saved"))

    again = start()
    resumed = wait_for(
        again, job_id, lambda j: any(e["message"].startswith("Resumed from step") for e in events(again, job_id))
    )
    assert resumed["status"] == "running"
    log = events(again, job_id)
    messages = [e["message"] for e in log]
    assert any(m.startswith("The server stopped while this job was running; it is queued again") for m in messages)
    [resume] = [e for e in log if e["message"].startswith("Resumed from step")]
    assert resume["data"]["step"] >= saved

    def steps_since_resume() -> list[int]:
        log = events(again, job_id)
        return [e["data"]["step"] for e in log[log.index(resume) :] if e["type"] == "metrics"]

    wait_for(again, job_id, lambda j: steps_since_resume())
    assert steps_since_resume()[0] == resume["data"]["step"] + 1  # training went on from the checkpoint
    assert again.post(f"/v1/fine-tuning/jobs/{job_id}/cancel").status_code == 200
    wait_for_exit(again, job_id)


def test_an_orphaned_worker_stops_by_itself(tmp_path, tiny_model_dir):
    """A worker whose server died (here: a launcher that exits at once) must not go on training."""
    db = Database(tmp_path / "lab.sqlite3")
    db.migrate()
    datasets = DatasetStore(db, tmp_path / "files")
    incoming = datasets.incoming_file()
    shutil.copy(QA_CSV, incoming)
    dataset = datasets.add(incoming, QA_CSV.name)
    job = JobStore(db).create(
        base_model="tiny",
        dataset_id=dataset.id,
        task_type="qa",
        hyperparameters=ENDLESS,
        column_mapping=None,
        suffix=None,
    )
    job_dir = tmp_path / "job"
    worker = [
        sys.executable,
        "-m",
        "qubrid_lab.training.worker",
        "--database",
        str(db.path),
        "--job-id",
        job.id,
        "--model-dir",
        str(tiny_model_dir),
        "--job-dir",
        str(job_dir),
        "--device",
        "cpu",
    ]
    launcher = (
        f"import os, subprocess, sys; worker = {worker!r} + ['--server-pid', str(os.getpid())]; "
        f"print(subprocess.Popen(worker, stdout=open({str(tmp_path / 'worker.log')!r}, 'w'), "
        "stderr=subprocess.STDOUT).pid)"
    )
    pid = int(subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, check=True).stdout)

    deadline = time.monotonic() + TIMEOUT
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
        time.sleep(0.2)
    result = json.loads((job_dir / "result.json").read_text())
    assert result["stopped"] is True and result["steps"] < 100_000
    assert "server process is gone" in (tmp_path / "worker.log").read_text()
