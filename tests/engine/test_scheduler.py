"""The local engine end to end below HTTP: GenerationRun -> LocalChatEngine -> BatchScheduler -> events."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import pytest
import torch

from qubrid_lab.engine.base import Delta, Failure, Finish, GenerationRun
from qubrid_lab.engine.sampling import SamplingParams
from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.models.weight_int4 import Int4WeightLinear
from qubrid_lab.models.weight_int8 import Int8WeightLinear

WAIT_SECONDS = 30  # generous bound for polling the engine's state; never a timing assertion


@dataclass
class Outcome:
    """What a run produced, per choice index."""

    texts: dict[int, str] = field(default_factory=dict)
    finishes: dict[int, Finish] = field(default_factory=dict)

    def text(self, index: int = 0) -> str:
        return self.texts.get(index, "")


async def collect(run: GenerationRun) -> Outcome:
    outcome = Outcome()
    try:
        async for event in run.events():
            assert not isinstance(event, Failure), event.message
            assert event.index not in outcome.finishes, f"choice {event.index} got an event after it finished"
            outcome.texts[event.index] = outcome.text(event.index) + event.text
            if isinstance(event, Finish):
                outcome.finishes[event.index] = event
    finally:
        run.cancel()
    return outcome


def generate(engine, prompts: list[list[int]], n: int = 1, **params) -> Outcome:
    async def go() -> Outcome:
        return await collect(GenerationRun(engine, prompts, SamplingParams(**params), n))

    return asyncio.run(go())


async def until_idle(engine) -> None:
    """Wait until the engine has no rows, running or pending."""
    for _ in range(WAIT_SECONDS * 100):
        if engine.active_sequences == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the engine still holds {engine.active_sequences} rows")


def chat(engine, text: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": text}])


def test_chat_prompts_follow_the_template(chat_engine, tiny_tokenizer):
    ids = chat(chat_engine, "Hello there")
    assert tiny_tokenizer.decode(ids) == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"


def test_n_choices_each_finish_with_their_own_count(chat_engine):
    outcome = generate(chat_engine, [chat(chat_engine, "Tell me")], n=3, temperature=1.0, seed=5, max_tokens=12)
    assert sorted(outcome.finishes) == [0, 1, 2]
    for finish in outcome.finishes.values():
        assert finish.reason in ("stop", "length")
        assert 1 <= finish.completion_tokens <= 12
        assert (finish.reason == "length") == (finish.completion_tokens == 12)
    assert len({outcome.text(i) for i in range(3)}) == 3  # each choice samples on its own


def test_greedy_choices_of_one_request_agree(chat_engine):
    outcome = generate(chat_engine, [chat(chat_engine, "Tell me")], n=3, temperature=0.0, max_tokens=7)
    assert {outcome.text(i) for i in range(3)} == {outcome.text(0)}
    assert [outcome.finishes[i].completion_tokens for i in range(3)] == [7, 7, 7]


@pytest.mark.parametrize("max_tokens", [1, 5])
def test_max_tokens_ends_with_length(chat_engine, max_tokens):
    outcome = generate(chat_engine, [chat(chat_engine, "Count")], temperature=0.0, max_tokens=max_tokens)
    finish = outcome.finishes[0]
    assert (finish.reason, finish.completion_tokens) == ("length", max_tokens)


def test_prompts_of_one_run_get_consecutive_choice_indices(chat_engine):
    run_prompts = [chat(chat_engine, "first"), chat(chat_engine, "second, a longer one")]
    outcome = generate(chat_engine, run_prompts, n=2, temperature=0.0, max_tokens=4)
    assert sorted(outcome.finishes) == [0, 1, 2, 3]
    # choices 0-1 answer the first prompt, 2-3 the second
    assert (
        outcome.text(0)
        == outcome.text(1)
        == generate(chat_engine, run_prompts[:1], temperature=0.0, max_tokens=4).text()
    )
    assert (
        outcome.text(2)
        == outcome.text(3)
        == generate(chat_engine, run_prompts[1:], temperature=0.0, max_tokens=4).text()
    )


def reference_text(engine, ids: list[int], tokens: int = 30) -> str:
    """A greedy reply long enough to pick a stop string from."""
    return generate(engine, [ids], temperature=0.0, max_tokens=tokens).text()


def pick_stop(text: str) -> tuple[str, int]:
    """A 3-character piece of ``text``, first seen after its start, with no undecodable bytes in it."""
    for start in range(2, len(text) - 3):
        piece = text[start : start + 3]
        if "\ufffd" not in piece and text.find(piece) == start:
            return piece, start
    raise AssertionError(f"no usable stop string in {text!r}")


def test_a_stop_string_ends_the_reply_and_is_not_sent(chat_engine):
    ids = chat(chat_engine, "Say something")
    full = reference_text(chat_engine, ids)
    stop, at = pick_stop(full)
    outcome = generate(chat_engine, [ids], temperature=0.0, max_tokens=30, stop=["never-there", stop])
    assert outcome.finishes[0].reason == "stop"
    assert outcome.text() == full[:at]
    assert stop not in outcome.text()
    assert outcome.finishes[0].completion_tokens < 30


def test_the_same_seed_gives_the_same_reply(chat_engine):
    ids = chat(chat_engine, "Surprise me")
    first = generate(chat_engine, [ids], temperature=1.0, seed=42, max_tokens=16)
    again = generate(chat_engine, [ids], temperature=1.0, seed=42, max_tokens=16)
    other = generate(chat_engine, [ids], temperature=1.0, seed=43, max_tokens=16)
    assert first.text() == again.text()
    assert first.finishes[0].completion_tokens == again.finishes[0].completion_tokens
    assert other.text() != first.text()


async def join_while_running(engine, first: tuple[list[int], SamplingParams], *later: tuple[list[int], SamplingParams]):
    """Start ``first``; once it has produced a token, submit ``later`` into the running batch."""
    lead = GenerationRun(engine, [first[0]], first[1], 1)
    lead_task = asyncio.create_task(collect(lead))
    for _ in range(WAIT_SECONDS * 1000):
        if lead.handles[0].first_token_at is not None:
            break
        await asyncio.sleep(0.001)
    runs = [GenerationRun(engine, [ids], params, 1) for ids, params in later]
    outcomes = await asyncio.gather(lead_task, *(collect(run) for run in runs))
    return [lead, *runs], outcomes


def test_concurrent_greedy_runs_match_their_solo_replies(chat_engine):
    prompts = [
        chat(chat_engine, "Hi"),
        chat(chat_engine, "A much longer question about batching and padding?"),
        chat(chat_engine, "Medium length words"),
    ]
    budgets = [120, 10, 25]  # rows leave the batch at different steps; the first outlasts the others
    alone = [generate(chat_engine, [ids], temperature=0.0, max_tokens=b).text() for ids, b in zip(prompts, budgets)]
    requests = [(ids, SamplingParams(temperature=0.0, max_tokens=b)) for ids, b in zip(prompts, budgets)]

    runs, outcomes = asyncio.run(join_while_running(chat_engine, *requests))

    assert [o.text() for o in outcomes] == alone
    assert [o.finishes[0].completion_tokens for o in outcomes] == budgets
    lead = runs[0].handles[0]
    assert all(run.handles[0].first_token_at < lead.finished_at for run in runs[1:]), "the runs never overlapped"


def test_a_seeded_reply_does_not_depend_on_other_traffic(chat_engine):
    ids = chat(chat_engine, "Surprise me")
    alone = generate(chat_engine, [ids], temperature=1.0, seed=7, max_tokens=16).text()
    busy = (chat(chat_engine, "Keep the batch busy"), SamplingParams(temperature=0.9, max_tokens=80))
    _, outcomes = asyncio.run(
        join_while_running(chat_engine, busy, (ids, SamplingParams(temperature=1.0, seed=7, max_tokens=16)))
    )
    assert outcomes[1].text() == alone


def test_cancelling_a_run_frees_its_rows(chat_engine):
    async def go():
        await until_idle(chat_engine)
        run = GenerationRun(chat_engine, [chat(chat_engine, "Go on forever")], SamplingParams(temperature=0.0), 2)
        events = []
        async for event in run.events():
            events.append(event)
            break
        assert chat_engine.active_sequences == 2
        run.cancel()
        await until_idle(chat_engine)
        await asyncio.sleep(0.05)  # let events already handed to this loop arrive
        while not run.queue.empty():
            events.append(run.queue.get_nowait())
        return events

    events = asyncio.run(go())
    assert events and not any(isinstance(e, Finish) for e in events)  # dropped, not run to its ~230 tokens


def test_a_cancelled_run_does_not_disturb_the_others(chat_engine):
    ids = chat(chat_engine, "Steady")
    alone = generate(chat_engine, [ids], temperature=0.0, max_tokens=30).text()

    async def go():
        doomed = GenerationRun(chat_engine, [chat(chat_engine, "Doomed")], SamplingParams(temperature=0.0), 1)
        steady = asyncio.create_task(
            collect(GenerationRun(chat_engine, [ids], SamplingParams(temperature=0.0, max_tokens=30), 1))
        )
        await doomed.queue.get()
        doomed.cancel()
        outcome = await steady
        await until_idle(chat_engine)
        return outcome

    assert asyncio.run(go()).text() == alone


def test_a_prompt_longer_than_the_context_is_refused(chat_engine):
    too_long = [10] * chat_engine.context_length

    async def go():
        GenerationRun(chat_engine, [too_long], SamplingParams(), 1)

    with pytest.raises(InvalidRequestError) as caught:
        asyncio.run(go())
    assert caught.value.param == "messages"
    assert str(chat_engine.context_length) in caught.value.message


def test_a_prompt_that_fills_all_but_one_position_gets_one_token(chat_engine):
    outcome = generate(chat_engine, [[10] * (chat_engine.context_length - 1)], temperature=0.0)
    assert (outcome.finishes[0].reason, outcome.finishes[0].completion_tokens) == ("length", 1)


def test_max_tokens_beyond_the_room_left_is_refused(chat_engine):
    ids = chat(chat_engine, "Hello")
    room = chat_engine.context_length - len(ids)

    async def go(max_tokens: int):
        return await collect(
            GenerationRun(chat_engine, [ids], SamplingParams(temperature=0.0, max_tokens=max_tokens), 1)
        )

    with pytest.raises(InvalidRequestError) as caught:
        asyncio.run(go(room + 1))
    assert caught.value.param == "max_tokens"
    assert str(room) in caught.value.message
    assert asyncio.run(go(room)).finishes[0].completion_tokens == room


def test_with_no_max_tokens_a_reply_may_fill_the_context(chat_engine):
    ids = [10] * (chat_engine.context_length - 6)
    assert generate(chat_engine, [ids], temperature=0.0).finishes[0].completion_tokens == 6


def test_the_server_cap_applies_only_when_max_tokens_is_unset(engine_factory):
    engine = engine_factory("tiny-capped", max_tokens_cap=4)
    ids = chat(engine, "Hello")
    assert generate(engine, [ids], temperature=0.0).finishes[0].completion_tokens == 4
    assert generate(engine, [ids], temperature=0.0, max_tokens=9).finishes[0].completion_tokens == 9


def test_requests_beyond_the_batch_size_wait_their_turn(engine_factory):
    engine = engine_factory("tiny-small-batch", max_batch_size=2)
    prompts = [chat(engine, text) for text in ("one", "number two", "the third prompt")]
    alone = [generate(engine, [ids], temperature=0.0, max_tokens=12).text() for ids in prompts]

    async def together():
        runs = [GenerationRun(engine, [ids], SamplingParams(temperature=0.0, max_tokens=12), 1) for ids in prompts]
        return await asyncio.gather(*(collect(run) for run in runs))

    assert [o.text() for o in asyncio.run(together())] == alone
    # one request asking for more choices than the batch holds still runs, alone
    assert sorted(generate(engine, prompts[:1], n=3, temperature=0.0, max_tokens=3).finishes) == [0, 1, 2]


@pytest.mark.parametrize(
    "dtype, layer",
    [
        ("int8", torch.ao.nn.quantized.dynamic.Linear),
        ("w8a16", Int8WeightLinear),
        ("w4a16", Int4WeightLinear),
        ("w4a32", Int4WeightLinear),
    ],
)
def test_integer_weights_generate(engine_factory, dtype, layer):
    engine = engine_factory(f"tiny-{dtype}", dtype=dtype)
    assert engine.precision.label == dtype
    assert isinstance(engine.model.model.layers[0].mlp.down_proj, layer)
    ids = chat(engine, "Hello")
    first = generate(engine, [ids], temperature=0.0, max_tokens=8)
    assert (first.finishes[0].reason, first.finishes[0].completion_tokens) == ("length", 8)
    assert generate(engine, [ids], temperature=0.0, max_tokens=8).text() == first.text()


def test_deltas_arrive_before_the_finish(chat_engine):
    async def go():
        run = GenerationRun(
            chat_engine, [chat(chat_engine, "Stream")], SamplingParams(temperature=0.0, max_tokens=40), 1
        )
        return [event async for event in run.events()]

    events = asyncio.run(go())
    assert isinstance(events[-1], Finish)
    assert all(isinstance(e, Delta) for e in events[:-1]) and len(events) > 2


def test_a_choice_finishing_on_its_first_token_sends_nothing_more(engine_factory):
    engine = engine_factory("tiny-first-token")

    async def go():
        run = GenerationRun(engine, [chat(engine, "Short")], SamplingParams(temperature=0.0, max_tokens=1), 2)
        outcome = await collect(run)
        await until_idle(engine)
        await asyncio.sleep(0.05)
        extra = []
        while not run.queue.empty():
            extra.append(run.queue.get_nowait())
        return outcome, extra

    outcome, extra = asyncio.run(go())
    assert [f.completion_tokens for f in outcome.finishes.values()] == [1, 1]
    assert extra == []


def test_an_empty_prompt_is_refused(engine_factory):
    engine = engine_factory("tiny-empty-prompt")

    async def go():
        run = GenerationRun(engine, [[]], SamplingParams(max_tokens=3), 1)
        run.cancel()

    with pytest.raises(InvalidRequestError):
        asyncio.run(go())


def test_a_shared_system_prompt_is_prefilled_once_and_changes_no_output(engine_factory):
    system = {"role": "system", "content": "You are a careful assistant who answers every question with few words."}
    conversations = [[system, {"role": "user", "content": text}] for text in ("Hello there", "Tell me a story")]
    fresh = engine_factory(prompt_cache_bytes=0)  # knows no template prefix and caches no prompt: prefills whole
    prompts = [
        fresh.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
        for c in conversations
    ]
    whole = [generate(fresh, [ids], temperature=0.0, max_tokens=8).text() for ids in prompts]
    assert fresh.scheduler.prompts.hits == 0

    engine = engine_factory()
    replies = [generate(engine, [engine.encode_chat(c)], temperature=0.0, max_tokens=8).text() for c in conversations]
    again = generate(engine, [engine.encode_chat(conversations[0])], temperature=0.0, max_tokens=8).text()
    assert (engine.scheduler.prompts.misses, engine.scheduler.prompts.hits) == (1, 2)
    assert replies == whole
    assert again == whole[0]


def test_prompts_waiting_together_are_prefilled_in_one_pass_and_answer_as_alone(engine_factory, monkeypatch):
    engine = engine_factory()
    system = {"role": "system", "content": "You are a careful assistant who answers every question with few words."}
    engine.encode_chat([system, {"role": "user", "content": "learn the prefix"}])
    prompts = [
        chat(engine, "Hi"),
        chat(engine, "A much longer question about batching and padding?"),
        engine.encode_chat([system, {"role": "user", "content": "Tell me a story"}]),
        chat(engine, "Go"),
    ]
    alone = [generate(engine, [ids], temperature=0.0, max_tokens=12).text() for ids in prompts]
    assert engine.scheduler.packed_prompts == 0  # one prompt at a time: each prefilled alone

    gate = threading.Event()  # the model thread waits until all four prompts are queued
    engine._thread.submit(gate.wait)
    submit = engine.scheduler.submit

    def queue(handle):
        submit(handle)
        if engine.scheduler.active_rows == len(prompts):
            gate.set()

    monkeypatch.setattr(engine.scheduler, "submit", queue)
    together = generate(engine, prompts, temperature=0.0, max_tokens=12)
    assert engine.scheduler.packed_prompts == len(prompts)
    assert [together.text(i) for i in range(len(prompts))] == alone
