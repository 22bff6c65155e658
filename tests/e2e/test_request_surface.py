"""The OpenAI request surface beyond the seed specs, end to end with the official ``openai`` client against
the session's real server (the bundled SmolLM2): log probabilities first."""

from __future__ import annotations

import json
import math

import numpy as np
import openai
import pytest

from tests.e2e.conftest import CHAT_MODEL, EMBEDDING_MODEL

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "Name the capital city of France."}]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_join_to_the_content_with_exactly_top_logprobs_rivals(client, stream):
    kwargs = dict(
        model=CHAT_MODEL, messages=QUESTION, max_tokens=16, temperature=0.8, seed=4, n=2, logprobs=True, top_logprobs=4
    )
    if stream:
        texts, tokens = ["", ""], [[], []]
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
                tokens[choice.index] += choice.logprobs.content if choice.logprobs else []
    else:
        answer = client.chat.completions.create(**kwargs)
        texts = [choice.message.content for choice in answer.choices]
        tokens = [choice.logprobs.content for choice in answer.choices]
    whole = client.chat.completions.create(**kwargs)  # the same seed: the same tokens
    assert texts == [choice.message.content for choice in whole.choices]
    for text, content in zip(texts, tokens):
        assert "".join(token.token for token in content) == text
        for token in content:
            assert token.logprob <= 0 and bytes(token.bytes).decode() == token.token
            assert len(token.top_logprobs) == 4
            rivals = [rival.logprob for rival in token.top_logprobs]
            assert rivals == sorted(rivals, reverse=True) and token.logprob <= rivals[0] + 1e-6


def test_greedy_tokens_are_their_positions_most_likely(client):
    answer = client.chat.completions.create(
        model=CHAT_MODEL, messages=QUESTION, max_tokens=10, temperature=0, logprobs=True, top_logprobs=1
    )
    assert "Paris" in answer.choices[0].message.content
    for token in answer.choices[0].logprobs.content:
        assert token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
    total = sum(math.exp(rival.logprob) for rival in answer.choices[0].logprobs.content[0].top_logprobs)
    assert 0 < total <= 1 + 1e-6


def test_no_logprobs_unless_asked(client):
    answer = client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=4, logprobs=False)
    assert answer.choices[0].logprobs is None


@pytest.mark.parametrize(
    ("extra", "field"),
    [({"top_logprobs": 21, "logprobs": True}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs")],
)
def test_bad_logprob_fields_are_refused_by_name(client, extra, field):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=4, **extra)
    assert refused.value.body["param"] == field


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_with_echo(client, stream):
    prompt = "The capital of France is"
    kwargs = dict(model=CHAT_MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True)
    if stream:
        text, tokens, token_logprobs, offsets, tops = "", [], [], [], []
        for chunk in client.completions.create(**kwargs, stream=True):
            choice = chunk.choices[0]
            text += choice.text
            if choice.logprobs:
                tokens += choice.logprobs.tokens
                token_logprobs += choice.logprobs.token_logprobs
                offsets += choice.logprobs.text_offset
                tops += choice.logprobs.top_logprobs
    else:
        choice = client.completions.create(**kwargs).choices[0]
        text, tokens, token_logprobs = choice.text, choice.logprobs.tokens, choice.logprobs.token_logprobs
        offsets, tops = choice.logprobs.text_offset, choice.logprobs.top_logprobs
    assert text.startswith(prompt) and "Paris" in text
    assert "".join(tokens) == text
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert token_logprobs[0] is None and tops[0] is None  # nothing predicts the first prompt token
    assert all(lp <= 0 for lp in token_logprobs[1:])
    assert all(token in top and 2 <= len(top) <= 3 for token, top in zip(tokens[1:], tops[1:]))


def test_completion_logprobs_bounded_at_five(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=CHAT_MODEL, prompt="Hi", max_tokens=2, logprobs=6)
    assert refused.value.body["param"] == "logprobs"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from tests.smollm2 import smollm2_checkpoint

    return AutoTokenizer.from_pretrained(smollm2_checkpoint())


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from qubrid_lab.models.loading import bundled_path

    return AutoTokenizer.from_pretrained(bundled_path("all-minilm-l6-v2"))


def test_a_prompt_of_token_ids_answers_as_its_text(client, smollm2_tokenizer):
    prompts = ["The capital of France is", "One, two, three,"]
    ids = [smollm2_tokenizer.encode(prompt) for prompt in prompts]
    kwargs = dict(model=CHAT_MODEL, max_tokens=6, temperature=0, echo=True)
    as_text = client.completions.create(prompt=prompts, **kwargs)
    as_ids = client.completions.create(prompt=ids, **kwargs)
    assert [c.text for c in as_ids.choices] == [c.text for c in as_text.choices]
    assert as_ids.usage == as_text.usage
    single = client.completions.create(prompt=ids[0], **kwargs)
    assert single.choices[0].text == as_text.choices[0].text


def test_token_ids_outside_the_vocabulary_are_refused(client, http):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=CHAT_MODEL, prompt=[[1, 2], [3, 10**6]], max_tokens=2)
    assert refused.value.body["param"] == "prompt[1]" and "vocabulary" in refused.value.body["message"]
    response = http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": [101, 10**7, 102]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"


def test_embeddings_of_token_ids_equal_those_of_their_text(client, minilm_tokenizer):
    texts = ["A cat sits on the mat.", "The stock market fell sharply today."]
    ids = [minilm_tokenizer.encode(text) for text in texts]  # with [CLS] and [SEP], as the model reads text
    from_text = client.embeddings.create(model=EMBEDDING_MODEL, input=texts)
    from_ids = client.embeddings.create(model=EMBEDDING_MODEL, input=ids)
    assert np.allclose([d.embedding for d in from_ids.data], [d.embedding for d in from_text.data], atol=1e-5)
    assert from_ids.usage.prompt_tokens == from_text.usage.prompt_tokens == sum(map(len, ids))
    one = client.embeddings.create(model=EMBEDDING_MODEL, input=ids[0])
    assert np.allclose(one.data[0].embedding, from_text.data[0].embedding, atol=1e-5)


def test_stream_options_without_stream_is_refused(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=CHAT_MODEL, messages=QUESTION, max_tokens=2, stream_options={"include_usage": True}
        )
    assert refused.value.body["param"] == "stream_options"


def test_each_choice_streams_at_most_max_tokens_content_chunks_then_its_finish(client):
    counts, finishes = [0, 0, 0], [[], [], []]
    for chunk in client.chat.completions.create(
        model=CHAT_MODEL, messages=QUESTION, max_tokens=5, n=3, temperature=1.0, seed=2, stream=True
    ):
        for choice in chunk.choices:
            counts[choice.index] += bool(choice.delta.content)
            if choice.finish_reason:
                finishes[choice.index].append(choice.finish_reason)
            else:
                assert not finishes[choice.index], "a chunk after the choice's finish"
    assert all(1 <= count <= 5 for count in counts)
    assert all(len(f) == 1 and f[0] in ("stop", "length") for f in finishes)


CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population": {"type": "integer", "minimum": 0},
    },
    "required": ["name", "country", "population"],
    "additionalProperties": False,
}
CITY_QUESTION = [{"role": "user", "content": "Give the capital of France as JSON with name, country and population."}]


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_answers_are_valid_against_the_schema(client, stream):
    import jsonschema

    kwargs = dict(
        model=CHAT_MODEL,
        messages=CITY_QUESTION,
        max_tokens=120,
        temperature=0.8,
        seed=3,
        n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}},
    )
    if stream:
        texts, reasons = ["", ""], ["", ""]
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
                reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    else:
        answer = client.chat.completions.create(**kwargs)
        texts, reasons = [c.message.content for c in answer.choices], [c.finish_reason for c in answer.choices]
    assert reasons == ["stop", "stop"]
    for text in texts:
        jsonschema.validate(json.loads(text), CITY_SCHEMA)


def test_a_json_schema_answer_parses_into_a_pydantic_model(client):
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str
        population: int

    answer = client.chat.completions.parse(
        model=CHAT_MODEL, messages=CITY_QUESTION, response_format=City, max_tokens=80, temperature=0
    )
    city = answer.choices[0].message.parsed
    assert isinstance(city, City) and city.name == "Paris"


def test_json_object_answers_are_json_objects(client):
    answer = client.chat.completions.create(
        model=CHAT_MODEL, messages=CITY_QUESTION, max_tokens=80, temperature=0, response_format={"type": "json_object"}
    )
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


@pytest.mark.parametrize(
    ("response_format", "field"),
    [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "a", "schema": ["not", "an", "object"]}},
            "response_format.json_schema.schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "strng"}}},
            "response_format.json_schema.schema",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "a",
                    "strict": True,
                    "schema": {"type": "object", "dependentSchemas": {"a": {}}},
                },
            },
            "response_format.json_schema",
        ),
    ],
)
def test_an_unusable_response_format_is_refused_by_name_before_any_work(http, response_format, field):
    response = http.post(
        "/v1/chat/completions", json={"model": CHAT_MODEL, "messages": QUESTION, "response_format": response_format}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field


def test_text_response_format_is_free_text(client):
    plain = client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=10, temperature=0)
    text = client.chat.completions.create(
        model=CHAT_MODEL, messages=QUESTION, max_tokens=10, temperature=0, response_format={"type": "text"}
    )
    assert text.choices[0].message.content == plain.choices[0].message.content


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 30}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def streamed_calls(stream) -> tuple[list[dict], list[str]]:
    """Reassemble streamed tool calls per choice as an SDK does: id and name first, then argument fragments."""
    calls: dict[int, dict[int, dict]] = {}
    reasons: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(choice.index, {}).setdefault(call.index, {"arguments": ""})
                if call.id:
                    assert "id" not in entry, "a call's id came twice"
                    entry.update(id=call.id, name=call.function.name)
                else:
                    assert "id" in entry, "arguments before the call's id and name"
                entry["arguments"] += call.function.arguments or ""
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return [list(calls.get(i, {}).values()) for i in sorted(reasons)], [reasons[i] for i in sorted(reasons)]


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_always_gives_well_formed_calls(client, stream):
    import jsonschema

    kwargs = dict(
        model=CHAT_MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER, TIME],
        tool_choice="required",
        n=2,
        temperature=0.9,
        seed=6,
        max_tokens=80,
    )
    if stream:
        per_choice, reasons = streamed_calls(client.chat.completions.create(**kwargs, stream=True))
    else:
        answer = client.chat.completions.create(**kwargs)
        reasons = [c.finish_reason for c in answer.choices]
        per_choice = [
            [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments} for t in c.message.tool_calls]
            for c in answer.choices
        ]
        assert all(c.message.content is None for c in answer.choices)
    assert reasons == ["tool_calls", "tool_calls"]
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}
    for calls in per_choice:
        assert calls
        for call in calls:
            assert call["id"].startswith("call_")
            jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])


def test_a_named_function_is_the_one_called(client):
    answer = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=60,
        temperature=0,
    )
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "get_time" and set(json.loads(call.function.arguments)) == {"zone"}
    assert answer.choices[0].finish_reason == "tool_calls"


def test_a_tool_call_round_trip(client):
    first = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=60,
        temperature=0,
    )
    message = first.choices[0].message
    (call,) = message.tool_calls
    history = ASK_WEATHER + [
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    second = client.chat.completions.create(
        model=CHAT_MODEL, messages=history, tools=[WEATHER], max_tokens=40, temperature=0
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    reply = second.choices[0].message
    assert reply.content or reply.tool_calls
    plain = client.chat.completions.create(
        model=CHAT_MODEL, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=40, temperature=0
    )
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content


def test_auto_answers_prose_as_text_streamed_as_it_comes(client):
    kwargs = dict(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Write a short poem about the sea."}],
        tools=[WEATHER],
        max_tokens=30,
        temperature=0,
    )
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].message.tool_calls is None and whole.choices[0].finish_reason == "length"
    chunks = [
        c.choices[0].delta.content
        for c in client.chat.completions.create(**kwargs, stream=True)
        if c.choices and c.choices[0].delta.content
    ]
    assert "".join(chunks) == whole.choices[0].message.content and len(chunks) > 5


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strng"}}}]},
            "tools[0].function.parameters",
        ),
    ],
)
def test_bad_tool_fields_are_refused_by_name(http, extra, field):
    response = http.post("/v1/chat/completions", json={"model": CHAT_MODEL, "messages": QUESTION, **extra})
    assert response.status_code == 400 and response.json()["error"]["param"] == field


def test_a_tool_message_without_its_call_id_is_refused(http):
    response = http.post(
        "/v1/chat/completions",
        json={"model": CHAT_MODEL, "messages": QUESTION + [{"role": "tool", "content": "21 degrees"}]},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[1].tool_call_id"
