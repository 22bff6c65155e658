"""The ``triton`` backend against a real Triton Inference Server, driven through our server with the official
``openai`` client: TensorRT-LLM ensemble tensors over gRPC (streamed) and HTTP (whole), Triton's vLLM-backend
tensors over gRPC; the served model is the bundled SmolLM2 as ``qubrid-lab export triton`` wrote it."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest

from tests.backends.conftest import serve_catalogue, stop_server, write_catalogue
from tests.e2e.conftest import API_KEY, free_port
from tests.smollm2 import CAPITAL_CHAT, CAPITAL_TEXT

pytestmark = pytest.mark.engines

TOKENIZER = "bundled:smollm2-135m-instruct"
QUESTION = list(CAPITAL_CHAT.messages)


def entries(triton_server, closed_port: int) -> list[dict]:
    grpc, http = triton_server["grpc"], triton_server["http"]
    return [
        {
            "id": "team/smol-trtllm",
            "kind": "chat",
            "backend": "triton",
            "url": grpc,
            "protocol": "grpc",
            "interface": "tensorrt_llm",
            "triton_model": "ensemble",
            "tokenizer": TOKENIZER,
        },
        {
            "id": "team/smol-vllm-tensors",
            "kind": "chat",
            "backend": "triton",
            "url": grpc,
            "protocol": "grpc",
            "interface": "vllm",
            "triton_model": "vllm_model",
            "tokenizer": TOKENIZER,
        },
        {
            "id": "team/smol-http",
            "kind": "chat",
            "backend": "triton",
            "url": http,
            "protocol": "http",
            "interface": "tensorrt_llm",
            "triton_model": "ensemble_sync",
            "tokenizer": TOKENIZER,
        },
        {
            "id": "team/smol-no-seed",
            "kind": "chat",
            "backend": "triton",
            "url": grpc,
            "protocol": "grpc",
            "triton_model": "ensemble",
            "tokenizer": TOKENIZER,
            "tensor_names": {"random_seed": "seed_of_nothing"},
        },
        {
            "id": "team/nowhere",
            "kind": "chat",
            "backend": "triton",
            "url": f"127.0.0.1:{closed_port}",
            "tokenizer": TOKENIZER,
        },
    ]


@pytest.fixture(scope="module")
def front(triton_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton-front")
    server = serve_catalogue(tmp, entries(triton_server, free_port()), env={"QUBRID_LAB_API_KEYS": API_KEY})
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(front):
    return openai.OpenAI(base_url=f"{front.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.mark.parametrize("model", ["team/smol-trtllm", "team/smol-vllm-tensors", "team/smol-http"])
def test_chat_answers_through_each_interface_and_counts_tokens(client, model):
    answer = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens > 20  # the chat template's system block and the question
    assert 0 < answer.usage.completion_tokens <= 20
    assert answer.model_extra["x_metrics"]["ttft_seconds"] > 0


@pytest.mark.parametrize("model", ["team/smol-trtllm", "team/smol-vllm-tensors"])
def test_streamed_chunks_join_into_the_whole_answer(client, model):
    whole = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=20)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=QUESTION,
            temperature=0,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3  # streamed as decoded, not in one piece
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_with_a_seed_are_reproducible(client):
    def ask():
        return client.chat.completions.create(
            model="team/smol-vllm-tensors", messages=QUESTION, n=2, seed=11, temperature=1.0, max_tokens=12
        )

    first, second = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert 2 <= first.usage.completion_tokens <= 24


def test_stop_cuts_the_answer_before_the_stop_string(client):
    answer = client.chat.completions.create(
        model="team/smol-trtllm", messages=QUESTION, temperature=0, max_tokens=20, stop=["Paris"]
    )
    assert "Paris" not in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"


def test_text_completions_and_the_length_limit(client):
    answer = client.completions.create(
        model="team/smol-trtllm", prompt=CAPITAL_TEXT.prompt, temperature=0, max_tokens=4
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 4
    assert "Paris" in answer.choices[0].text


def test_a_model_without_count_outputs_is_counted_with_the_tokenizer(client):
    """ensemble_sync sends text only (as TensorRT-LLM's ensemble does): our tokenizer counts its tokens."""
    answer = client.completions.create(model="team/smol-http", prompt=CAPITAL_TEXT.prompt, temperature=0, max_tokens=4)
    text = answer.choices[0].text
    assert "Paris" in text
    assert 1 <= answer.usage.completion_tokens <= 4
    assert answer.usage.prompt_tokens == 5  # "The capital of France is"


def test_a_field_the_model_takes_no_tensor_for_is_refused_by_name(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="team/smol-no-seed", messages=QUESTION, seed=3, max_tokens=4)
    assert refused.value.body["param"] == "seed"
    assert "'triton' backend" in refused.value.body["message"]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ],
)
def test_fields_triton_cannot_honour_are_refused_by_name(client, extra, field):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="team/smol-trtllm", messages=QUESTION, max_tokens=4, **extra)
    assert refused.value.body["param"] == field and "'triton' backend" in refused.value.body["message"]


def test_an_unreachable_triton_is_a_502_and_the_server_stays_up(client, front):
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="team/nowhere", messages=QUESTION, max_tokens=4)
    assert failed.value.status_code == 502
    assert failed.value.body["code"] == "upstream_error"
    assert "team/nowhere" in failed.value.body["message"]
    assert httpx.get(f"{front.base_url}/health").status_code == 200


def test_models_lists_every_entry_as_chat(client):
    listed = {m.id: m for m in client.models.list().data}
    assert {"team/smol-trtllm", "team/smol-http", "team/nowhere"} <= set(listed)
    assert listed["team/smol-trtllm"].model_extra["kind"] == "chat"


def test_models_list_reports_each_triton_entry_health(triton_server, tmp_path):
    catalogue = write_catalogue(tmp_path / "catalogue.json", entries(triton_server, free_port()))
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
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split("\t")[0]: line.split("\t") for line in done.stdout.splitlines()[1:]}
    assert rows["team/smol-trtllm"][2:] == [
        "triton",
        f"grpc://{triton_server['grpc']} (tensorrt_llm: ensemble)",
        "ready",
    ]
    assert rows["team/nowhere"][4].startswith("unreachable")


def test_a_streamed_stop_string_never_reaches_the_client_even_in_part(client):
    whole = client.chat.completions.create(
        model="team/smol-trtllm", messages=QUESTION, temperature=0, max_tokens=20, stop=[" Paris."]
    )
    chunks = list(
        client.chat.completions.create(
            model="team/smol-trtllm", messages=QUESTION, temperature=0, max_tokens=20, stop=[" Paris."], stream=True
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert "Paris" not in streamed and not streamed.endswith(" ")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
