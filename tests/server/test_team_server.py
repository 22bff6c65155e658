"""A server a team shares: stored keys, ownership, metering, credits (402), rate limits (429), a bounded wait (503).

The real app over the tiny model and a real SQLite file in the test's home; keys are made with the CLI (as a
user does, into the same database) or the key store behind it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from qubrid_lab.cli import build_parser, main
from qubrid_lab.engine.registry import ModelRegistry
from qubrid_lab.models.catalogue import Catalogue, ModelEntry
from qubrid_lab.server.app import create_app
from qubrid_lab.settings import Settings
from tests.server.test_api import assert_error
from tests.server.test_fine_tuning_jobs import QA_CSV, QUICK, wait_for

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def catalogue(tiny_model_dir) -> Catalogue:
    catalogue = Catalogue()
    catalogue.register(
        ModelEntry(
            "tiny",
            "chat",
            f"dir:{tiny_model_dir}",
            owned_by="test",
            price_input_per_mtok=1000.0,
            price_output_per_mtok=2000.0,
        )
    )
    return catalogue


@pytest.fixture
def server(tmp_path, catalogue, engine_factory):
    """The app over the tiny model ('tiny'), home ``tmp_path/home``; yields (client, home)."""
    home = tmp_path / "home"
    settings = Settings(home=home, training_device="cpu", max_batch_size=2, max_waiting_requests=1)
    app = create_app(
        settings, ModelRegistry(chat={"tiny": engine_factory("tiny")}), close_registry=False, catalogue=catalogue
    )
    with TestClient(app) as client:
        yield client, home


def create_key(home: Path, capsys, *options: str) -> str:
    assert main(["--home", str(home), "keys", "create", *options]) == 0
    return capsys.readouterr().out.strip()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def chat(client: TestClient, key: str | None, model: str = "tiny", **fields):
    body = {"model": model, "messages": HELLO, "max_tokens": 4, "temperature": 0, **fields}
    return client.post("/v1/chat/completions", json=body, headers=auth(key) if key else {})


def upload(client: TestClient, key: str) -> str:
    response = client.post(
        "/v1/fine-tuning/datasets", files={"file": (QA_CSV.name, QA_CSV.read_bytes())}, headers=auth(key)
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def usage(client: TestClient, key: str, **params) -> list[dict]:
    response = client.get("/v1/usage", params=params, headers=auth(key))
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_keys_made_and_revoked_by_the_cli_count_at_the_next_request(server, capsys):
    client, home = server
    assert chat(client, None).status_code == 200  # no keys yet: open, as a single user's server is
    key = create_key(home, capsys, "--name", "alice")
    assert_error(chat(client, None), 401, "invalid_api_key")
    assert chat(client, key).status_code == 200
    assert main(["--home", str(home), "keys", "revoke", "alice"]) == 0
    refused = assert_error(chat(client, key), 401, "invalid_api_key")
    assert "revoked" in refused["message"] and key not in refused["message"]
    # Revoking the last key does not open the server again.
    assert_error(chat(client, None), 401, "invalid_api_key")
    assert main(["--home", str(home), "keys", "list", "--all"]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "revoked" in listing and key not in listing


def test_home_may_follow_the_verb(tmp_path, capsys):
    before, after = tmp_path / "before", tmp_path / "after"
    assert main(["--home", str(before), "keys", "create", "--name", "first"]) == 0
    assert main(["keys", "create", "--home", str(after), "--name", "second"]) == 0
    capsys.readouterr()
    assert main(["--home", str(before), "keys", "list", "--home", str(after)]) == 0  # after the verb wins
    listing = capsys.readouterr().out
    assert "second" in listing and "first" not in listing
    assert build_parser().parse_args(["serve", "--home", "x"]).home == Path("x")


def test_objects_belong_to_the_key_that_made_them(server, capsys):
    client, home = server
    early = upload(client, "ignored-on-an-open-server")  # made before any key: the admin's from now on
    admin = create_key(home, capsys, "--name", "root", "--admin")
    alice = create_key(home, capsys, "--name", "alice")
    bob = create_key(home, capsys, "--name", "bob")
    mine = upload(client, alice)

    for path in (f"/v1/fine-tuning/datasets/{mine}", f"/api/v1/fine-tuning/datasets/{early}"):
        assert_error(client.get(path, headers=auth(bob)), 404, "not_found")
        assert_error(client.delete(path, headers=auth(bob)), 404, "not_found")
    assert client.get("/v1/fine-tuning/datasets", headers=auth(bob)).json()["data"] == []
    assert [d["id"] for d in client.get("/v1/fine-tuning/datasets", headers=auth(alice)).json()["data"]] == [mine]
    assert {d["id"] for d in client.get("/v1/fine-tuning/datasets", headers=auth(admin)).json()["data"]} == {
        mine,
        early,
    }

    # bob cannot train on alice's dataset, see her job, its events, or cancel it
    job = {"base_model": "tiny", "dataset_id": mine, "task_type": "qa", "hyperparameters": QUICK}
    refused = client.post("/v1/fine-tuning/jobs", json=job, headers=auth(bob))
    assert_error(refused, 400, "invalid_request", "dataset_id")
    created = client.post("/v1/fine-tuning/jobs", json=job, headers=auth(alice))
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    for method, path in (
        ("GET", f"/v1/fine-tuning/jobs/{job_id}"),
        ("GET", f"/v1/fine-tuning/jobs/{job_id}/events"),
        ("POST", f"/v1/fine-tuning/jobs/{job_id}/cancel"),
    ):
        assert_error(client.request(method, path, headers=auth(bob)), 404, "not_found")
    assert client.get("/v1/fine-tuning/jobs", headers=auth(bob)).json() == {"data": [], "total": 0}

    client.headers.update(auth(alice))  # wait_for polls with the client's own headers
    done = wait_for(client, job_id, lambda j: j["status"] not in ("queued", "running"))
    del client.headers["Authorization"]
    assert done["status"] == "completed", done
    model_id = done["fine_tuned_model"]
    listed = {m["id"] for m in client.get("/v1/models", headers=auth(alice)).json()["data"]}
    assert listed == {"tiny", model_id}
    assert model_id in {m["id"] for m in client.get("/v1/models", headers=auth(admin)).json()["data"]}
    bobs = client.get("/v1/models", headers=auth(bob)).json()["data"]
    assert [m["id"] for m in bobs] == ["tiny"]
    not_found = assert_error(chat(client, bob, model_id), 404, "model_not_found")
    assert model_id not in not_found["message"].split("Available models:")[-1]
    assert_error(client.get(f"/v1/models/{model_id}", headers=auth(bob)), 404, "model_not_found")
    assert client.get("/v1/fine-tuning/models", headers=auth(bob)).json() == {"data": []}
    assert_error(client.delete(f"/v1/fine-tuning/models/{model_id}", headers=auth(bob)), 404, "not_found")
    assert chat(client, alice, model_id).status_code == 200

    # the same through OpenAI's API; and a checkpoint served for alice stays hers
    assert {f["purpose"]: f["id"] for f in client.get("/v1/files", headers=auth(alice)).json()["data"]} == {
        "fine-tune": mine,
        "fine-tune-results": f"ftresult-{job_id.removeprefix('ftjob-')}",
    }
    assert client.get("/v1/files", headers=auth(bob)).json()["data"] == []
    for path in (
        f"/v1/files/{mine}",
        f"/v1/files/{mine}/content",
        f"/v1/files/ftresult-{job_id[6:]}/content",
        f"/v1/fine_tuning/jobs/{job_id}",
        f"/v1/fine_tuning/jobs/{job_id}/checkpoints",
        f"/v1/fine_tuning/jobs/{job_id}/events",
    ):
        assert_error(client.get(path, headers=auth(bob)), 404, "not_found")
    refused = client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": mine}, headers=auth(bob))
    assert_error(refused, 400, "invalid_request", "training_file")
    checkpoint = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=auth(alice)).json()["data"][-1]
    checkpoint_model = checkpoint["fine_tuned_model_checkpoint"]
    assert_error(chat(client, bob, checkpoint_model), 404, "model_not_found")
    assert chat(client, alice, checkpoint_model).status_code == 200
    assert_error(chat(client, bob, checkpoint_model), 404, "model_not_found")  # loaded now, and still hidden
    assert checkpoint_model not in {m["id"] for m in client.get("/v1/models", headers=auth(bob)).json()["data"]}

    # the job's training tokens are on alice's usage, at the base model's input price
    [trained] = [row for row in usage(client, alice) if row["training_tokens"]]
    assert trained["key_name"] == "alice" and trained["model"] == "tiny" and trained["requests"] == 0
    assert trained["cost"] == pytest.approx(trained["training_tokens"] * 1000.0 / 1e6)
    assert all(row["key_name"] == "alice" for row in usage(client, alice))
    assert not any(row["key_name"] == "alice" for row in usage(client, bob))
    assert {"alice"} <= {row["key_name"] for row in usage(client, admin)}
    # the admin manages everything
    assert client.delete(f"/v1/fine-tuning/models/{model_id}", headers=auth(admin)).status_code == 204


def test_a_metered_key_is_charged_and_refused_with_402_once_spent(server, capsys):
    client, home = server
    key = create_key(home, capsys, "--name", "metered", "--credits", "0.03")
    answer = chat(client, key)
    assert answer.status_code == 200
    used = answer.json()["usage"]
    [row] = usage(client, key)
    assert (row["prompt_tokens"], row["completion_tokens"], row["requests"]) == (
        used["prompt_tokens"],
        used["completion_tokens"],
        1,
    )
    cost = (used["prompt_tokens"] * 1000.0 + used["completion_tokens"] * 2000.0) / 1e6
    assert row["cost"] == pytest.approx(cost)
    # spend the rest: a stream that crosses the limit finishes; the request after it is refused before any work
    while True:
        response = chat(client, key, max_tokens=8)
        if response.status_code == 402:
            break
        assert response.status_code == 200
    error = assert_error(response, 402, "insufficient_funds")
    assert "metered" in error["message"] and key not in error["message"]
    active = client.get("/health").json()["active_sequences"]["tiny"]
    assert active == 0
    job = {"base_model": "tiny", "dataset_id": "ds-x", "task_type": "qa"}
    assert_error(client.post("/v1/fine-tuning/jobs", json=job, headers=auth(key)), 402, "insufficient_funds")
    # listing what it owns still works
    assert client.get("/v1/fine-tuning/datasets", headers=auth(key)).status_code == 200

    nothing = create_key(home, capsys, "--name", "broke", "--credits", "0")
    assert_error(chat(client, nothing), 402, "insufficient_funds")
    unmetered = create_key(home, capsys, "--name", "free")
    for _ in range(3):
        assert chat(client, unmetered).status_code == 200
    assert main(["--home", str(home), "keys", "list"]) == 0
    rows = {line.split("\t")[0]: line.split("\t") for line in capsys.readouterr().out.splitlines()[1:]}
    assert float(rows["metered"][6]) >= 0.03 and rows["free"][5] == "unmetered" and float(rows["free"][6]) == 0


def test_requests_per_minute_are_limited_with_retry_after(server, capsys):
    client, home = server
    key = create_key(home, capsys, "--name", "slow", "--rpm", "3")
    other = create_key(home, capsys, "--name", "other", "--rpm", "3")
    for _ in range(3):
        assert client.get("/v1/models", headers=auth(key)).status_code == 200
    refused = client.get("/v1/models", headers=auth(key))
    error = assert_error(refused, 429, "rate_limit_exceeded")
    assert 1 <= int(refused.headers["retry-after"]) <= 60 and "3 requests per minute" in error["message"]
    assert client.get("/v1/models", headers=auth(other)).status_code == 200  # per key


def test_tokens_per_minute_reserve_max_tokens_and_settle_to_the_real_count(server, capsys):
    client, home = server
    key = create_key(home, capsys, "--name", "tokens", "--tpm", "60")
    too_big = assert_error(chat(client, key, max_tokens=100), 429, "rate_limit_exceeded", "max_tokens")
    assert "60 tokens per minute" in too_big["message"]
    # each request reserves its prompt estimate + 20; settled to what it really used (a few tokens), the
    # reservations do not pile up, so many more than 60 / 22 requests fit in the minute
    sent = 0
    for _ in range(6):
        response = chat(client, key, max_tokens=20, stop=["e", "a", "o", " "])
        if response.status_code == 429:
            break
        assert response.status_code == 200
        sent += sum(response.json()["usage"][k] for k in ("prompt_tokens", "completion_tokens"))
    else:
        assert sent <= 60
        return
    assert sent + 22 > 60, "a request was refused though the tokens used left room for it"


def test_a_full_waiting_room_is_503_with_retry_after(server, capsys):
    client, _ = server
    engine = client.app.state.registry.chat["tiny"]
    busy = threading.Event()
    engine._thread.submit(busy.wait, 60)  # the engine is busy with a step: whatever arrives now waits
    results: list[int] = []
    started = threading.Event()

    def waiting_stream():
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "tiny", "messages": HELLO, "max_tokens": 4, "stream": True, "n": 3},
        ) as response:
            started.set()
            results.append(response.status_code)
            for _ in response.iter_lines():
                pass

    worker = threading.Thread(target=waiting_stream)
    worker.start()
    assert started.wait(60)
    deadline = time.monotonic() + 10
    while client.get("/health").json()["active_sequences"]["tiny"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    refused = chat(client, None)  # 3 choices waiting: the room (max_batch_size 2 + max_waiting_requests 1) is full
    error = assert_error(refused, 503, "server_overloaded")
    assert refused.headers["retry-after"] == "1" and "max_waiting_requests" in error["message"]
    busy.set()
    worker.join(120)
    assert results == [200]
    deadline = time.monotonic() + 10
    while client.get("/health").json()["active_sequences"]["tiny"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert chat(client, None).status_code == 200


def test_usage_is_filtered_and_other_keys_usage_is_for_admins(server, capsys):
    client, home = server
    admin = create_key(home, capsys, "--name", "root", "--admin")
    alice = create_key(home, capsys, "--name", "alice")
    assert chat(client, alice).status_code == 200
    assert chat(client, admin).status_code == 200
    assert [r["key_name"] for r in usage(client, alice)] == ["alice"]
    assert {r["key_name"] for r in usage(client, admin)} == {"alice", "root"}
    assert [r["key_name"] for r in usage(client, admin, key_name="alice")] == ["alice"]
    assert usage(client, admin, model="nothing") == []
    assert usage(client, admin, start_date="2000-01-01", end_date="2000-01-02") == []
    assert_error(client.get("/v1/usage", params={"key_name": "root"}, headers=auth(alice)), 403, "permission_denied")
    assert_error(
        client.get("/v1/usage", params={"start_date": "yesterday"}, headers=auth(alice)),
        400,
        "invalid_request",
        "start_date",
    )
    assert_error(
        client.get("/v1/usage", params={"start_date": "2030-01-02", "end_date": "2030-01-01"}, headers=auth(alice)),
        400,
        "invalid_request",
        "start_date",
    )


def metric(text: str, name: str, **labels) -> float | None:
    """The value of one sample in Prometheus text, or None."""
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            sample, _, value = line.rpartition(" ")
            if all(f'{label}="{wanted}"' in sample for label, wanted in labels.items()):
                return float(value)
    return None


def test_metrics_count_requests_tokens_and_state_for_admins_only(server, capsys, caplog):
    client, home = server
    caplog.set_level("INFO", logger="qubrid_lab.access")
    answer = client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": HELLO, "max_tokens": 5, "temperature": 0},
        headers={"X-Request-Id": "trace-42"},
    )
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "trace-42"
    assert any("request_id=trace-42" in r.getMessage() and "status=200" in r.getMessage() for r in caplog.records)
    fresh = client.get("/v1/models", headers={"X-Request-Id": "bad id\twith tab" + "x" * 200})
    assert len(fresh.headers["x-request-id"]) == 32 and " " not in fresh.headers["x-request-id"]
    assert client.get("/v1/no-such-route").headers["x-request-id"]
    used = answer.json()["usage"]

    text = client.get("/metrics").text  # no keys yet: open like the rest of the server
    assert metric(text, "qubrid_lab_requests_total", route="/v1/chat/completions", method="POST", status="200") == 1
    assert metric(text, "qubrid_lab_requests_total", route="unmatched", status="404") == 1
    assert metric(text, "qubrid_lab_tokens_total", model="tiny", kind="prompt") == used["prompt_tokens"]
    assert metric(text, "qubrid_lab_tokens_total", model="tiny", kind="completion") == used["completion_tokens"]
    assert metric(text, "qubrid_lab_time_to_first_token_seconds_count", model="tiny") == 1
    assert metric(text, "qubrid_lab_request_duration_seconds_count", route="/v1/models") == 1
    assert metric(text, "qubrid_lab_sequences_running", model="tiny") == 0
    assert metric(text, "qubrid_lab_sequences_waiting", model="tiny") == 0
    assert metric(text, "qubrid_lab_backend_up", model="tiny", backend="local") == 1
    assert metric(text, "qubrid_lab_jobs", status="queued") == 0

    admin = create_key(home, capsys, "--name", "root", "--admin")
    alice = create_key(home, capsys, "--name", "alice")
    assert_error(client.get("/metrics"), 401, "invalid_api_key")
    assert_error(client.get("/metrics", headers=auth(alice)), 403, "permission_denied")
    scraped = client.get("/metrics", headers=auth(admin))
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    assert alice not in scraped.text and admin not in scraped.text
