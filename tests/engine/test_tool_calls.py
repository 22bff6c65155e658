"""Function calling on text-generating engines: the prompt a template gets, and which answers are calls."""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import pytest

from qubrid_lab.engine.base import GenerationRequest
from qubrid_lab.engine.sampling import SamplingParams
from qubrid_lab.engine.tool_calls import parse_calls, plan

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
FUNCTIONS = {"get_weather": WEATHER}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "content": "21 C", "tool_call_id": "call_1"},
]


def request(choice="auto", parallel=True, messages=HISTORY) -> GenerationRequest:
    return GenerationRequest(
        SamplingParams(),
        messages=messages,
        tools=[{"type": "function", "function": WEATHER}],
        tool_choice=choice,
        parallel_tool_calls=parallel,
    )


CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(CALL),
        f"  [{json.dumps(CALL)}]\n",
        f"```json\n{json.dumps(CALL)}\n```",
        f"<tool_call>\n{json.dumps({**CALL, 'arguments': json.dumps(CALL['arguments'])})}\n</tool_call>",
    ],
)
def test_calls_are_read_from_json_fences_and_tags(text):
    (call,) = parse_calls(text, FUNCTIONS)
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert call["id"].startswith("call_") and call["type"] == "function"


@pytest.mark.parametrize(
    "text",
    [
        "It is sunny in Paris.",
        '{"name": "get_time", "arguments": {}}',  # not a declared function
        '{"name": "get_weather", "arguments": {"town": "Paris"}}',  # arguments invalid against the schema
        '{"name": "get_weather", "arguments": {"city": "Paris", "sky": "blue"}}',  # an argument not declared
        '{"name": "get_weather", "arguments": {"city": "Par',  # cut short
        '{"answer": 42}',
    ],
)
def test_anything_else_stays_text(text):
    assert parse_calls(text, FUNCTIONS) is None


def test_the_fallback_prompt_lists_the_functions_and_shows_the_history_as_turns():
    planned = plan(request(), native=False)
    assert planned.template_tools is None and planned.grammar is None
    system, user, assistant, result = planned.messages
    assert (
        system["role"] == "system" and '"get_weather"' in system["content"] and "answer normally" in system["content"]
    )
    assert json.loads(assistant["content"]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert result == {"role": "user", "content": "The function get_weather returned:\n21 C"}


def test_a_template_with_tool_support_gets_the_tools_and_transformers_message_format():
    planned = plan(request(), native=True)
    assert planned.template_tools == [{"type": "function", "function": WEATHER}]
    user, assistant, result = planned.messages
    assert assistant["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    assert result["role"] == "tool" and result["name"] == "get_weather"


def test_tool_choice_none_offers_no_function():
    planned = plan(request("none"), native=False)
    assert planned.functions == {} and not any('get_weather"' in m["content"] for m in planned.messages[:1])


@pytest.mark.parametrize(
    ("choice", "parallel", "accepted", "refused"),
    [
        ("required", True, '[{"name":"get_weather","arguments":{"city":"Paris"}}]', '[{"name":"other"'),
        ("required", True, '{"name":"get_weather","arguments":{"city":"Paris"}}', '{"name":"get_weather","x"'),
        ("required", False, '{"name":"get_weather","arguments":{"city":"Paris"}}', '[{"name":"get_weather"'),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            True,
            '{"name":"get_weather","arguments":{"city":"Paris"}}',
            '{"name":"other"',
        ),
    ],
)
def test_forced_choices_constrain_the_answer_to_calls(tiny_tokenizer, choice, parallel, accepted, refused):
    grammar = plan(request(choice, parallel, HISTORY[:1]), native=False).grammar
    tokenizer = llguidance.hf.from_tokenizer(tiny_tokenizer)

    def takes(text: str) -> bool:
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        return all(matcher.consume_token(t) for t in tokenizer.tokenize_str(text))

    assert takes(accepted) and not takes(refused)
