"""The ``openai`` backend end to end: a second ``qubrid-lab serve`` in front of the session's server.

Every answer through the front server must equal the upstream's own answer to the same request.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import aiohttp
import httpx
import numpy as np
import openai
import pytest
from aiohttp import web

from tests.e2e.conftest import CHAT_MODEL, EMBEDDING_MODEL, free_port, start_server, stop_server

pytestmark = pytest.mark.e2e

STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to code."}]


def entry(model_id: str, kind: str, base_url: str, upstream_model: str, **extra) -> dict:
    return {
        "id": model_id,
        "kind": kind,
        "backend": "openai",
        "base_url": base_url,
        "upstream_model": upstream_model,
        **extra,
    }


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    """An upstream of its own (chat model only), for the test that kills it."""
    running = start_server(tmp_path_factory.mktemp("fragile"), "--dtype", "float32", "--model", CHAT_MODEL)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def usage_free(server):
    """A relay to the session's server that drops every usage report, as upstreams that ignore
    ``stream_options`` do; its base URL."""
    import asyncio

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        body.pop("stream_options", None)
        headers = {"Authorization": request.headers.get("Authorization", "")}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.base_url}{request.path}", json=body, headers=headers) as upstream:
                if not body.get("stream"):
                    answer = await upstream.json()
                    answer.pop("usage", None)
                    return web.json_response(answer, status=upstream.status)
                response = web.StreamResponse(status=upstream.status, headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)
                async for line in upstream.content:
                    await response.write(line)
                return response

    app = web.Application()
    app.router.add_post("/v1/{route:.*}", relay)
    loop, port = asyncio.new_event_loop(), free_port()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}/v1"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def front(server, fragile, usage_free, tmp_path_factory):
    """A server with no local model: every model it serves is one of the upstream's, under a team id."""
    upstream = f"{server.base_url}/v1"
    catalogue = tmp_path_factory.mktemp("front-catalogue") / "catalogue.json"
    catalogue.write_text(
        json.dumps(
            [
                entry("team/smol", "chat", upstream, CHAT_MODEL, api_key_env="TEAM_UPSTREAM_KEY"),
                entry("team/minilm", "embedding", upstream, EMBEDDING_MODEL, api_key_env="TEAM_UPSTREAM_KEY"),
                entry("team/no-such", "chat", upstream, "no/such-model", api_key_env="TEAM_UPSTREAM_KEY"),
                entry("team/wrong-key", "chat", upstream, CHAT_MODEL, api_key_env="TEAM_WRONG_KEY"),
                entry("team/nowhere", "chat", f"http://127.0.0.1:{free_port()}/v1", CHAT_MODEL),
                entry("team/fragile", "chat", f"{fragile.base_url}/v1", CHAT_MODEL),
                entry(
                    "team/counted",
                    "chat",
                    usage_free,
                    CHAT_MODEL,
                    api_key_env="TEAM_UPSTREAM_KEY",
                    tokenizer="bundled:smollm2-135m-instruct",
                ),
                entry("team/estimated", "chat", usage_free, CHAT_MODEL, api_key_env="TEAM_UPSTREAM_KEY"),
                entry(
                    "team/minilm-counted",
                    "embedding",
                    usage_free,
                    EMBEDDING_MODEL,
                    api_key_env="TEAM_UPSTREAM_KEY",
                    tokenizer="bundled:all-minilm-l6-v2",
                ),
            ]
        )
    )
    models = [
        arg
        for m in (
            "team/smol",
            "team/minilm",
            "team/no-such",
            "team/wrong-key",
            "team/nowhere",
            "team/fragile",
            "team/counted",
            "team/estimated",
            "team/minilm-counted",
        )
        for arg in ("--model", m)
    ]
    running = start_server(
        tmp_path_factory.mktemp("front"),
        "--catalogue-file",
        str(catalogue),
        *models,
        env={"TEAM_UPSTREAM_KEY": server.api_key, "TEAM_WRONG_KEY": "qbt_wrong"},
    )
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def via(front):
    return openai.OpenAI(base_url=f"{front.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_are_listed_with_their_kind(via):
    kinds = {m.id: m.model_extra["kind"] for m in via.models.list()}
    assert kinds["team/smol"] == "chat" and kinds["team/minilm"] == "embedding"
    assert via.models.retrieve("team/smol").owned_by == "127.0.0.1"  # no owned_by given: the upstream's host


def test_chat_equals_the_upstreams_own_answer(via, client, checked_answers):
    question = list(checked_answers["chat"].messages)
    direct = client.chat.completions.create(model=CHAT_MODEL, messages=question, temperature=0, max_tokens=30)
    proxied = via.chat.completions.create(model="team/smol", messages=question, temperature=0, max_tokens=30)
    assert proxied.model == "team/smol"
    assert proxied.choices[0].message.content == direct.choices[0].message.content
    assert proxied.choices[0].finish_reason == direct.choices[0].finish_reason == "stop"
    # the upstream's own count; it had just read the same prompt, so all but its last token came from its cache
    assert proxied.usage.model_dump(exclude={"prompt_tokens_details"}) == direct.usage.model_dump(
        exclude={"prompt_tokens_details"}
    )
    assert proxied.usage.prompt_tokens_details.cached_tokens == direct.usage.prompt_tokens - 1
    metrics = proxied.model_extra["x_metrics"]  # measured here, around the upstream's time
    assert 0 < metrics["ttft_seconds"] <= metrics["total_time_seconds"]
    assert metrics["total_time_seconds"] >= direct.model_extra["x_metrics"]["total_time_seconds"] * 0.5


def test_streaming_passes_chunks_through_as_they_come(via, client):
    direct = client.chat.completions.create(model=CHAT_MODEL, messages=STORY, temperature=0, max_tokens=40)
    chunks = list(
        via.chat.completions.create(
            model="team/smol",
            messages=STORY,
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 40 and chunks[-1].usage.prompt_tokens == direct.usage.prompt_tokens


def test_n_seed_stop_and_penalties_reach_the_upstream(via, client):
    kwargs = dict(messages=STORY, temperature=1.0, max_tokens=20, n=2, seed=7, frequency_penalty=0.5, stop=["\n"])
    direct = client.chat.completions.create(model=CHAT_MODEL, **kwargs)
    proxied = via.chat.completions.create(model="team/smol", **kwargs)
    assert [c.message.content for c in proxied.choices] == [c.message.content for c in direct.choices]
    assert proxied.choices[0].message.content != proxied.choices[1].message.content
    assert proxied.usage.completion_tokens == direct.usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_pass_through(via, client, stream):
    kwargs = dict(messages=STORY, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    direct = client.chat.completions.create(model=CHAT_MODEL, **kwargs).choices[0].logprobs.content
    if stream:
        proxied = [
            token
            for chunk in via.chat.completions.create(model="team/smol", **kwargs, stream=True)
            for choice in chunk.choices
            if choice.logprobs
            for token in choice.logprobs.content
        ]
    else:
        proxied = via.chat.completions.create(model="team/smol", **kwargs).choices[0].logprobs.content
    assert [t.model_dump() for t in proxied] == [t.model_dump() for t in direct]
    text = via.completions.create(model="team/smol", prompt="One, two,", max_tokens=4, temperature=0, logprobs=2)
    assert text.choices[0].logprobs.tokens and "".join(text.choices[0].logprobs.tokens) == text.choices[0].text
    with pytest.raises(openai.BadRequestError) as refused:
        via.completions.create(model="team/smol", prompt="One, two,", max_tokens=4, logprobs=2, echo=True)
    assert refused.value.body["param"] == "echo"


def test_response_format_passes_through(via, client):
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon", "Nice"]}}, "required": ["city"]}
    kwargs = dict(
        messages=[{"role": "user", "content": "Name the capital city of France."}],
        max_tokens=20,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )
    direct = client.chat.completions.create(model=CHAT_MODEL, **kwargs)
    proxied = via.chat.completions.create(model="team/smol", **kwargs)
    assert proxied.choices[0].message.content == direct.choices[0].message.content == '{"city":"Paris"}'


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_pass_through(via, client, stream):
    from tests.e2e.test_request_surface import ASK_WEATHER, WEATHER, streamed_calls

    kwargs = dict(messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=0)
    direct = client.chat.completions.create(model=CHAT_MODEL, **kwargs).choices[0].message.tool_calls
    expected = [(call.function.name, call.function.arguments) for call in direct]
    if stream:
        (calls,), reasons = streamed_calls(via.chat.completions.create(model="team/smol", **kwargs, stream=True))
        assert reasons == ["tool_calls"] and [(c["name"], c["arguments"]) for c in calls] == expected
    else:
        answer = via.chat.completions.create(model="team/smol", **kwargs).choices[0]
        assert answer.finish_reason == "tool_calls"
        assert [(c.function.name, c.function.arguments) for c in answer.message.tool_calls] == expected


def test_text_completions_with_a_prompt_list_and_echo(via, client):
    kwargs = dict(prompt=["The capital of France is", "One, two,"], max_tokens=8, temperature=0, echo=True)
    direct = client.completions.create(model=CHAT_MODEL, **kwargs)
    proxied = via.completions.create(model="team/smol", **kwargs)
    assert [c.text for c in proxied.choices] == [c.text for c in direct.choices]
    assert proxied.usage == direct.usage


def test_embeddings_pass_through(via, client):
    texts = ["A cat sits on the mat.", "The stock market fell sharply today."]
    direct = client.embeddings.create(model=EMBEDDING_MODEL, input=texts)
    proxied = via.embeddings.create(model="team/minilm", input=texts)
    assert np.allclose([d.embedding for d in proxied.data], [d.embedding for d in direct.data], atol=1e-6)
    assert proxied.usage.prompt_tokens == direct.usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_sending_no_usage_is_counted_with_the_entrys_tokenizer(via, client, stream):
    kwargs = dict(messages=STORY, temperature=1.0, seed=3, max_tokens=24, n=2)
    direct = client.chat.completions.create(model=CHAT_MODEL, **kwargs)
    answer = via.chat.completions.create(
        model="team/counted", **kwargs, stream=stream, **({"stream_options": {"include_usage": True}} if stream else {})
    )
    usage = list(answer)[-1].usage if stream else answer.usage
    assert usage.prompt_tokens == direct.usage.prompt_tokens  # the same chat template, counted here
    # our count is of the text the upstream sent, re-tokenized: within a token or two of the ids it generated
    assert abs(usage.completion_tokens - direct.usage.completion_tokens) <= 4
    assert usage.completion_tokens > 24


def test_without_a_tokenizer_an_upstream_sending_no_usage_is_estimated(via, client):
    direct = client.chat.completions.create(model=CHAT_MODEL, messages=STORY, temperature=0, max_tokens=32)
    estimated = via.chat.completions.create(model="team/estimated", messages=STORY, temperature=0, max_tokens=32)
    assert estimated.choices[0].message.content == direct.choices[0].message.content
    text = estimated.choices[0].message.content
    assert estimated.usage.completion_tokens == -(-len(text.encode()) // 4)  # 4 bytes a token, never free
    assert estimated.usage.prompt_tokens > 0


def test_embeddings_from_an_upstream_sending_no_usage_are_counted(via, client):
    texts = ["A cat sits on the mat.", "The stock market fell sharply today."]
    direct = client.embeddings.create(model=EMBEDDING_MODEL, input=texts)
    counted = via.embeddings.create(model="team/minilm-counted", input=texts)
    assert counted.usage.prompt_tokens == direct.usage.prompt_tokens  # [CLS] and [SEP] included, as the model sees


def test_upstream_refusals_keep_their_status_and_message(front):
    too_long = httpx.post(
        f"{front.base_url}/v1/chat/completions",
        timeout=60,
        json={"model": "team/smol", "messages": STORY, "max_tokens": 100000},
    )
    assert too_long.status_code == 400
    assert too_long.json()["error"]["param"] == "max_tokens" and "max_tokens" in too_long.json()["error"]["message"]
    missing = httpx.post(
        f"{front.base_url}/v1/chat/completions", timeout=60, json={"model": "team/no-such", "messages": STORY}
    )
    assert missing.status_code == 404 and "no/such-model" in missing.json()["error"]["message"]


@pytest.mark.parametrize(("model", "words"), [("team/wrong-key", "TEAM_WRONG_KEY"), ("team/nowhere", "reached")])
def test_a_refused_key_or_an_unreachable_upstream_is_502(front, model, words):
    response = httpx.post(
        f"{front.base_url}/v1/chat/completions", timeout=60, json={"model": model, "messages": STORY, "max_tokens": 5}
    )
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_error" and model in error["message"] and words in error["message"]
    assert httpx.get(f"{front.base_url}/health").status_code == 200
    metrics = httpx.get(f"{front.base_url}/metrics").text  # the front has no keys: /metrics is open
    assert f'qubrid_lab_backend_up{{backend="openai",model="{model}"}} 0.0' in metrics
    assert 'qubrid_lab_backend_up{backend="openai",model="team/smol"} 1.0' in metrics


def test_a_client_hanging_up_cancels_the_upstream_request(front, http):
    body = {"model": "team/smol", "messages": STORY, "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=front.base_url) as session:
        with session.stream("POST", "/v1/chat/completions", json=body) as response:
            for _ in zip(range(5), response.iter_lines()):
                pass
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and http.get("/health").json()["active_sequences"][CHAT_MODEL]:
        time.sleep(0.2)
    assert http.get("/health").json()["active_sequences"][CHAT_MODEL] == 0


def test_an_upstream_killed_mid_request_is_502_and_the_server_stays_up(front, fragile):
    outcome = {}

    def ask():
        outcome["response"] = httpx.post(
            f"{front.base_url}/v1/chat/completions",
            timeout=120,
            json={"model": "team/fragile", "messages": STORY, "max_tokens": 2000, "temperature": 0},
        )

    asking = threading.Thread(target=ask)
    asking.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if httpx.get(f"{fragile.base_url}/health").json()["active_sequences"][CHAT_MODEL]:
            break
        time.sleep(0.1)
    time.sleep(1)  # let it generate a little
    os.killpg(fragile.process.pid, signal.SIGKILL)
    asking.join(timeout=60)
    response = outcome["response"]
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_error"
    assert "team/fragile" in response.json()["error"]["message"]
    assert httpx.get(f"{front.base_url}/health").status_code == 200


def test_an_unset_key_variable_is_refused_at_start(server, tmp_path):
    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(
        json.dumps(
            [entry("team/smol", "chat", f"{server.base_url}/v1", CHAT_MODEL, api_key_env="QUBRID_TEST_UNSET_KEY")]
        )
    )
    with pytest.raises(RuntimeError, match="QUBRID_TEST_UNSET_KEY, which is not set"):
        start_server(tmp_path, "--catalogue-file", str(catalogue), "--model", "team/smol")


def test_a_tokenizer_that_cannot_be_loaded_is_refused_at_start(server, tmp_path):
    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(
        json.dumps(
            [
                entry(
                    "team/smol",
                    "chat",
                    f"{server.base_url}/v1",
                    CHAT_MODEL,
                    tokenizer=f"dir:{tmp_path / 'no-such-tokenizer'}",
                )
            ]
        )
    )
    with pytest.raises(RuntimeError, match="names tokenizer 'dir:.*no-such-tokenizer', which cannot be loaded"):
        start_server(tmp_path, "--catalogue-file", str(catalogue), "--model", "team/smol")


def test_models_list_reports_each_upstreams_health(server, tmp_path, capsys, monkeypatch):
    from qubrid_lab.cli import main

    upstream = f"{server.base_url}/v1"
    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(
        json.dumps(
            [
                entry("team/smol", "chat", upstream, CHAT_MODEL, api_key_env="TEAM_UPSTREAM_KEY"),
                entry("team/no-such", "chat", upstream, "no/such-model", api_key_env="TEAM_UPSTREAM_KEY"),
                entry("team/wrong-key", "chat", upstream, CHAT_MODEL, api_key_env="TEAM_WRONG_KEY"),
                entry("team/unset", "chat", upstream, CHAT_MODEL, api_key_env="QUBRID_TEST_UNSET_KEY"),
                entry("team/nowhere", "chat", f"http://127.0.0.1:{free_port()}/v1", CHAT_MODEL),
            ]
        )
    )
    monkeypatch.setenv("TEAM_UPSTREAM_KEY", server.api_key)
    monkeypatch.setenv("TEAM_WRONG_KEY", "qbt_wrong")
    monkeypatch.delenv("QUBRID_TEST_UNSET_KEY", raising=False)
    assert main(["--home", str(tmp_path), "models", "list", "--catalogue-file", str(catalogue)]) == 0
    rows = {row[0]: row for row in (line.split("\t") for line in capsys.readouterr().out.splitlines())}
    assert rows["team/smol"][2:] == ["openai", f"{upstream} ({CHAT_MODEL})", "ready"]
    assert rows["team/no-such"][4] == "reachable, but it does not list 'no/such-model'"
    assert rows["team/wrong-key"][4] == "key refused (401)"
    assert "QUBRID_TEST_UNSET_KEY, which is not set" in rows["team/unset"][4]
    assert rows["team/nowhere"][4].startswith("unreachable: ConnectError")
