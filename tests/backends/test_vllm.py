"""The ``vllm`` backend: a real vLLM (the CPU build, in its own environment) started by our server as a child
process, serving the bundled SmolLM2; a fine-tuning job on that base is loaded into the running vLLM as a
LoRA adapter; a killed vLLM fails the request in flight with a 502 and is started again."""

from __future__ import annotations

import time

import httpx
import openai
import psutil
import pytest

from tests.backends.conftest import serve_catalogue, stop_server
from tests.e2e.conftest import API_KEY
from tests.e2e.test_fine_tuning import LEARN_THE_FACTS, facts, upload, wait_for
from tests.smollm2 import CAPITAL_CHAT, CAPITAL_TEXT

pytestmark = pytest.mark.engines

MODEL = "team/smol-vllm"
QUESTION = list(CAPITAL_CHAT.messages)
RESTART_SECONDS = 600


@pytest.fixture(scope="module")
def front(vllm_python, tmp_path_factory):
    entry = {
        "id": MODEL,
        "kind": "chat",
        "backend": "vllm",
        "source": "bundled:smollm2-135m-instruct",
        "python": str(vllm_python),
        "gpu_memory_utilization": 0.15,
        "max_model_len": 2048,
        "max_lora_rank": 16,
        "args": ["--max-num-seqs", "16"],
    }
    server = serve_catalogue(tmp_path_factory.mktemp("vllm-front"), [entry], env={"QUBRID_LAB_API_KEYS": API_KEY})
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(front):
    return openai.OpenAI(base_url=f"{front.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(front):
    with httpx.Client(base_url=front.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as s:
        yield s


def vllm_child(front) -> psutil.Process:
    children = [
        p
        for p in psutil.Process(front.process.pid).children(recursive=True)
        if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())
    ]
    assert len(children) == 1, children
    return children[0]


def test_chat_stream_n_and_stop_through_the_managed_vllm(client):
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in answer.choices[0].message.content
    assert answer.usage.prompt_tokens > 20 and answer.usage.completion_tokens > 0
    assert answer.model_extra["x_metrics"]["tps"] > 0
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    two = client.chat.completions.create(model=MODEL, messages=QUESTION, n=2, seed=5, temperature=1.0, max_tokens=8)
    assert [c.index for c in two.choices] == [0, 1]
    stopped = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=20, stop=["Paris"]
    )
    assert "Paris" not in stopped.choices[0].message.content
    text = client.completions.create(model=MODEL, prompt=CAPITAL_TEXT.prompt, temperature=0, max_tokens=4)
    assert text.usage.completion_tokens == 4 and text.choices[0].finish_reason == "length"


def test_a_rank_above_the_vllm_cap_is_refused_naming_both(http):
    dataset = upload(http)
    response = http.post(
        "/v1/fine-tuning/jobs",
        json={
            "base_model": MODEL,
            "dataset_id": dataset["id"],
            "task_type": "qa",
            "hyperparameters": {"lora_rank": 32},
        },
    )
    assert response.status_code == 400, response.text
    message = response.text
    assert "32" in message and "16" in message and "max_lora_rank" in message


def test_a_fine_tuned_model_is_loaded_into_vllm_and_answers(http, client):
    dataset = upload(http)
    job = http.post(
        "/v1/fine-tuning/jobs",
        json={
            "base_model": MODEL,
            "dataset_id": dataset["id"],
            "task_type": "qa",
            "suffix": "facts",
            "hyperparameters": LEARN_THE_FACTS,
        },
    ).json()
    job = wait_for(http, job["id"], lambda j: j["status"] == "completed", "completed")
    tuned = job["fine_tuned_model"]
    assert tuned in {m.id for m in client.models.list().data}
    question, answer = facts()[0]
    word = answer.rstrip(".").split()[-1]
    said = (
        client.chat.completions.create(
            model=tuned, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24
        )
        .choices[0]
        .message.content
    )
    assert word in said
    base = (
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24
        )
        .choices[0]
        .message.content
    )
    assert word not in base


def test_a_killed_vllm_fails_with_502_then_serves_again(front, client):
    child = vllm_child(front)
    child.kill()
    child.wait(30)
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
    assert failed.value.status_code == 502
    assert MODEL in failed.value.body["message"]
    deadline = time.monotonic() + RESTART_SECONDS
    while True:
        try:
            answer = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20)
            break
        except openai.APIStatusError as exc:
            assert exc.status_code == 502 and time.monotonic() < deadline, exc
            time.sleep(2)
    assert "Paris" in answer.choices[0].message.content
    assert vllm_child(front).pid != child.pid


def test_models_list_says_whether_the_entry_interpreter_has_vllm(vllm_python, tmp_path):
    import json
    import subprocess
    import sys

    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(
        json.dumps(
            [
                {
                    "id": "with",
                    "kind": "chat",
                    "backend": "vllm",
                    "source": "bundled:smollm2-135m-instruct",
                    "python": str(vllm_python),
                },
                {
                    "id": "without",
                    "kind": "chat",
                    "backend": "vllm",
                    "source": "bundled:smollm2-135m-instruct",
                    "python": sys.executable,
                },
            ]
        )
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qubrid_lab",
            "--home",
            str(tmp_path),
            "models",
            "list",
            "--catalogue-file",
            str(catalogue),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split("\t")[0]: line.split("\t")[4] for line in done.stdout.splitlines()[1:]}
    assert f"vLLM found in {vllm_python}" in rows["with"]
    assert f"{sys.executable} has no vLLM" in rows["without"]
