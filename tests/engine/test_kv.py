"""BatchKV: rows that join and leave a shared cache decode exactly as they would alone."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from qubrid_lab.engine.cuda_graphs import GraphedDecode, bucket
from qubrid_lab.engine.forward import FusedLlama, transformers_forward
from qubrid_lab.engine.kv import BatchKV, PackedPrefillKV, PrefillKV

CPU = torch.device("cpu")


def prompt(length: int, seed: int) -> list[int]:
    """Ordinary (non-special) token ids of the tiny vocabulary."""
    return torch.randint(3, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def solo_logits(model, ids: list[int], steps: int) -> list[torch.Tensor]:
    """Greedy decoding of one prompt with transformers' own cache: the logits of each generated step."""
    cache = DynamicCache()
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
        logits = [out.logits[0, -1]]
        for _ in range(steps - 1):
            token = logits[-1].argmax().view(1, 1)
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1])
    return logits


class GraphedSteps:
    """The fused forward with its decode steps run as a CUDA graph records them (fixed shapes, the cache
    moved into the graphs' buffers), without a graph: what a GPU replays, checked here on the CPU."""

    def __init__(self, fused: FusedLlama):
        self.fused = fused
        self.graphs = GraphedDecode(fused, capture=False)

    def __call__(self, ids, positions, kv, mask, every_position=False):
        if isinstance(kv, BatchKV):
            return self.graphs(ids, positions, kv)
        return self.fused(ids, positions, kv, mask, every_position)


@pytest.fixture(params=["transformers", "fused", "graphed"])
def forward(request, tiny_model):
    """The forward implementations; the fused ones run on a fused copy of the tiny model."""
    if request.param == "transformers":
        return transformers_forward(tiny_model)
    fused = copy.deepcopy(tiny_model)
    FusedLlama.fuse(fused)
    return FusedLlama(fused) if request.param == "fused" else GraphedSteps(FusedLlama(fused))


class Batch:
    """Drives a BatchKV the way the scheduler does, remembering each row's logits at every step."""

    def __init__(self, forward):
        self.forward = forward
        self.kv = BatchKV(CPU)
        self.names: list[str] = []
        self.logits: dict[str, list[torch.Tensor]] = {}

    def join(self, prompts: dict[str, list[int]]) -> None:
        """Prefill each of ``prompts`` on its own and append it to the batch."""
        for name, row in prompts.items():
            prefill = PrefillKV()
            with torch.inference_mode():
                logits = self.forward(torch.tensor([row]), torch.arange(len(row))[None], prefill, None)
            self.kv.add_rows(prefill, torch.ones((1, len(row)), dtype=torch.long))
            self.names.append(name)
            self.logits[name] = [logits[0]]

    def step(self, count: int = 1) -> None:
        for _ in range(count):
            tokens = torch.stack([self.logits[name][-1].argmax() for name in self.names]).view(-1, 1)
            mask, positions = self.kv.step_inputs()
            with torch.inference_mode():
                logits = self.forward(tokens, positions, self.kv, mask)
            self.kv.commit_step()
            for name, row in zip(self.names, logits):
                self.logits[name].append(row)

    def keep(self, names: list[str]) -> None:
        order = self.kv.keep_rows([self.names.index(name) for name in names])
        assert sorted(order) == sorted(self.names.index(name) for name in names)
        self.names = [self.names[i] for i in order]


def assert_same_as_alone(model, batch: Batch, prompts: dict[str, list[int]]) -> None:
    for name, ids in prompts.items():
        together = batch.logits[name]
        alone = solo_logits(model, ids, len(together))
        assert [int(x.argmax()) for x in together] == [int(x.argmax()) for x in alone], name
        for step, (a, b) in enumerate(zip(together, alone)):
            assert torch.allclose(a, b, atol=1e-4), f"{name}, step {step}: max diff {(a - b).abs().max()}"


def test_rows_joining_and_leaving_decode_as_if_alone(tiny_model, forward):
    prompts = {
        "a": prompt(5, 1),
        "b": prompt(12, 2),
        "c": prompt(3, 3),
        "d": prompt(20, 4),
        "e": prompt(7, 5),
    }
    batch = Batch(forward)
    batch.join({"a": prompts["a"]})
    batch.step(3)
    batch.join({"b": prompts["b"]})  # shorter than the batch so far: left-padded into it
    batch.step(2)
    batch.join({"c": prompts["c"], "d": prompts["d"]})  # d is longer than the batch: the others shift right
    batch.step(4)
    batch.keep(["a", "c", "d"])
    batch.step(3)
    batch.join({"e": prompts["e"]})
    batch.step(3)
    assert batch.kv.rows == 4
    assert_same_as_alone(tiny_model, batch, prompts)


def test_the_mask_counts_each_rows_real_tokens(tiny_model, forward):
    batch = Batch(forward)
    batch.join({"short": prompt(4, 1), "long": prompt(15, 2)})
    batch.step(2)
    mask, positions = batch.kv.step_inputs()
    assert positions.flatten().tolist() == [4 + 2, 15 + 2]  # each row's next position ignores padding
    assert mask.sum(dim=1).tolist() == [4 + 3, 15 + 3]  # the column being filled counts for both
    assert mask.shape[1] == 15 + 3


def test_padding_columns_go_when_the_rows_they_padded_leave(tiny_model, forward):
    prompts = {"short": prompt(4, 1), "long": prompt(30, 2), "mid": prompt(9, 3)}
    batch = Batch(forward)
    batch.join(prompts)
    batch.step(2)
    assert batch.kv.length == 30 + 2
    batch.keep(["short", "mid"])
    assert batch.kv.length == 9 + 2  # only the columns the longest remaining row uses
    assert batch.kv.mask[:, : batch.kv.length].sum(dim=1).tolist() == [4 + 2, 9 + 2]
    assert batch.kv.keys[0].shape[0] == 2
    batch.step(3)
    del prompts["long"]
    assert_same_as_alone(tiny_model, batch, prompts)


def test_rows_can_leave_in_any_order(tiny_model, forward):
    prompts = {"a": prompt(6, 1), "b": prompt(11, 2), "c": prompt(8, 3)}
    batch = Batch(forward)
    batch.join(prompts)
    batch.step(2)
    batch.keep(["c", "a"])
    batch.step(3)
    del prompts["b"]
    assert_same_as_alone(tiny_model, batch, prompts)


def test_rows_join_and_leave_in_place_moving_only_the_rows_that_change(tiny_model, forward):
    """A prompt no longer than the batch joins in a spare row, and a leaving row's slot takes the last row:
    the buffers stay the same tensors, and every row still decodes as it would alone."""
    prompts = {name: prompt(length, seed) for seed, (name, length) in enumerate(zip("abcde", (9, 4, 6, 5, 3)))}
    batch = Batch(forward)
    batch.join({name: prompts[name] for name in "abcd"})
    batch.step(2)
    buffers = batch.kv._all_keys[0]
    if isinstance(forward, GraphedSteps):  # the graphs' buffers hold the cache: BatchKV rebuilds its own
        buffers = None
    batch.keep(["a", "c", "d"])  # b leaves; d, the last row, takes its slot
    assert batch.names == (["a", "d", "c"] if buffers is not None else ["a", "c", "d"])
    batch.step(2)
    batch.join({"e": prompts["e"]})  # shorter than the batch, and the buffers have a spare row
    if buffers is not None:
        assert batch.kv._all_keys[0] is buffers
    batch.step(3)
    del prompts["b"]
    assert_same_as_alone(tiny_model, batch, prompts)


def test_the_last_row_leaving_empties_the_cache_and_it_can_refill(tiny_model, forward):
    batch = Batch(forward)
    batch.join({"first": prompt(5, 1)})
    batch.step(2)
    batch.keep([])
    assert (batch.kv.rows, batch.kv.length, batch.kv.keys) == (0, 0, [])
    batch.join({"second": prompt(7, 2)})
    batch.step(4)
    assert_same_as_alone(tiny_model, batch, {"second": prompt(7, 2)})


def test_the_cache_grows_beyond_its_first_capacity(tiny_model, forward):
    prompts = {"a": prompt(6, 1), "b": prompt(10, 2)}
    batch = Batch(forward)
    batch.join(prompts)
    first_capacity = batch.kv.capacity
    steps = first_capacity - batch.kv.length + 20
    batch.step(steps)
    assert batch.kv.capacity > first_capacity
    assert batch.kv.length == 10 + steps
    assert_same_as_alone(tiny_model, batch, prompts)


@pytest.mark.parametrize("n", [1, 3])
def test_copies_of_one_prompt_decode_identically(tiny_model, forward, n):
    """The scheduler gives each of n choices its own copy of one prefilled prompt."""
    ids = prompt(9, 7)
    prefill = PrefillKV()
    with torch.inference_mode():
        logits = forward(torch.tensor([ids]), torch.arange(len(ids))[None], prefill, None)
    prefill.keys = [k.expand(n, -1, -1, -1) for k in prefill.keys]
    prefill.values = [v.expand(n, -1, -1, -1) for v in prefill.values]
    kv = BatchKV(CPU)
    kv.add_rows(prefill, torch.ones((n, len(ids)), dtype=torch.long))
    token = logits[0].argmax()
    generated = []
    for _ in range(5):
        mask, positions = kv.step_inputs()
        with torch.inference_mode():
            rows = forward(token.repeat(n, 1), positions, kv, mask)
        kv.commit_step()
        assert all(torch.allclose(rows[0], row, atol=1e-5) for row in rows)
        generated.append(rows[0])
        token = rows[0].argmax()
    alone = solo_logits(tiny_model, ids, 6)[1:]
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(generated, alone))


@pytest.mark.parametrize("split", [1, 6, 13])
def test_a_prompt_prefilled_after_a_cached_prefix_decodes_as_if_prefilled_whole(tiny_model, forward, split):
    """The scheduler prefills a shared prefix once, then each prompt's rest on top of a copy of it."""
    ids = prompt(14, 11)
    prefix = PrefillKV()
    with torch.inference_mode():
        forward(torch.tensor([ids[:split]]), torch.arange(split)[None], prefix, None)
        for _ in range(2):  # the cached prefix serves two prompts and is not changed by either
            prefill = PrefillKV(prefix.keys, prefix.values)
            logits = forward(torch.tensor([ids[split:]]), torch.arange(split, len(ids))[None], prefill, None)
            assert prefix.keys[0].shape[-2] == split
            kv = BatchKV(CPU)
            kv.add_rows(prefill, torch.ones((1, len(ids)), dtype=torch.long))
            generated = [logits[0]]
            for _ in range(4):
                mask, positions = kv.step_inputs()
                rows = forward(generated[-1].argmax().view(1, 1), positions, kv, mask)
                kv.commit_step()
                generated.append(rows[0])
            alone = solo_logits(tiny_model, ids, 5)
            for step, (a, b) in enumerate(zip(generated, alone)):
                assert torch.allclose(a, b, atol=1e-4), f"step {step}: max diff {(a - b).abs().max()}"


def test_prompts_prefilled_packed_decode_as_if_each_was_prefilled_alone(tiny_model):
    """The scheduler packs waiting prompts into one prefill pass, some on top of a cached prefix; each one's
    last logits and keys/values, and then its decoding, are those of the prompt on its own."""
    fused = copy.deepcopy(tiny_model)
    FusedLlama.fuse(fused)
    forward = FusedLlama(fused)
    prompts = [prompt(9, 21), prompt(3, 22), prompt(17, 23), prompt(1, 24)]
    splits = [0, 0, 6, 0]  # the third continues a cached prefix of 6 tokens
    with torch.inference_mode():
        prefix = PrefillKV()
        forward(torch.tensor([prompts[2][:6]]), torch.arange(6)[None], prefix, None)
        packed = PackedPrefillKV(
            [len(p) - s for p, s in zip(prompts, splits)], [prefix if s else None for s in splits], CPU
        )
        ids = torch.tensor([[t for p, s in zip(prompts, splits) for t in p[s:]]])
        positions = torch.cat([torch.arange(s, len(p)) for p, s in zip(prompts, splits)])[None]
        last = forward.packed(ids, positions, packed)
        assert last.shape[0] == len(prompts)
        assert prefix.keys[0].shape[-2] == 6  # the cached prefix is not changed by the prompt on top of it
        for i, ids in enumerate(prompts):
            alone = PrefillKV()
            expected = forward(torch.tensor([ids]), torch.arange(len(ids))[None], alone, None)[0]
            assert torch.allclose(last[i], expected, atol=1e-4), f"prompt {i}: {(last[i] - expected).abs().max()}"
            for k, k_alone in zip(packed.prompts[i].keys, alone.keys):
                assert k.shape == k_alone.shape and torch.allclose(k, k_alone, atol=1e-4)
        kv = BatchKV(CPU)
        for i, ids in enumerate(prompts):
            kv.add_rows(packed.prompts[i], torch.ones((1, len(ids)), dtype=torch.long))
        generated = [last]
        for _ in range(3):
            mask, positions = kv.step_inputs()
            generated.append(forward(generated[-1].argmax(-1)[:, None], positions, kv, mask))
            kv.commit_step()
        for i, ids in enumerate(prompts):
            alone = solo_logits(tiny_model, ids, 4)
            for step, (a, b) in enumerate(zip([g[i] for g in generated], alone)):
                assert torch.allclose(a, b, atol=1e-4), f"prompt {i} step {step}: {(a - b).abs().max()}"


def test_graphed_steps_keep_their_buffers_until_rows_join_or_leave(tiny_model):
    fused = copy.deepcopy(tiny_model)
    FusedLlama.fuse(fused)
    steps = GraphedSteps(FusedLlama(fused))
    batch = Batch(steps)
    batch.join({"a": prompt(5, 1), "b": prompt(9, 2), "c": prompt(4, 3)})
    batch.step()
    buffers = steps.graphs._buffers
    assert buffers.rows == bucket(3) == 4  # three rows run as four, the fourth computing on nothing
    batch.step(2)
    assert batch.kv.keys[0].data_ptr() == buffers.keys[0].data_ptr()  # the cache lives in the graphs' buffers
    batch.keep(["a", "c"])
    assert batch.kv.keys[0].data_ptr() != buffers.keys[0].data_ptr()  # leaving built a fresh cache...
    batch.step()
    assert steps.graphs._buffers is buffers  # ...moved back into the same buffers: same capacity, fewer rows
    assert batch.kv.keys[0].data_ptr() == buffers.keys[0].data_ptr()


def test_rows_round_up_to_a_power_of_two():
    assert [bucket(rows) for rows in (1, 2, 3, 4, 5, 16, 17, 64)] == [1, 2, 4, 4, 8, 16, 32, 64]
