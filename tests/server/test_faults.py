"""Faults a shared server meets, on real processes and a real SQLite file: the server killed with SIGKILL in the
middle of training, a full disk during an upload, the database locked by another writer, and races between
clients (deleting a dataset while a job on it is created, two clients cancelling one job).
"""

from __future__ import annotations

import os
import resource
import signal
import sqlite3
import threading
import time

import httpx

from tests.e2e.conftest import start_tiny_server
from tests.server.test_fine_tuning_jobs import ENDLESS, QA_CSV

KEY = "qbt_faults-test-key"
# long enough to still be running after the restart (three epochs of the small dataset ended, now and then,
# before the test saw the resumed job running)
LONG = {**ENDLESS, "epochs": 100}
HEADERS = {"Authorization": f"Bearer {KEY}"}


def serve(root, tiny_model_dir, *extra: str):
    return start_tiny_server(
        root, tiny_model_dir, "--model", "tiny", "--training-device", "cpu", *extra, env={"QUBRID_LAB_API_KEYS": KEY}
    )


def http(server) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=60)


def upload(client: httpx.Client, content: bytes | None = None, name: str = "qa.csv") -> httpx.Response:
    return client.post("/v1/fine-tuning/datasets", files={"file": (name, content or QA_CSV.read_bytes())})


def wait_for(client: httpx.Client, job_id: str, done, seconds: float = 240) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine-tuning/jobs/{job_id}").json()
        if done(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not get there: {job}")


def together(*calls) -> list:
    """Run ``calls`` at the same moment, each in a thread; their results in order."""
    results: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(index: int) -> None:
        start.wait()
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_a_server_killed_mid_training_restarts_with_everything_intact(tmp_path, tiny_model_dir):
    server = serve(tmp_path, tiny_model_dir)
    try:
        with http(server) as client:
            dataset_id = upload(client).json()["id"]
            chat = client.post(
                "/v1/chat/completions",
                json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
            )
            assert chat.status_code == 200
            job = client.post(
                "/v1/fine-tuning/jobs",
                json={"base_model": "tiny", "dataset_id": dataset_id, "task_type": "qa", "hyperparameters": LONG},
            )
            job_id = job.json()["id"]
            wait_for(client, job_id, lambda j: j["training_metrics"]["steps_completed"] >= 3)
            datasets = client.get("/v1/fine-tuning/datasets").json()
            usage = client.get("/v1/usage").json()
    finally:
        os.kill(server.process.pid, signal.SIGKILL)  # the server only: its worker is orphaned, as in a crash
        server.process.wait()

    with serve(tmp_path, tiny_model_dir) as again, http(again) as client:
        assert client.get("/v1/fine-tuning/datasets").json() == datasets
        assert client.get("/v1/usage").json() == usage
        resumed = wait_for(
            client,
            job_id,
            lambda j: (
                j["status"] == "running"
                and any(
                    "resumes from its checkpoint" in e["message"]
                    for e in client.get(f"/v1/fine-tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
                )
            ),
        )
        assert resumed["status"] == "running"
        assert client.post(f"/v1/fine-tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"


def test_a_full_disk_during_an_upload_is_a_clear_error_and_leaves_nothing(tmp_path, tiny_model_dir):
    with serve(tmp_path, tiny_model_dir) as server, http(server) as client:
        before = client.get("/v1/fine-tuning/datasets").json()
        # Files the server writes may grow to 4 MiB from now on: a full disk, for this process only.
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (4 * 2**20, 4 * 2**20))
        big = b"question,answer\n" + b"What is the answer to this question?,It is forty-two\n" * 200_000
        full = upload(client, big)
        assert full.status_code == 507, full.text
        error = full.json()["error"]
        assert error["code"] == "insufficient_storage" and "space" in error["message"]
        assert client.get("/v1/fine-tuning/datasets").json() == before
        files = tmp_path / "home" / "files"
        assert not [p for p in files.rglob("*") if p.is_file()]
        assert upload(client).status_code == 201  # a dataset that fits is still taken


def test_a_database_locked_by_another_writer_makes_requests_wait_not_fail(tmp_path, tiny_model_dir):
    with serve(tmp_path, tiny_model_dir) as server, http(server) as client:
        locker = sqlite3.connect(tmp_path / "home" / "qubrid_lab.sqlite3", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        # Inference answers while the lock is held (its usage row waits for the lock, the answer does not),
        # and the server keeps answering.
        answer = client.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        )
        assert answer.status_code == 200 and client.get("/health").status_code == 200
        results = []
        thread = threading.Thread(target=lambda: results.append(upload(client)))
        thread.start()
        time.sleep(3)
        assert thread.is_alive(), "the upload did not wait for the lock"
        locker.execute("COMMIT")
        locker.close()
        thread.join(60)
        assert results[0].status_code == 201, results[0].text
        deadline = time.monotonic() + 30  # the usage row written once the lock went
        while not client.get("/v1/usage").json()["data"] and time.monotonic() < deadline:
            time.sleep(0.2)
        [row] = client.get("/v1/usage").json()["data"]
        assert row["completion_tokens"] == answer.json()["usage"]["completion_tokens"]


def test_racing_clients_never_leave_a_job_without_its_dataset(tmp_path, tiny_model_dir):
    with serve(tmp_path, tiny_model_dir, "--max-running-jobs", "0") as server, http(server) as client:
        for _ in range(8):
            dataset_id = upload(client).json()["id"]
            create, delete = together(
                lambda: client.post(
                    "/v1/fine-tuning/jobs", json={"base_model": "tiny", "dataset_id": dataset_id, "task_type": "qa"}
                ),  # noqa: B023
                lambda: client.delete(f"/v1/fine-tuning/datasets/{dataset_id}"),
            )  # noqa: B023
            assert (create.status_code, delete.status_code) in ((201, 409), (400, 204)), (create.text, delete.text)
            if create.status_code == 201:  # the job's dataset is still there; two cancels make one cancellation
                job_id = create.json()["id"]
                assert client.get(f"/v1/fine-tuning/datasets/{dataset_id}").status_code == 200
                cancel = f"/v1/fine-tuning/jobs/{job_id}/cancel"
                answers = together(lambda: client.post(cancel), lambda: client.post(cancel))  # noqa: B023
                assert sorted(a.status_code for a in answers) == [200, 409], [a.text for a in answers]
                events = client.get(f"/v1/fine-tuning/jobs/{job_id}/events").json()["data"]
                assert [e["message"] for e in events].count("Job cancelled.") == 1
