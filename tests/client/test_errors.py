"""What a refused call raises: the typed error, with the server's message, HTTP status and field."""

from __future__ import annotations

import socket

import pytest

from qubrid_lab.cli import main
from qubrid_lab.client import (
    AuthenticationError,
    Client,
    ConflictError,
    InsufficientCreditsError,
    InvalidRequestError,
    NotFoundError,
    QubridLabError,
    RateLimitError,
    ServerUnavailableError,
)
from tests.client.conftest import QA_FACTS


def test_a_bad_job_request_names_every_field_and_the_first_as_param(client, facts_dataset, chat_model):
    with pytest.raises(InvalidRequestError) as refused:
        client.jobs.create(chat_model, facts_dataset["id"], "qa", {"learning_rate": 0, "lora_rank": 0})
    error = refused.value
    assert error.status == 400 and error.code == "invalid_request" and error.request_id
    assert error.param.startswith("hyperparameters.")
    assert "learning_rate" in error.message and "lora_rank" in error.message and str(error) == error.message


def test_a_file_the_server_cannot_read_is_refused_naming_why(client):
    with pytest.raises(InvalidRequestError, match="neither .csv nor .jsonl") as refused:
        client.datasets.upload(b"question,answer\nA,B\n", filename="facts.txt")
    assert refused.value.status == 400
    with pytest.raises(InvalidRequestError, match="line 3"):
        client.datasets.upload(
            b'question,answer\nWhat is 2+2?,4\n"Where is the key?,Under the mat\n', filename="broken.csv"
        )


def test_what_does_not_exist_is_a_404(client):
    for call in (
        lambda: client.jobs.get("ftjob-missing"),
        lambda: client.datasets.delete("ds-missing"),
        lambda: client.models.get("no-such/model"),
        lambda: client.jobs.events("ftjob-missing"),
    ):
        with pytest.raises(NotFoundError) as missing:
            call()
        assert missing.value.status == 404 and missing.value.message


def test_a_wrong_key_or_none_is_a_401(server):
    for key in ("qbt_wrong", ""):
        with Client(server.url, key) as stranger, pytest.raises(AuthenticationError) as refused:
            stranger.datasets.list()
        assert refused.value.status == 401 and refused.value.code == "invalid_api_key"


def test_waiting_can_time_out_and_cancelling_a_finished_job_is_a_conflict(client, facts_dataset, chat_model):
    job = client.jobs.create(chat_model, facts_dataset["id"], "qa", {"max_steps": 500})
    with pytest.raises(TimeoutError, match=job["id"]):
        client.jobs.wait(job["id"], timeout=0.5, poll_seconds=0.2)
    client.jobs.cancel(job["id"])
    assert client.jobs.wait(job["id"], timeout=120, poll_seconds=0.2)["status"] == "cancelled"
    with pytest.raises(ConflictError) as conflict:
        client.jobs.cancel(job["id"])
    assert conflict.value.status == 409 and "cancelled" in conflict.value.message


def test_a_spent_credit_is_a_402_and_a_rate_limit_a_429_with_its_delay(server, chat_model, capsys):
    def create_key(*options: str) -> str:
        assert main(["--home", str(server.home), "keys", "create", *options]) == 0
        return capsys.readouterr().out.strip()

    with Client(server.url, create_key("--name", "broke", "--credits", "0")) as broke:
        with pytest.raises(InsufficientCreditsError) as spent:
            broke.compare([chat_model], ["Hello"], max_tokens=2)
        assert spent.value.status == 402 and spent.value.code == "insufficient_funds"
        with pytest.raises(InsufficientCreditsError):
            broke.jobs.create(chat_model, broke.datasets.upload(QA_FACTS)["id"], "qa")
    with Client(server.url, create_key("--name", "hasty", "--rpm", "1")) as hasty:
        hasty.models.list()
        with pytest.raises(RateLimitError) as limited:
            hasty.models.list()
        assert limited.value.status == 429 and limited.value.retry_after > 0


def test_a_server_that_does_not_answer_is_unavailable_with_no_status():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the probe closes
    with Client(f"http://127.0.0.1:{port}", timeout=5) as nowhere, pytest.raises(ServerUnavailableError) as down:
        nowhere.models.list()
    assert down.value.status is None and f"127.0.0.1:{port}" in down.value.message
    assert isinstance(down.value, QubridLabError)
