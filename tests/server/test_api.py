"""The HTTP API in-process: the real app over the tiny model, driven with FastAPI's TestClient."""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest
from fastapi.testclient import TestClient

from qubrid_lab.engine.registry import ModelRegistry
from qubrid_lab.server.app import create_app
from qubrid_lab.settings import Settings

MODEL = "tiny-chat"
HELLO = [{"role": "user", "content": "Hello"}]
METRIC_KEYS = {"ttft_seconds", "tps", "total_time_seconds"}


@pytest.fixture
def client_for(chat_engine):
    """Builds a client for an app over ``chat`` (default: the tiny engine as 'tiny-chat') and ``settings``."""
    with ExitStack() as stack:

        def build(chat: dict | None = None, **settings) -> TestClient:
            registry = ModelRegistry(chat=chat or {MODEL: chat_engine})
            app = create_app(Settings(**settings), registry, close_registry=False)
            return stack.enter_context(TestClient(app))

        yield build


@pytest.fixture
def client(client_for) -> TestClient:
    return client_for()


def assert_error(response, status: int, code: str, param: str | None = None) -> dict:
    """The one error shape of the specs, with the expected status, code and (when given) param."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def chat_body(**fields) -> dict:
    return {"model": MODEL, "messages": HELLO, "temperature": 0, "max_tokens": 6, **fields}


def events(response) -> list[str]:
    """The ``data:`` payloads of an SSE response, in order."""
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line.removeprefix("data: ") for line in lines]


# --- errors: one shape, the right status, never a 500 ---------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"temperature": 3}, "temperature", ["temperature", "2"]),
        ({"temperature": -0.5}, "temperature", ["temperature", "0"]),
        ({"n": 0}, "n", ["n", "1"]),
        ({"top_p": 1.5}, "top_p", ["top_p", "1"]),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", ["stop", "4"]),
        ({"messages": []}, "messages", ["messages"]),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", ["role", "wizard"]),
        ({"messages": [{"role": "user"}]}, "messages[0].content", ["content"]),
        ({"messages": "hello"}, "messages", ["messages"]),
        ({"model": 5}, "model", ["model"]),
        ({"max_tokens": 0}, "max_tokens", ["max_tokens"]),
        ({"presence_penalty": 2.5}, "presence_penalty", ["presence_penalty"]),
        ({"n": "three"}, "n", ["n"]),
    ],
)
def test_invalid_chat_fields_are_400_naming_the_field(client, fields, param, words):
    error = assert_error(client.post("/v1/chat/completions", json=chat_body(**fields)), 400, "invalid_request", param)
    assert error["type"] == "invalid_request_error"
    assert all(word in error["message"] for word in words), error["message"]


def test_a_missing_field_is_named(client):
    assert_error(client.post("/v1/chat/completions", json={"model": MODEL}), 400, "invalid_request", "messages")


def test_every_problem_is_reported_at_once(client):
    error = assert_error(
        client.post("/v1/chat/completions", json=chat_body(temperature=3, top_p=2)), 400, "invalid_request"
    )
    assert "temperature" in error["message"] and "top_p" in error["message"]


@pytest.mark.parametrize("body", ["{not json", '{"model": "tiny-chat",', ""])
def test_a_body_that_is_not_json_is_400(client, body):
    response = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    error = assert_error(response, 400, "invalid_request")
    if body:
        assert "JSON" in error["message"]


@pytest.mark.parametrize("body", ["null", "[]", '"text"', "42"])
def test_a_json_body_that_is_not_an_object_is_400(client, body):
    response = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert_error(response, 400, "invalid_request")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"prompt": []}, "prompt"),
        ({"prompt": 7}, "prompt"),
        ({"n": 17}, "n"),
    ],
)
def test_invalid_completion_fields_are_400(client, fields, param):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, **fields}
    assert_error(client.post("/v1/completions", json=body), 400, "invalid_request", param)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": HELLO}),
        ("/v1/completions", {"prompt": "Hello"}),
        ("/v1/embeddings", {"input": "Hello"}),
    ],
)
def test_an_unknown_model_is_404_listing_the_loaded_ones(client, path, body):
    error = assert_error(client.post(path, json={"model": "no-such-model", **body}), 404, "model_not_found", "model")
    assert "no-such-model" in error["message"]


def test_a_chat_model_is_no_embedding_model(client):
    error = assert_error(client.post("/v1/embeddings", json={"model": MODEL, "input": "hi"}), 404, "model_not_found")
    assert "not an embedding model" in error["message"]


def test_an_image_for_a_text_only_model_is_400(client):
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    response = client.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": content}]))
    error = assert_error(response, 400, "invalid_request", "messages[0].content")
    assert "messages[0].content" in error["message"] and "image" in error["message"]


def test_a_prompt_longer_than_the_context_is_400(client, chat_engine):
    words = " ".join(["Hello"] * chat_engine.context_length)
    response = client.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": words}]))
    error = assert_error(response, 400, "invalid_request", "messages")
    assert str(chat_engine.context_length) in error["message"]


def test_max_tokens_beyond_the_context_is_400(client, chat_engine):
    response = client.post("/v1/chat/completions", json=chat_body(max_tokens=chat_engine.context_length))
    assert_error(response, 400, "invalid_request", "max_tokens")


@pytest.mark.parametrize(("method", "path"), [("GET", "/nowhere"), ("POST", "/v1/nowhere"), ("GET", "/v1")])
def test_an_unknown_route_is_404_not_found(client, method, path):
    assert_error(client.request(method, path), 404, "not_found")


def test_a_wrong_method_keeps_the_error_shape(client):
    response = client.get("/v1/chat/completions")
    assert_error(response, 405, "invalid_request")


# --- authentication and limits --------------------------------------------------------------------


def test_with_keys_configured_requests_need_the_right_key(client_for):
    client = client_for(api_keys=["qbt_test"])
    body = chat_body(max_tokens=2)
    missing = client.post("/v1/chat/completions", json=body)
    assert_error(missing, 401, "invalid_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer qbt_wrong"})
    assert_error(wrong, 401, "invalid_api_key")
    not_bearer = client.get("/v1/models", headers={"Authorization": "Basic qbt_test"})
    assert_error(not_bearer, 401, "invalid_api_key")
    right = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer qbt_test"})
    assert right.status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer qbt_test"}).status_code == 200
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["auth"] is True


def test_keys_are_also_read_from_the_key_file(client_for, tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\nqbt_from_file  # alice\n\n")
    client = client_for(api_key_file=key_file)
    assert_error(client.get("/v1/models"), 401, "invalid_api_key")
    assert client.get("/v1/models", headers={"Authorization": "Bearer qbt_from_file"}).status_code == 200


def test_tests_run_offline_in_a_temporary_home(isolated_environment):
    from huggingface_hub import constants

    assert Settings().home == isolated_environment
    assert Settings().load_api_keys() == set()
    assert constants.HF_HUB_OFFLINE


def test_without_keys_the_server_is_open(client):
    assert client.get("/v1/models").status_code == 200
    assert client.get("/health").json() == {
        "status": "ok",
        "models": [MODEL],
        "auth": False,
        "active_sequences": {MODEL: 0},
        "precision": {MODEL: {"dtype": "float32", "how": "set", "candidates": {}}},
    }


def test_a_body_over_the_limit_is_413(client_for):
    client = client_for(max_request_bytes=1024)
    big = chat_body(messages=[{"role": "user", "content": "x" * 2000}])
    error = assert_error(client.post("/v1/chat/completions", json=big), 413, "payload_too_large")
    assert "1024" in error["message"]
    assert client.post("/v1/chat/completions", json=chat_body(max_tokens=2)).status_code == 200


def test_a_chunked_body_over_the_limit_is_413(client_for):
    client = client_for(max_request_bytes=1024)
    payload = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * 5000}])).encode()
    chunks = iter([payload[i : i + 512] for i in range(0, len(payload), 512)])
    response = client.post("/v1/chat/completions", content=chunks, headers={"Content-Type": "application/json"})
    assert_error(response, 413, "payload_too_large")


# --- models ---------------------------------------------------------------------------------------


def test_models_are_listed_and_described(client):
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == [MODEL]
    model = client.get(f"/v1/models/{MODEL}").json()
    assert model == listing["data"][0]
    assert model["object"] == "model" and model["owned_by"] == "tests" and model["created"] > 0
    assert (model["kind"], model["vision"]) == ("chat", False)  # extensions, so clients need not probe


def test_an_unknown_model_id_is_404(client):
    error = assert_error(client.get("/v1/models/unknown"), 404, "model_not_found", "model")
    assert MODEL in error["message"]


def test_model_ids_with_slashes_work(client_for, engine_factory):
    engine = engine_factory("org/tiny-chat")
    client = client_for(chat={"org/tiny-chat": engine})
    model = client.get("/v1/models/org/tiny-chat")
    assert model.status_code == 200 and model.json()["id"] == "org/tiny-chat"
    reply = client.post("/v1/chat/completions", json=chat_body(model="org/tiny-chat", max_tokens=2))
    assert reply.status_code == 200 and reply.json()["model"] == "org/tiny-chat"
    assert_error(client.get("/v1/models/org/other"), 404, "model_not_found")


# --- chat completions -----------------------------------------------------------------------------


def test_a_chat_completion_has_usage_and_metrics(client, chat_engine):
    response = client.post("/v1/chat/completions", json=chat_body(max_tokens=6))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(chat_engine.encode_chat(HELLO)) > 0
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    metrics = body["x_metrics"]
    assert set(metrics) == METRIC_KEYS
    assert 0 <= metrics["ttft_seconds"] <= metrics["total_time_seconds"] and metrics["tps"] > 0


def test_n_choices_are_numbered_and_counted(client):
    body = client.post("/v1/chat/completions", json=chat_body(n=3, temperature=1, seed=3, max_tokens=5)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert 3 <= body["usage"]["completion_tokens"] <= 15


def test_max_completion_tokens_is_honoured(client):
    body = client.post("/v1/chat/completions", json=chat_body(max_tokens=None, max_completion_tokens=3)).json()
    assert body["usage"]["completion_tokens"] == 3


def test_the_same_seed_gives_the_same_reply(client):
    request = chat_body(temperature=1, seed=1234, max_tokens=12)
    first = client.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
    again = client.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
    assert first == again


def test_text_parts_read_like_a_string(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    as_parts = client.post("/v1/chat/completions", json=chat_body(messages=parts)).json()
    as_string = client.post("/v1/chat/completions", json=chat_body()).json()
    assert as_parts["choices"][0]["message"] == as_string["choices"][0]["message"]
    # the same prompt tokens (the second read all but the last from the prompt cache)
    assert as_parts["usage"]["prompt_tokens"] == as_string["usage"]["prompt_tokens"]
    assert as_string["usage"]["prompt_tokens_details"]["cached_tokens"] == as_string["usage"]["prompt_tokens"] - 1


def test_null_means_the_default_and_unknown_fields_are_ignored(client):
    body = chat_body(temperature=None, top_p=None, n=None, stop=None, logprobs=False, some_future_field={"x": 1})
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and len(response.json()["choices"]) == 1


def test_a_stop_string_ends_the_reply(client):
    full = client.post("/v1/chat/completions", json=chat_body(max_tokens=30)).json()["choices"][0]["message"]["content"]
    start = next(
        i for i in range(2, len(full) - 3) if "\ufffd" not in full[i : i + 3] and full.find(full[i : i + 3]) == i
    )
    stop = full[start : start + 3]
    reply = client.post("/v1/chat/completions", json=chat_body(max_tokens=30, stop=stop)).json()["choices"][0]
    assert reply["finish_reason"] == "stop"
    assert reply["message"]["content"] == full[:start]


def test_a_chat_stream_follows_the_chunk_format(client):
    plain = client.post("/v1/chat/completions", json=chat_body(max_tokens=8)).json()
    with client.stream("POST", "/v1/chat/completions", json=chat_body(max_tokens=8, stream=True)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = events(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert set(chunks[-1]["x_metrics"]) == METRIC_KEYS
    assert all("x_metrics" not in c for c in chunks[:-1])
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == plain["choices"][0]["message"]["content"]


def test_a_stream_can_end_with_usage(client, chat_engine):
    request = chat_body(max_tokens=5, stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=request) as response:
        payloads = events(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    last = chunks[-1]
    assert last["choices"] == []
    prompt_tokens = len(chat_engine.encode_chat(HELLO))
    cached = last["usage"]["prompt_tokens_details"]["cached_tokens"]  # this prompt may have been sent before
    assert last["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 5,
        "total_tokens": prompt_tokens + 5,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    assert 0 <= cached < prompt_tokens
    assert set(last["x_metrics"]) == METRIC_KEYS
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_a_stream_with_n_choices_opens_and_closes_each(client):
    with client.stream("POST", "/v1/chat/completions", json=chat_body(n=2, max_tokens=4, stream=True)) as response:
        chunks = [json.loads(p) for p in events(response)[:-1]]
    opened = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["delta"].get("role") == "assistant"]
    finished = sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"])
    assert opened == [0, 1] and finished == [0, 1]


def test_a_stream_request_with_a_bad_field_is_a_plain_400(client):
    response = client.post("/v1/chat/completions", json=chat_body(stream=True, temperature=9))
    assert_error(response, 400, "invalid_request", "temperature")


# --- text completions -----------------------------------------------------------------------------


def test_two_prompts_with_two_choices_give_four(client, chat_engine):
    prompts = ["Hello there", "The capital of France is"]
    body = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": prompts, "n": 2, "max_tokens": 4, "temperature": 0}
    ).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in body["choices"]]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: both choices of a prompt agree
    assert body["usage"]["prompt_tokens"] == sum(len(chat_engine.encode_text(p)) for p in prompts)
    assert body["usage"]["completion_tokens"] == 16
    assert set(body["x_metrics"]) == METRIC_KEYS


def test_echo_puts_the_prompt_first(client):
    request = {"model": MODEL, "prompt": "Hello there", "max_tokens": 4, "temperature": 0}
    plain = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    echoed = client.post("/v1/completions", json={**request, "echo": True}).json()["choices"][0]["text"]
    assert echoed == "Hello there" + plain


def test_a_completion_stream_echoes_and_ends_with_done(client):
    request = {"model": MODEL, "prompt": "Hello there", "max_tokens": 4, "temperature": 0}
    plain = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**request, "echo": True, "stream": True}) as response:
        payloads = events(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[0]["choices"][0]["text"] == "Hello there"
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello there" + plain
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and set(chunks[-1]["x_metrics"]) == METRIC_KEYS


def test_an_event_stays_one_line_for_clients_that_split_at_unicode_line_breaks():
    """A model may generate U+2028, U+2029 or U+0085; httpx's aiter_lines (str.splitlines) breaks lines there."""
    import httpx._decoders

    from qubrid_lab.server.sse import sse_event

    text = "a\u2028b\u2029c\x85d\u00e9"
    event = sse_event({"choices": [{"delta": {"content": text}}]})
    lines = [line for line in httpx._decoders.LineDecoder().decode(event) if line]
    assert len(lines) == 1 and json.loads(lines[0].removeprefix("data: "))["choices"][0]["delta"]["content"] == text
