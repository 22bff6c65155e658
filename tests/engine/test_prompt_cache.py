"""The prompt cache: which start of a prompt it finds, what it keeps within its budget, and what the engine
answers with it (the same as without it)."""

from __future__ import annotations

import asyncio

import torch

from qubrid_lab.engine.base import GenerationRun
from qubrid_lab.engine.kv import PrefillKV
from qubrid_lab.engine.prompt_cache import MIN_REUSED_TOKENS, PromptCache
from qubrid_lab.engine.registry import ModelRegistry
from qubrid_lab.engine.sampling import SamplingParams
from tests.engine.test_lora import make_adapter
from tests.engine.test_scheduler import collect, generate

LAYERS, HEADS, DIM = 2, 2, 4


def kv_of(ids: list[int]) -> PrefillKV:
    """Keys/values whose every position holds its token id (so a slice shows which tokens it covers)."""
    column = torch.tensor(ids, dtype=torch.float32).view(1, 1, -1, 1).expand(1, HEADS, -1, DIM)
    return PrefillKV([column + layer for layer in range(LAYERS)], [column - layer for layer in range(LAYERS)])


def covered(kv: PrefillKV) -> list[int]:
    return kv.keys[0][0, 0, :, 0].long().tolist()


def test_the_longest_common_start_is_found_to_the_token_and_never_the_last_token():
    cache = PromptCache()
    first = list(range(100, 140))
    cache.put(None, first, kv_of(first))
    other = list(range(500, 530))
    cache.put(None, other, kv_of(other))

    turn = first[:25] + [7, 8, 9]  # shares 25 tokens with the first prompt
    length, kv = cache.longest(None, turn)
    assert length == 25 and covered(kv) == first[:25]
    assert [len(k[0, 0]) for k in kv.values] == [25] * LAYERS and kv.length == 25

    length, kv = cache.longest(None, first)  # the same prompt again: all but its last token
    assert length == len(first) - 1 and covered(kv) == first[:-1]
    assert (cache.hits, cache.misses, cache.reused_tokens) == (2, 0, 25 + 39)


def test_a_short_or_absent_common_start_is_a_miss():
    cache = PromptCache()
    first = list(range(100, 140))
    cache.put(None, first, kv_of(first))
    assert cache.longest(None, first[: MIN_REUSED_TOKENS - 1] + [1, 2, 3]) == (0, None)
    assert cache.longest(None, [1] + first) == (0, None)
    assert cache.misses == 2


def test_adapters_have_their_own_entries_and_forget_drops_them():
    cache = PromptCache()
    ids = list(range(100, 130))
    cache.put("ft:a", ids, kv_of(ids))
    assert cache.longest(None, ids)[1] is None
    assert cache.longest("ft:a", ids)[0] == len(ids) - 1
    cache.forget("ft:a")
    assert len(cache) == 0 and cache.bytes == 0


def test_a_prompt_that_extends_an_entry_replaces_it_and_one_already_covered_is_not_kept_twice():
    cache = PromptCache()
    history = list(range(100, 130))
    cache.put(None, history[:20], kv_of(history[:20]))
    cache.put(None, history, kv_of(history))
    assert len(cache) == 1
    cache.put(None, history[:25], kv_of(history[:25]))
    assert len(cache) == 1 and cache.longest(None, history[:25] + [1])[0] == 25


def test_the_byte_budget_drops_the_least_recently_used_first():
    one_prompt = 2 * LAYERS * HEADS * 20 * DIM * 4  # keys and values of a 20-token prompt, float32
    cache = PromptCache(max_bytes=2 * one_prompt)
    prompts = [list(range(start, start + 20)) for start in (100, 200, 300)]
    cache.put(None, prompts[0], kv_of(prompts[0]))
    cache.put(None, prompts[1], kv_of(prompts[1]))
    cache.longest(None, prompts[0])  # the first is used again: the second is now the oldest
    cache.put(None, prompts[2], kv_of(prompts[2]))
    assert cache.bytes == 2 * one_prompt
    assert cache.longest(None, prompts[1])[1] is None
    assert cache.longest(None, prompts[0])[1] is not None and cache.longest(None, prompts[2])[1] is not None

    off = PromptCache(max_bytes=0)
    off.put(None, prompts[0], kv_of(prompts[0]))
    assert len(off) == 0


def test_a_view_is_kept_as_its_own_copy():
    base = torch.zeros(1, HEADS, 64, DIM)
    view = base[:, :, :20]
    cache = PromptCache()
    ids = list(range(100, 120))
    cache.put(None, ids, PrefillKV([view] * LAYERS, [view] * LAYERS))
    kept = cache.longest(None, ids)[1].keys[0]
    assert kept.untyped_storage().nbytes() == 1 * HEADS * 20 * DIM * 4
    assert cache.bytes == 2 * LAYERS * HEADS * 20 * DIM * 4


def conversation_turns(engine) -> list[list[int]]:
    """Three turns of one conversation, each prompt the last one's history plus an answer and a question."""
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a colour."}]
    prompts = [engine.encode_chat(messages)]
    for question in ("And another?", "Which do you like best, and why?"):
        messages += [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": question}]
        prompts.append(engine.encode_chat(messages))
    return prompts


def test_each_turn_of_a_conversation_prefills_only_what_is_new_and_answers_as_without_the_cache(engine_factory):
    uncached = engine_factory(prompt_cache_bytes=0)
    engine = engine_factory()
    turns = conversation_turns(engine)
    expected = [generate(uncached, [ids], temperature=0.0, max_tokens=8).text() for ids in turns]

    replies = []
    for ids in turns:
        reused = engine.scheduler.prompts.reused_tokens
        replies.append(generate(engine, [ids], temperature=0.0, max_tokens=8).text())
        if len(replies) > 1:  # the whole previous prompt came from the cache
            assert engine.scheduler.prompts.reused_tokens - reused == len(turns[len(replies) - 2])
    assert replies == expected
    assert uncached.scheduler.prompts.hits == 0 and len(uncached.scheduler.prompts) == 0

    reused = engine.scheduler.prompts.reused_tokens
    assert generate(engine, [turns[-1]], temperature=0.0, max_tokens=8).text() == expected[-1]
    assert engine.scheduler.prompts.reused_tokens - reused == len(turns[-1]) - 1  # sent again: all but one token


def test_prompts_arriving_together_reuse_a_cached_start_in_one_packed_pass(engine_factory):
    uncached = engine_factory(prompt_cache_bytes=0)
    engine = engine_factory()
    turns = conversation_turns(engine)
    generate(engine, [turns[0]], temperature=0.0, max_tokens=4)

    async def together():
        run = GenerationRun(engine, turns, SamplingParams(temperature=0.0, max_tokens=8), 1)
        return await collect(run)

    outcome = asyncio.run(together())
    expected = [generate(uncached, [ids], temperature=0.0, max_tokens=8).text() for ids in turns]
    assert [outcome.text(i) for i in range(len(turns))] == expected
    assert engine.scheduler.packed_prompts >= len(turns) - 1


def test_a_fine_tuned_model_never_reads_the_base_models_cached_prompts(engine_factory, tiny_model, tmp_path):
    base = engine_factory()
    registry = ModelRegistry(chat={"tiny": base})
    ids = base.encode_chat([{"role": "user", "content": "Hello there, how are you today?"}])
    generate(base, [ids], temperature=0.0, max_tokens=4)  # the prompt is cached for the base model

    for seed, name in ((1, "first"), (2, "second")):  # the same model name, trained again: other weights
        merged = make_adapter(tiny_model, tmp_path / name, ["q_proj", "k_proj", "v_proj"], seed=seed)
        registry.add_adapter("ft:tiny:x:ftjob-9", "tiny", tmp_path / name, created=1)
        tuned = generate(registry.chat_model("ft:tiny:x:ftjob-9"), [ids], temperature=0.0, max_tokens=8)
        with torch.no_grad():
            expected = merged.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :]
        assert tuned.text() == base.decode(expected.tolist())
        registry.remove_adapter("ft:tiny:x:ftjob-9")
