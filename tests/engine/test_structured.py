"""Constrained decoding in the local engine, checked against greedy decoding done directly with transformers
and llguidance's own mask (the tiny test model, float32)."""

from __future__ import annotations

import json

import llguidance
import pytest
import torch
from llguidance.torch import allocate_token_bitmask, apply_token_bitmask_inplace, fill_next_token_bitmask

from qubrid_lab.engine.base import Finish
from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.server.protocol.response_format import json_grammar
from tests.engine.test_logprobs import per_choice, run_events
from tests.engine.test_scheduler import chat

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "colour": {"enum": ["red", "blue"]}},
    "required": ["n", "colour"],
    "additionalProperties": False,
}


def reference_tokens(model, ll_tokenizer, grammar: str, prompt: list[int], limit: int) -> list[int]:
    """Greedy decoding with transformers' forward, each step masked by a fresh llguidance matcher's bitmask."""
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
    tokens: list[int] = []
    while len(tokens) < limit and not matcher.is_stopped():
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + tokens])).logits[0, -1:].float()
        mask = allocate_token_bitmask(1, logits.shape[-1])
        fill_next_token_bitmask(matcher, mask, 0)
        apply_token_bitmask_inplace(logits, mask)
        token = int(logits.argmax())
        assert matcher.consume_token(token)
        tokens.append(token)
    return tokens


def test_constrained_greedy_decoding_matches_the_masked_reference(chat_engine, tiny_model):
    grammar = json_grammar(SCHEMA, strict=True)
    prompt = chat(chat_engine, "Describe a thing")
    events, _ = run_events(chat_engine, prompt, temperature=0.0, max_tokens=60, grammar=grammar, logprobs=0)
    (text,), (entries,) = per_choice(events)
    finish = next(event for event in events if isinstance(event, Finish))
    expected = reference_tokens(tiny_model, chat_engine.scheduler.texts.ll_tokenizer, grammar, prompt, 60)
    assert [entry.token_id for entry in entries] == expected
    assert finish.reason == "stop"  # the grammar completed, ending the reply
    answer = json.loads(text)
    assert set(answer) == {"n", "colour"} and 0 <= answer["n"] <= 99 and answer["colour"] in ("red", "blue")


def test_constrained_and_free_rows_decode_together_unchanged(chat_engine):
    import asyncio

    from qubrid_lab.engine.base import GenerationRun
    from qubrid_lab.engine.sampling import SamplingParams
    from tests.engine.test_scheduler import collect

    grammar = json_grammar(SCHEMA, strict=True)
    free_prompt, constrained_prompt = chat(chat_engine, "Say something"), chat(chat_engine, "Describe a thing")
    solo_free = run_events(chat_engine, free_prompt, temperature=0.0, max_tokens=20)[0]
    solo_constrained = run_events(
        chat_engine, constrained_prompt, n=3, temperature=0.9, seed=8, max_tokens=60, grammar=grammar
    )[0]

    async def together():
        free = GenerationRun(chat_engine, [free_prompt], SamplingParams(temperature=0.0, max_tokens=20), 1)
        constrained = GenerationRun(
            chat_engine,
            [constrained_prompt],
            SamplingParams(temperature=0.9, seed=8, max_tokens=60, grammar=grammar),
            3,
        )
        return await asyncio.gather(collect(free), collect(constrained))

    free, constrained = asyncio.run(together())
    assert free.text() == per_choice(solo_free)[0][0]
    texts = [constrained.text(i) for i in range(3)]
    assert texts == per_choice(solo_constrained, 3)[0]
    for text in texts:
        answer = json.loads(text)
        assert answer["colour"] in ("red", "blue") and 0 <= answer["n"] <= 99


def test_a_grammar_the_tokenizer_cannot_serve_is_refused(chat_engine):
    with pytest.raises(InvalidRequestError) as refused:
        run_events(chat_engine, chat(chat_engine, "Hi"), max_tokens=4, grammar='{"grammars": [{"lark_grammar": "x"}]}')
    assert refused.value.param == "response_format"
