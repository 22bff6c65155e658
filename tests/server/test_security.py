"""Hostile input against a real ``qubrid-lab serve`` with stored keys: traversal in names and ids, oversized and
injected headers, keys in logs or error bodies, another key's objects, a revoked key, admin-only operations.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.e2e.conftest import start_tiny_server, stop_server

QA_CSV = b"question,answer\nWhat is two plus two?,Four\nWhat colour is the sky?,Blue\n" * 4


def create_key(home, *options: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "qubrid_lab", "--home", str(home), "keys", "create", *options],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture(scope="module")
def team(tmp_path_factory, tiny_model_dir):
    """A server with an admin and two users; yields (server, home, {name: key})."""
    root = tmp_path_factory.mktemp("security")
    home = root / "home"
    home.mkdir()
    keys = {
        "root": create_key(home, "--name", "root", "--admin"),
        "alice": create_key(home, "--name", "alice"),
        "bob": create_key(home, "--name", "bob", "--credits", "1"),
    }
    server = start_tiny_server(
        root, tiny_model_dir, "--model", "tiny", "--max-running-jobs", "0", "--log-level", "debug"
    )
    yield server, home, keys
    stop_server(server)


def call(server, key: str | None, method: str, path: str, **options) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(options.pop("headers", {}))
    return httpx.request(method, server.base_url + path, headers=headers, timeout=60, **options)


def assert_no_key_leaks(text: str, keys: dict) -> None:
    for key in keys.values():
        assert key not in text and key[12:] not in text


@pytest.mark.parametrize(
    "path",
    [
        "/v1/fine-tuning/datasets/..%2F..%2Fqubrid_lab.sqlite3",
        "/v1/fine-tuning/datasets/../../etc/passwd",
        "/v1/fine-tuning/jobs/..%2F..%2Fetc",
        "/v1/fine-tuning/jobs/%2e%2e/events",
        "/v1/models/..%2F..%2F..%2Fetc%2Fpasswd",
        "/v1/fine-tuning/models/ft:tiny:x:..%2F..%2F..%2F",
    ],
)
def test_traversal_in_ids_finds_nothing(team, path):
    server, home, keys = team
    for method in ("GET", "DELETE"):
        response = call(server, keys["root"], method, path)
        assert response.status_code in (404, 405), response.text
        assert response.json()["error"]["code"] in ("not_found", "model_not_found", "invalid_request")
    assert (home / "qubrid_lab.sqlite3").is_file()


def test_an_upload_named_with_a_path_is_stored_under_its_id(team):
    server, home, keys = team
    response = call(
        server,
        keys["alice"],
        "POST",
        "/v1/fine-tuning/datasets",
        files={"file": ("../../../escape.csv", QA_CSV)},
        data={"name": "../../x"},
    )
    assert response.status_code == 201, response.text
    stored = [p.name for p in (home / "files").iterdir() if p.is_file()]
    assert stored == [f"{response.json()['id']}.csv"]
    assert not (home.parent / "escape.csv").exists() and not (home / "escape.csv").exists()


def test_oversized_and_injected_headers_are_refused_or_replaced(team):
    server, _, keys = team
    long_key = call(server, "qbt_" + "x" * 5000, "GET", "/v1/models")
    assert long_key.status_code == 401 and long_key.json()["error"]["code"] == "invalid_api_key"
    odd = "abc; Set-Cookie: x=1 <script>"
    replaced = call(server, keys["alice"], "GET", "/v1/models", headers={"X-Request-Id": odd})
    assert replaced.status_code == 200 and "set-cookie" not in replaced.headers
    assert len(replaced.headers["x-request-id"]) == 32 and odd not in replaced.text
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:  # a bare CR no client library sends
        raw.sendall(
            f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keys['alice']}\r\n"
            "X-Request-Id: abc\rSet-Cookie: x=1\r\nConnection: close\r\n\r\n".encode()
        )
        answer = raw.recv(65536).decode("latin-1")
    assert answer.startswith("HTTP/1.1 400") and "Set-Cookie" not in answer
    huge = call(server, keys["alice"], "GET", "/v1/models", headers={"X-Padding": "y" * 200_000})
    assert huge.status_code == 431 and huge.json()["error"]["code"] == "headers_too_large"
    oversized_field = call(
        server,
        keys["alice"],
        "POST",
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["s" * 100_000]},
    )
    assert oversized_field.status_code == 400
    assert call(server, keys["alice"], "GET", "/health").status_code == 200  # still up


def test_another_keys_objects_a_revoked_key_and_admin_operations(team):
    server, home, keys = team
    dataset = call(server, keys["alice"], "POST", "/v1/fine-tuning/datasets", files={"file": ("qa.csv", QA_CSV)})
    dataset_id = dataset.json()["id"]
    for method in ("GET", "DELETE"):
        assert call(server, keys["bob"], method, f"/v1/fine-tuning/datasets/{dataset_id}").status_code == 404
    assert call(server, keys["alice"], "GET", f"/v1/fine-tuning/datasets/{dataset_id}").status_code == 200
    assert call(server, keys["bob"], "GET", "/metrics").status_code == 403
    assert call(server, keys["bob"], "GET", "/v1/usage", params={"key_name": "alice"}).status_code == 403
    assert call(server, keys["root"], "GET", "/metrics").status_code == 200

    doomed = create_key(home, "--name", "doomed")
    assert call(server, doomed, "GET", "/v1/models").status_code == 200
    subprocess.run([sys.executable, "-m", "qubrid_lab", "--home", str(home), "keys", "revoke", "doomed"], check=True)
    revoked = call(server, doomed, "GET", "/v1/models")
    assert revoked.status_code == 401 and "revoked" in revoked.json()["error"]["message"]


def test_keys_appear_in_no_log_line_and_no_error_body(team):
    server, home, keys = team
    bodies = []
    for key in (*keys.values(), "qbt_" + "n" * 43):
        bodies.append(call(server, key, "POST", "/v1/chat/completions", json={"model": "nope", "messages": []}).text)
        bodies.append(call(server, key, "GET", "/v1/fine-tuning/jobs/none").text)
    bodies.append(
        call(
            server,
            keys["alice"],
            "POST",
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ).text
    )
    assert_no_key_leaks("\n".join(bodies), keys)
    assert_no_key_leaks(server.log(), keys)
    assert "request_id=" in server.log()  # the access log was on: it names keys by name only
    assert "key=alice" in server.log()
    traced = call(server, keys["alice"], "GET", "/v1/models", headers={"X-Request-Id": "sec-trace-1"})
    assert traced.headers["x-request-id"] == "sec-trace-1"
    deadline = time.monotonic() + 10
    while "[sec-trace-1]" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "[sec-trace-1]" in server.log()  # every line logged for a request is tagged with its id
    database = (home / "qubrid_lab.sqlite3").read_bytes() + b"".join(
        p.read_bytes() for p in home.glob("qubrid_lab.sqlite3-*")
    )
    assert_no_key_leaks(database.decode("latin-1"), keys)
