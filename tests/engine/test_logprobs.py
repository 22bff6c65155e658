"""Log probabilities from the local engine, checked against the model's own distribution computed directly
with transformers (the tiny test model, float32)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from qubrid_lab.engine.base import Finish, GenerationRun
from qubrid_lab.engine.sampling import SamplingParams
from tests.engine.test_scheduler import chat, pick_stop, reference_text

TOLERANCE = 1e-4  # float32 through two implementations of the same forward


def run_events(engine, ids: list[int], n: int = 1, **params):
    """Every event of one run, and the run (for its prompt's logprobs)."""

    async def go():
        run = GenerationRun(engine, [ids], SamplingParams(**params), n, prompt_field="prompt")
        try:
            return [event async for event in run.events()], run
        finally:
            run.cancel()

    return asyncio.run(go())


def per_choice(events, n: int = 1):
    texts, entries = [""] * n, [[] for _ in range(n)]
    for event in events:
        texts[event.index] += event.text
        entries[event.index] += event.logprobs or []
    return texts, entries


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position of ``ids``, straight from transformers."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_each_token_has_the_models_own_logprob_and_its_top_rivals(chat_engine, tiny_model, tiny_tokenizer):
    prompt = chat(chat_engine, "Tell me a story")
    events, _ = run_events(chat_engine, prompt, temperature=0.0, max_tokens=12, logprobs=3)
    (text,), (entries,) = per_choice(events)
    assert "".join(entry.text for entry in entries) == text  # the tokens join to the content
    reference = reference_logprobs(tiny_model, prompt + [entry.token_id for entry in entries])
    for position, entry in enumerate(entries):
        expected = reference[len(prompt) + position - 1]
        token = int(expected.argmax())  # greedy: the chosen token is the most likely one
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(float(expected[token]), abs=TOLERANCE)
        assert entry.logprob <= 0
        assert entry.token_bytes == chat_engine.scheduler.texts.bytes_of(token)
        assert len(entry.top) == 3
        top_values, top_ids = expected.topk(3)
        assert [lp for *_, lp in entry.top] == pytest.approx(top_values.tolist(), abs=TOLERANCE)
        assert [raw for _, raw, _ in entry.top] == [chat_engine.scheduler.texts.bytes_of(i) for i in top_ids.tolist()]


def test_logprobs_are_the_raw_distribution_before_penalties_and_temperature(chat_engine, tiny_model):
    prompt = chat(chat_engine, "Count with me")
    events, _ = run_events(
        chat_engine, prompt, temperature=1.7, seed=11, frequency_penalty=2.0, max_tokens=10, logprobs=0
    )
    finish = next(event for event in events if isinstance(event, Finish))
    (_,), (entries,) = per_choice(events)
    assert finish.completion_tokens == 10 and all(entry.top == [] for entry in entries)
    ids = [entry.token_id for entry in entries]
    reference = reference_logprobs(tiny_model, prompt + ids)
    for position, (token, entry) in enumerate(zip(ids, entries)):
        assert entry.logprob == pytest.approx(float(reference[len(prompt) + position - 1, token]), abs=TOLERANCE)


def test_asking_for_logprobs_changes_no_token(chat_engine):
    prompt = chat(chat_engine, "Say something")
    plain, _ = run_events(chat_engine, prompt, n=2, temperature=0.9, seed=5, max_tokens=16)
    with_logprobs, _ = run_events(chat_engine, prompt, n=2, temperature=0.9, seed=5, max_tokens=16, logprobs=5)
    assert per_choice(plain, 2)[0] == per_choice(with_logprobs, 2)[0]
    assert all(event.logprobs is None for event in plain)


def test_echo_gives_each_prompt_token_its_logprob_the_first_none(chat_engine, tiny_model, tiny_tokenizer):
    prompt = tiny_tokenizer.encode("the quick brown fox jumps")
    _, run = run_events(chat_engine, prompt, temperature=0.0, max_tokens=2, logprobs=2, echo_logprobs=True)
    echoed = run.prompt_logprobs(0)
    assert len(echoed) == len(prompt)
    assert echoed[0].logprob is None and echoed[0].top == []
    reference = reference_logprobs(tiny_model, prompt)
    for position in range(1, len(prompt)):
        assert echoed[position].logprob == pytest.approx(
            float(reference[position - 1, prompt[position]]), abs=TOLERANCE
        )
        assert len(echoed[position].top) == 2
    assert "".join(entry.text for entry in echoed) == tiny_tokenizer.decode(prompt, skip_special_tokens=True)


def test_a_stop_string_keeps_the_tokens_up_to_the_one_it_cuts(chat_engine):
    prompt = chat(chat_engine, "Say something")
    full = reference_text(chat_engine, prompt)
    stop, at = pick_stop(full)
    events, _ = run_events(chat_engine, prompt, temperature=0.0, max_tokens=30, stop=[stop], logprobs=1)
    (text,), (entries,) = per_choice(events)
    assert text == full[:at]
    joined = "".join(entry.text for entry in entries)
    assert joined.startswith(text) and len(joined) - len(entries[-1].text) < len(text) + (not text)
