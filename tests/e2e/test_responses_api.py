"""``POST /v1/responses`` end to end with the official ``openai`` SDK's ``client.responses`` against the
session's real server (the bundled SmolLM2)."""

from __future__ import annotations

import json

import openai
import pytest

from tests.e2e.conftest import CHAT_MODEL

pytestmark = pytest.mark.e2e

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]},
}


def test_a_text_response_with_instructions(client):
    response = client.responses.create(
        model=CHAT_MODEL,
        input="Name the capital city of France.",
        instructions="You answer in one short sentence.",
        temperature=0,
        max_output_tokens=30,
    )
    assert response.status == "completed" and response.object == "response"
    assert "Paris" in response.output_text
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 30
    chat = client.chat.completions.create(
        model=CHAT_MODEL,
        temperature=0,
        max_tokens=30,
        messages=[
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "Name the capital city of France."},
        ],
    )
    assert response.output_text == chat.choices[0].message.content  # the same request, by the other API


def test_streamed_events_build_the_same_text(client):
    kwargs = dict(
        model=CHAT_MODEL,
        input=[{"role": "user", "content": "Write a haiku about rain."}],
        temperature=0,
        max_output_tokens=24,
    )
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == ("response.incomplete" if whole.status == "incomplete" else "response.completed")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) > 3 and "".join(deltas) == whole.output_text
    assert events[-1].response.output_text == whole.output_text


def test_max_output_tokens_leaves_the_response_incomplete(client):
    response = client.responses.create(
        model=CHAT_MODEL, input="Write a long story about a dragon.", max_output_tokens=5, temperature=0
    )
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 5


@pytest.mark.parametrize("stream", [False, True])
def test_a_function_call_round_trip(client, stream):
    question = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    kwargs = dict(
        model=CHAT_MODEL,
        input=question,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_output_tokens=60,
    )
    if stream:
        events = list(client.responses.create(**kwargs, stream=True))
        argument_deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        response = events[-1].response
        (call,) = response.output
        assert argument_deltas == call.arguments
    else:
        response = client.responses.create(**kwargs)
        (call,) = response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert set(json.loads(call.arguments)) == {"city"}
    answer = client.responses.create(
        model=CHAT_MODEL,
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_output_tokens=30,
        input=question
        + [
            call.model_dump(include={"type", "call_id", "name", "arguments"}),
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 21, "sky": "sunny"}'},
        ],
    )
    assert answer.output[0].type == "message" and answer.output_text


def test_text_format_json_schema_gives_valid_json(client):
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model=CHAT_MODEL,
        input="Name the capital of France and its country, as JSON.",
        temperature=0,
        max_output_tokens=60,
        text={"format": {"type": "json_schema", "name": "capital", "schema": schema, "strict": True}},
    )
    jsonschema.validate(json.loads(response.output_text), schema)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "strng"}}}}, "text.format"),
    ],
)
def test_what_cannot_be_served_is_refused_by_name(client, extra, field):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=CHAT_MODEL, input="Hi", max_output_tokens=4, **extra)
    assert refused.value.body["param"].startswith(field)
