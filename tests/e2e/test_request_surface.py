"""The OpenAI request surface beyond the seed specs, end to end with the official ``openai`` client against
the session's real server (the bundled SmolLM2): log probabilities first."""

from __future__ import annotations

import math

import openai
import pytest

from tests.e2e.conftest import CHAT_MODEL

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "Name the capital city of France."}]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_join_to_the_content_with_exactly_top_logprobs_rivals(client, stream):
    kwargs = dict(model=CHAT_MODEL, messages=QUESTION, max_tokens=16, temperature=0.8, seed=4, n=2,
                  logprobs=True, top_logprobs=4)
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
    answer = client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=10, temperature=0,
                                            logprobs=True, top_logprobs=1)
    assert "Paris" in answer.choices[0].message.content
    for token in answer.choices[0].logprobs.content:
        assert token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
    total = sum(math.exp(rival.logprob) for rival in answer.choices[0].logprobs.content[0].top_logprobs)
    assert 0 < total <= 1 + 1e-6


def test_no_logprobs_unless_asked(client):
    answer = client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=4, logprobs=False)
    assert answer.choices[0].logprobs is None


@pytest.mark.parametrize(("extra", "field"), [({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
                                              ({"top_logprobs": 2}, "top_logprobs")])
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
