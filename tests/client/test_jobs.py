"""Jobs through the client on a real server: create, follow with an ETA, pause/resume, cancel, wait, the result."""

from __future__ import annotations

import pytest

from qubrid_lab.client import Client, NotFoundError
from qubrid_lab.training.hyperparameters import Hyperparameters
from qubrid_lab.workbench import start_server
from tests.client.conftest import JOB_SECONDS, QA_FACTS, SMALL_RUN


@pytest.fixture(scope="module")
def finished(client, facts_dataset, chat_model) -> dict:
    """A 3-step job created from a ``Hyperparameters`` object and waited for."""
    hyperparameters = Hyperparameters(**SMALL_RUN, max_steps=3, learning_rate=1e-2, validation_split=0.2, eval_steps=1)
    job = client.jobs.create(chat_model, facts_dataset["id"], "qa", hyperparameters, suffix="client")
    assert job["status"] == "queued" and job["hyperparameters"]["max_steps"] == 3
    return client.jobs.wait(job["id"], timeout=JOB_SECONDS, poll_seconds=0.2)


def test_following_a_job_reports_its_pace_and_time_left_and_ends_with_it(client, facts_dataset, chat_model):
    job = client.jobs.create(chat_model, facts_dataset["id"], "qa", {**SMALL_RUN, "max_steps": 60})
    seen, timed = [], None
    for progress in client.jobs.follow(job["id"], poll_seconds=0.2, timeout=JOB_SECONDS):
        seen.append(progress)
        if timed is None and progress.eta_seconds and 0 < progress.steps_done < 60:
            timed = progress
            waiting = client.jobs.create(chat_model, facts_dataset["id"], "qa", {**SMALL_RUN, "max_steps": 2})
            paused = client.jobs.pause(waiting["id"])  # queued behind the running job: paused at once
            assert paused["status"] == "queued" and paused["status_detail"].startswith("paused")
            resumed = client.jobs.resume(waiting["id"])
            assert resumed["status"] == "queued" and resumed["status_detail"] is None
            client.jobs.cancel(waiting["id"])
            client.jobs.cancel(job["id"])
    assert timed is not None, [(p.status, p.steps_done, p.eta_seconds) for p in seen]
    assert timed.status == "running" and timed.total_steps == 60 and timed.seconds_per_step > 0
    assert timed.eta_seconds == pytest.approx((60 - timed.steps_done) * timed.seconds_per_step)
    assert {"training_loss", "learning_rate", "tokens_per_second"} <= set(timed.metrics)

    last = seen[-1]
    assert last.finished and last.status == "cancelled" and last.eta_seconds == 0.0
    steps = [event["data"]["step"] for p in seen for event in p.events if "training_loss" in event["data"]]
    assert steps == list(range(1, len(steps) + 1))  # every step event once, in order
    assert [event["id"] for p in seen for event in p.events] == [event["id"] for event in client.jobs.events(job["id"])]
    assert client.jobs.wait(waiting["id"], timeout=60)["status"] == "cancelled"


def test_wait_returns_the_completed_job_with_its_checkpoints_and_model(client, finished):
    assert finished["status"] == "completed" and finished["training_metrics"]["steps_completed"] == 3
    assert finished["fine_tuned_model"].endswith(f":client:{finished['id']}")
    assert client.jobs.get(finished["id"]) == finished
    assert finished["id"] in [job["id"] for job in client.jobs.list(limit=100)]
    events = client.jobs.events(finished["id"])
    assert sum("validation_loss" in event["data"] for event in events) == 3
    later = client.jobs.events(finished["id"], after=events[-3]["id"])
    assert later == events[-2:]
    checkpoints = client.jobs.checkpoints(finished["id"])
    assert checkpoints and checkpoints[0]["step"] == 3
    assert checkpoints[0]["fine_tuned_model_checkpoint"].startswith(finished["fine_tuned_model"])


def test_the_fine_tuned_model_is_compared_greedily_then_deleted(client, finished, chat_model):
    tuned = finished["fine_tuned_model"]
    assert tuned in client.models.chat_ids() and tuned not in client.models.chat_ids(fine_tuned=False)
    assert [model["job_id"] for model in client.models.fine_tuned() if model["id"] == tuned] == [finished["id"]]

    questions = ["Who keeps the lighthouse?", "What is the capital of France?"]
    table = client.compare({"base": chat_model, "fine-tuned": tuned}, questions, max_tokens=6)
    assert list(table.columns) == ["question", "base", "fine-tuned"] and list(table["question"]) == questions
    assert all(isinstance(answer, str) and answer for answer in table["base"].tolist() + table["fine-tuned"].tolist())
    again = client.compare({"base": chat_model, "fine-tuned": tuned}, questions, max_tokens=6)
    assert again.equals(table)  # greedy: the same answers every time
    assert not table["base"].equals(table["fine-tuned"])  # the adapter changed the tiny model's answers

    client.models.delete(tuned)
    assert tuned not in [model["id"] for model in client.models.fine_tuned()]
    with pytest.raises(NotFoundError):
        client.models.get(tuned)


def test_following_rides_out_a_server_restart(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    options = {
        "models": [str(tiny_model_dir)],
        "home": tmp_path / "home",
        "device": "cpu",
        "dtype": "float32",
        "timeout": 300,
        "reuse": False,
    }
    servers = [start_server(**options)]
    try:
        first = servers[0]
        dataset = first.datasets.upload(QA_FACTS)
        job = first.jobs.create(
            str(tiny_model_dir), dataset["id"], "qa", {**SMALL_RUN, "max_steps": 20, "save_steps": 2}
        )
        seen = []
        with Client(first.url, "") as client:
            for progress in client.jobs.follow(job["id"], poll_seconds=0.2, timeout=JOB_SECONDS):
                seen.append(progress)
                if progress.steps_done and first.process.poll() is None:
                    first.stop()  # the job stops with it, and resumes at the next start
                elif progress.retrying and len(servers) == 1:
                    servers.append(start_server(port=first.port, **options))
        assert any("No answer from the server" in (p.retrying or "") for p in seen)
        assert seen[-1].status == "completed" and seen[-1].steps_done == 20
    finally:
        for server in servers:
            server.stop()
