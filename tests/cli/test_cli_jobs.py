"""``finetune`` and ``jobs`` on a real server: a job followed to its model id, detached, shown, listed, cancelled,
interrupted with Ctrl-C; refusals as one ``error:`` line naming the field."""

from __future__ import annotations

import json
import re
from contextlib import contextmanager

import pytest

from qubrid_lab.client.jobs_api import JOBS
from tests.cli.conftest import API_KEY, LiveCommand, assert_refused, big_dataset, run_cli
from tests.client.conftest import JOB_SECONDS, QA_FACTS, SMALL_RUN

SMALL_FLAGS = [text for name, value in SMALL_RUN.items() for text in (f"--{name.replace('_', '-')}", str(value))]
LIVE_PROGRESS = r"running: +\d+%\|[^|]*\| ([1-9]\d*)/(\d+) steps, loss \d+\.\d{4}, ETA \d+:\d\d"


def created_job(stderr: str) -> str:
    return re.search(r"created job (ftjob-\w+)", stderr).group(1)


@contextmanager
def cancelled_at_the_end(client, job_id: str):
    """Cancel the job however the test ends, so a long one never holds the server's training slot."""
    try:
        yield job_id
    finally:
        if client.jobs.get(job_id)["status"] in ("queued", "running"):
            client.jobs.cancel(job_id)
        client.jobs.wait(job_id, timeout=JOB_SECONDS, poll_seconds=0.2)


def test_finetune_follows_the_job_and_prints_the_model_id(cli, client, chat_model):
    done = cli(
        "finetune",
        QA_FACTS,
        "--model",
        chat_model,
        "--suffix",
        "cli",
        *SMALL_FLAGS,
        "--max-steps",
        3,
        "--learning-rate",
        0.01,
        "--target-modules",
        "q_proj,v_proj",
    )
    assert done.returncode == 0, done.stderr
    job = client.jobs.get(created_job(done.stderr))
    assert job["status"] == "completed" and job["training_metrics"]["steps_completed"] == 3
    assert job["fine_tuned_model"].endswith(f":cli:{job['id']}") and done.stdout == job["fine_tuned_model"] + "\n"
    assert {name: job["hyperparameters"][name] for name in ("learning_rate", "lora_rank", "target_modules")} == {
        "learning_rate": 0.01,
        "lora_rank": 4,
        "target_modules": ["q_proj", "v_proj"],
    }
    assert "3/3 steps" in done.stderr and f"job {job['id']} completed: 3 steps" in done.stderr
    assert "Training started: 3 steps" in done.stderr  # the job's messages, above the bar
    assert job["fine_tuned_model"] in client.models.chat_ids()


def test_finetune_json_prints_the_finished_job_as_the_api_sends_it(cli, client, chat_model):
    done = cli("finetune", QA_FACTS, "--model", chat_model, *SMALL_FLAGS, "--max-steps", 2, "--json")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["status"] == "completed" and job == client.jobs.get(job["id"])


def test_a_detached_job_is_shown_followed_listed_and_its_events_read(cli, client, chat_model):
    done = cli("finetune", QA_FACTS, "--model", chat_model, *SMALL_FLAGS, "--max-steps", 3, "--detach")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert re.fullmatch(r"ftjob-\w+", job_id) and f"qubrid-lab jobs follow {job_id}" in done.stderr

    followed = cli("jobs", "follow", job_id)
    assert followed.returncode == 0, followed.stderr
    job = client.jobs.get(job_id)
    assert job["status"] == "completed" and followed.stdout == job["fine_tuned_model"] + "\n"

    shown = cli("jobs", "show", job_id)
    assert shown.returncode == 0 and json.loads(cli("jobs", "show", job_id, "--json").stdout) == job
    fields = {line.split("  ")[0]: line.split("  ", 1)[1].strip() for line in shown.stdout.splitlines()}
    assert fields["status"] == "completed" and fields["steps"] == "3/3"
    assert fields["fine-tuned model"] == job["fine_tuned_model"] and "max_steps=3" in fields["hyperparameters"]

    events = client.jobs.events(job_id)
    assert json.loads(cli("jobs", "events", job_id, "--json").stdout) == events
    assert [line.split(maxsplit=2)[2] for line in cli("jobs", "events", job_id).stdout.splitlines()] == [
        event["message"] for event in events
    ]

    listing = json.loads(cli("jobs", "list", "--json", "--limit", 100).stdout)
    assert listing == client.request("GET", JOBS, params={"limit": 100, "offset": 0}) and job in listing["data"]
    table = cli("jobs", "list").stdout.splitlines()
    assert table[0].split()[:3] == ["id", "status", "steps"]
    assert [job_id, "completed", "3/3"] in [line.split()[:3] for line in table]

    assert_refused(cli("jobs", "cancel", job_id), f"Job {job_id} is already completed")


def test_jobs_follow_interrupted_leaves_the_job_running_and_jobs_cancel_stops_it(
    cli, client, chat_model, tmp_path, on_server
):
    dataset = client.datasets.upload(big_dataset(tmp_path))
    job = client.jobs.create(chat_model, dataset["id"], "qa", {**SMALL_RUN, "batch_size": 1})
    with cancelled_at_the_end(client, job["id"]):
        following = LiveCommand("jobs", "follow", job["id"], *on_server, QUBRID_LAB_API_KEY=API_KEY)
        try:
            following.wait_for(LIVE_PROGRESS)
            status, stdout, stderr = following.interrupt()
        finally:
            following.close()
        assert status == 130 and stdout == "", stderr
        assert f"job {job['id']} keeps running" in stderr and "Traceback" not in stderr
        assert client.jobs.get(job["id"])["status"] == "running"

        done = cli("jobs", "cancel", job["id"])
        assert done.returncode == 0 and done.stdout == f"job {job['id']} is cancelled\n", done.stderr
        assert client.jobs.get(job["id"])["status"] == "cancelled"


def test_ctrl_c_while_finetune_follows_cancels_the_job(client, chat_model, tmp_path, on_server):
    following = LiveCommand(
        "finetune",
        big_dataset(tmp_path),
        "--model",
        chat_model,
        *SMALL_FLAGS,
        "--batch-size",
        1,
        *on_server,
        QUBRID_LAB_API_KEY=API_KEY,
    )
    try:
        job_id = created_job(following.wait_for(r"created job ftjob-\w+").group(0))
        with cancelled_at_the_end(client, job_id):
            progress = following.wait_for(LIVE_PROGRESS)  # step/total, live loss and ETA on the bar
            status, stdout, stderr = following.interrupt()
            assert status == 130 and stdout == "", stderr
            assert f"interrupted: cancelling job {job_id}" in stderr and "Traceback" not in stderr
            job = client.jobs.get(job_id)
            assert job["status"] == "cancelled" and job["total_steps"] == int(progress.group(2))
            assert int(progress.group(1)) <= job["training_metrics"]["steps_completed"] < job["total_steps"]
    finally:
        following.close()


def test_a_bad_hyperparameter_is_refused_naming_it_before_anything_is_uploaded(cli, client, chat_model):
    datasets = client.datasets.list()
    done = cli("finetune", QA_FACTS, "--model", chat_model, "--learning-rate", 5, "--lora-rank", 0)
    assert_refused(done, "hyperparameters.learning_rate", "(got 5.0)", "hyperparameters.lora_rank")
    assert_refused(cli("finetune", QA_FACTS, "--epochs", "three"), "argument --epochs: invalid int value", status=2)
    assert client.datasets.list() == datasets


def test_a_job_the_server_refuses_names_the_field_and_leaves_no_dataset(cli, client):
    datasets = client.datasets.list()
    done = cli("finetune", QA_FACTS, "--model", "no-such/model", "--max-steps", 2)
    assert_refused(done, "base_model", "'no-such/model' is not in the model catalogue")
    assert client.datasets.list() == datasets


@pytest.mark.parametrize("where", ["after the verb", "before the verb"])
def test_url_and_key_flags_pick_the_server_and_a_wrong_key_is_a_clear_error(server, where):
    def jobs_list(key: str):
        flags = ["--url", server.url, "--api-key", key]
        return run_cli("jobs", "list", *flags) if where == "after the verb" else run_cli(*flags, "jobs", "list")

    assert jobs_list(API_KEY).returncode == 0
    done = jobs_list("qbt_wrong")
    assert_refused(done, "Invalid API key", "--api-key")
    assert done.stdout == ""
