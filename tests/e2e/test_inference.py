"""The inference API end to end: a real server process, the official openai client and raw HTTP."""

from __future__ import annotations

import base64
import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from tests.e2e.conftest import CHAT_MODEL, EMBEDDING_MODEL

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to code."}]


def test_chat_answers_with_real_usage_and_metrics(client, checked_answers):
    capital = checked_answers["chat"]
    reply = client.chat.completions.create(
        model=CHAT_MODEL, messages=list(capital.messages), temperature=0, max_tokens=30
    )
    choice = reply.choices[0]
    assert capital.expected in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.model == CHAT_MODEL
    assert reply.usage.prompt_tokens > 10  # the chat template adds a system prompt
    assert 0 < reply.usage.completion_tokens <= 30
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    metrics = reply.model_extra["x_metrics"]
    assert 0 < metrics["ttft_seconds"] <= metrics["total_time_seconds"]
    assert metrics["tps"] == pytest.approx(reply.usage.completion_tokens / metrics["total_time_seconds"], rel=0.05)


def test_text_parts_are_read_like_a_string(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    as_parts = client.chat.completions.create(model=CHAT_MODEL, messages=parts, temperature=0, max_tokens=20)
    as_string = client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, temperature=0, max_tokens=20)
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content


def test_length_limit_sets_finish_reason(client):
    reply = client.chat.completions.create(model=CHAT_MODEL, messages=STORY, temperature=0, max_tokens=7)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7
    newer = client.chat.completions.create(model=CHAT_MODEL, messages=STORY, temperature=0, max_completion_tokens=7)
    assert newer.choices[0].message.content == reply.choices[0].message.content


def test_streaming_matches_the_non_streamed_answer(client):
    whole = client.chat.completions.create(model=CHAT_MODEL, messages=STORY, temperature=0, max_tokens=40)
    chunks = list(
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=STORY,
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5  # really incremental
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].model_extra["x_metrics"]["ttft_seconds"] > 0


def test_a_conversations_next_turn_reports_its_history_as_cached_tokens(client):
    """The prompt cache, seen as OpenAI reports it: the second turn begins with the whole first prompt."""
    messages = [{"role": "user", "content": "Name one planet of the solar system, in one word."}]
    first = client.chat.completions.create(model=CHAT_MODEL, messages=messages, temperature=0, max_tokens=5)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And one more, please?"},
    ]
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=messages,
        temperature=0,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage][0]
    assert usage.prompt_tokens > first.usage.prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens


def test_stream_ends_with_done_and_metrics_without_usage(http):
    body = {"model": CHAT_MODEL, "messages": QUESTION, "max_tokens": 10, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert set(last["x_metrics"]) == {"ttft_seconds", "tps", "total_time_seconds"}
    assert "usage" not in last


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices(client, stream):
    kwargs = dict(model=CHAT_MODEL, messages=STORY, temperature=1.0, max_tokens=20, n=2, seed=7)
    if stream:
        texts = {0: "", 1: ""}
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
        outputs = [texts[0], texts[1]]
    else:
        reply = client.chat.completions.create(**kwargs)
        assert [c.index for c in reply.choices] == [0, 1]
        outputs = [c.message.content for c in reply.choices]
    assert all(outputs) and outputs[0] != outputs[1]  # each choice samples on its own


def test_stop_string_is_cut_even_across_tokens(client, checked_answers):
    question = list(checked_answers["chat"].messages)
    free = client.chat.completions.create(model=CHAT_MODEL, messages=question, temperature=0, max_tokens=30)
    text = free.choices[0].message.content
    stop = "of Fra"  # spans tokens: "of", " France"
    assert stop in text
    for stream in (False, True):
        if stream:
            out = "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(
                    model=CHAT_MODEL, messages=question, temperature=0, max_tokens=30, stop=[stop, "zzz"], stream=True
                )
                if c.choices
            )
        else:
            reply = client.chat.completions.create(
                model=CHAT_MODEL, messages=question, temperature=0, max_tokens=30, stop=stop
            )
            out = reply.choices[0].message.content
            assert reply.choices[0].finish_reason == "stop"
        assert out == text[: text.index(stop)]


def test_seed_makes_sampling_reproducible(client):
    def sample(seed):
        return (
            client.chat.completions.create(model=CHAT_MODEL, messages=STORY, temperature=1.0, max_tokens=25, seed=seed)
            .choices[0]
            .message.content
        )

    first = sample(1234)
    assert sample(1234) == first
    assert sample(99) != first


def test_penalties_reduce_repetition(client):
    """Greedy fp32 continues this prompt with one phrase over and over ("-to-many-to-many…"); penalties on
    the tokens already generated must break that loop."""
    prompt = "one one one one one one one one"

    def distinct_words(**penalty):
        text = (
            client.completions.create(model=CHAT_MODEL, prompt=prompt, temperature=0, max_tokens=30, **penalty)
            .choices[0]
            .text
        )
        return len(set(text.lower().split()))

    plain = distinct_words()
    assert plain <= 2  # greedy decoding keeps repeating itself
    assert distinct_words(frequency_penalty=2.0) > plain + 3
    assert distinct_words(presence_penalty=2.0) > plain + 1
    hello = [{"role": "user", "content": "hello hello hello hello hello hello hello hello hello hello"}]
    chat = client.chat.completions.create(model=CHAT_MODEL, messages=hello, temperature=0, max_tokens=30)
    penalised = client.chat.completions.create(
        model=CHAT_MODEL, messages=hello, temperature=0, max_tokens=30, frequency_penalty=2.0
    )
    assert penalised.choices[0].message.content != chat.choices[0].message.content


def test_legacy_completions_with_echo_and_prompt_list(client, checked_answers):
    capital = checked_answers["text"]
    reply = client.completions.create(
        model=CHAT_MODEL, prompt=[capital.prompt, "One, two,"], max_tokens=8, temperature=0, echo=True
    )
    assert reply.object == "text_completion"
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].text.startswith(f"{capital.prompt} {capital.expected}")
    assert reply.choices[1].text.startswith("One, two,")
    assert reply.usage.completion_tokens <= 16
    assert reply.usage.prompt_tokens == 5 + 4  # both prompts counted, as tokenized by the model


def test_streamed_completion_equals_the_whole_one(client):
    prompt = "The capital of France is"
    whole = client.completions.create(model=CHAT_MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=CHAT_MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    )
    assert whole.choices[0].text == prompt + streamed
    assert whole.choices[0].finish_reason == "length"


def test_embeddings_place_similar_sentences_closer(client):
    texts = ["A cat sits on the mat.", "A kitten is resting on a rug.", "The stock market fell sharply today."]
    reply = client.embeddings.create(model=EMBEDDING_MODEL, input=texts)
    vectors = np.array([d.embedding for d in reply.data])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > unrelated + 0.3
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 10


def test_embeddings_base64_decodes_to_the_float_vectors(http):
    as_float = http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": "hello world"}).json()
    as_b64 = http.post(
        "/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": "hello world", "encoding_format": "base64"}
    ).json()
    decoded = np.frombuffer(base64.b64decode(as_b64["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, as_float["data"][0]["embedding"], atol=1e-6)


def test_models_list_and_get_with_slashes(client):
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {CHAT_MODEL, EMBEDDING_MODEL}
    model = client.models.retrieve(CHAT_MODEL)
    assert model.owned_by == "HuggingFaceTB" and model.created > 1_600_000_000
    assert client.models.retrieve(EMBEDDING_MODEL).owned_by == "sentence-transformers"
    kinds = {m.id: (m.model_extra["kind"], m.model_extra["vision"]) for m in listed.values()}
    assert kinds == {CHAT_MODEL: ("chat", False), EMBEDDING_MODEL: ("embedding", False)}


def test_auth_rejects_missing_and_wrong_keys(server):
    for headers in ({}, {"Authorization": "Bearer qbt_wrong"}, {"Authorization": "Basic abc"}):
        response = httpx.get(f"{server.base_url}/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="qbt_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=CHAT_MODEL, messages=QUESTION)
    assert httpx.get(f"{server.base_url}/health").status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"model": "no/such-model", "messages": QUESTION}, 404, "model_not_found", "model"),
        ({"model": EMBEDDING_MODEL, "messages": QUESTION}, 404, "model_not_found", "model"),
        ({"model": CHAT_MODEL, "messages": QUESTION, "temperature": 2.5}, 400, "invalid_request", "temperature"),
        ({"model": CHAT_MODEL, "messages": QUESTION, "top_p": 1.5}, 400, "invalid_request", "top_p"),
        ({"model": CHAT_MODEL, "messages": QUESTION, "n": 0}, 400, "invalid_request", "n"),
        ({"model": CHAT_MODEL, "messages": QUESTION, "max_tokens": 0}, 400, "invalid_request", "max_tokens"),
        ({"model": CHAT_MODEL, "messages": QUESTION, "max_tokens": 100000}, 400, "invalid_request", "max_tokens"),
        (
            {"model": CHAT_MODEL, "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]},
            400,
            "invalid_request",
            "stop",
        ),
        ({"model": CHAT_MODEL, "messages": []}, 400, "invalid_request", "messages"),
        (
            {"model": CHAT_MODEL, "messages": [{"role": "robot", "content": "hi"}]},
            400,
            "invalid_request",
            "messages[0].role",
        ),
        (
            {
                "model": CHAT_MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
                    }
                ],
            },
            400,
            "invalid_request",
            "messages[0].content",
        ),
    ],
)
def test_chat_errors_name_the_problem(http, body, status, code, field):
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert error["param"] == field
    assert field.split(".")[0].split("[")[0] in error["message"]


def test_other_endpoint_errors(http):
    cases = [
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model_not_found"),
        ("/v1/embeddings", {"model": CHAT_MODEL, "input": "x"}, 404, "model_not_found"),
        ("/v1/embeddings", {"model": EMBEDDING_MODEL, "input": ""}, 400, "invalid_request"),
        ("/v1/embeddings", {"model": EMBEDDING_MODEL, "input": "x", "encoding_format": "hex"}, 400, "invalid_request"),
    ]
    for path, body, status, code in cases:
        response = http.post(path, json=body)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), path
    garbage = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert garbage.status_code == 400 and "JSON" in garbage.json()["error"]["message"]
    missing = http.get("/v1/models/no/such/model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_disconnected_stream_frees_its_slot_at_once(server, http):
    """A client that hangs up mid-stream must not keep decoding: the next request is served at full speed."""
    body = {"model": CHAT_MODEL, "messages": STORY, "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {server.api_key}"}) as session:
        with session.stream("POST", "/v1/chat/completions", json=body) as response:
            for _ in zip(range(5), response.iter_lines()):
                pass
    # While the abandoned request were still running, this one would share every decode step with it.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = http.get("/health").json()
        if health.get("active_sequences", {}).get(CHAT_MODEL) == 0:
            break
        time.sleep(0.2)
    assert http.get("/health").json()["active_sequences"][CHAT_MODEL] == 0


def test_concurrent_requests_are_all_served(client, checked_answers):
    """Six requests decoded in one batch each get the answer the same request gets alone (float32 is
    batch-independent)."""
    question = list(checked_answers["chat"].messages)

    def ask() -> str:
        return (
            client.chat.completions.create(model=CHAT_MODEL, messages=question, temperature=0, max_tokens=20)
            .choices[0]
            .message.content
        )

    alone = ask()
    assert checked_answers["chat"].expected in alone
    results, errors = {}, []

    def ask_into(i):
        try:
            results[i] = ask()
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ask_into, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(results) == 6
    assert set(results.values()) == {alone}
