"""Each precision path of the engine against transformers' own forward, on the real SmolLM2 (CPU).

Teacher-forced: a fixed set of prompts, each continued by fp32's greedy tokens, is fed to both sides, and
their next-token distributions are compared position by position (:mod:`qubrid_lab.engine.accuracy`).
The engine's paths: a prompt prefilled whole, prefilled in two parts after the chat template's shared
system block, its last token alone after the rest came from the prompt cache (the same prompt sent again),
decoded inside a padded batch with the other prompts, and that batch's prompts prefilled together in one packed
pass on top of the cached system block.
"""

from __future__ import annotations

import pytest
import torch

from qubrid_lab.engine.accuracy import ACCURACY_BAR, divergence, greedy_continuation, reference_logits, served_logits
from qubrid_lab.engine.auto_precision import PROBE_MESSAGES
from qubrid_lab.engine.kv import BatchKV, PackedPrefillKV, PrefillKV

CPU = torch.device("cpu")
PROMPTS = [*PROBE_MESSAGES, "Name the capital city of France.", "Give me a short tip for writing clear emails."]
CONTINUATION_TOKENS = 16
PATHS = ["whole", "prefix", "cached", "batch", "packed"]


@pytest.fixture(scope="module")
def probes(smollm2_tokenizer, smollm2_transformers):
    """Prompt ids, fp32 greedy continuations, and transformers' fp32 logits over them (the reference)."""
    reference = smollm2_transformers(torch.float32)
    prompts = [
        list(
            smollm2_tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        for text in PROMPTS
    ]
    continuations = [greedy_continuation(reference, ids, CONTINUATION_TOKENS) for ids in prompts]
    logits = [reference_logits(reference, ids, cont) for ids, cont in zip(prompts, continuations)]
    return prompts, continuations, logits


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares (the template's system block and the user header)."""
    length = 0
    while all(len(p) > length + 1 and p[length] == prompts[0][length] for p in prompts):
        length += 1
    return length


def packed_prefill(forward, prompts) -> tuple[list[torch.Tensor], list[PrefillKV]]:
    """Every prompt prefilled in one packed pass on top of the cached shared prefix, as the scheduler does with
    prompts that wait together: each one's last logits and keys/values."""
    split = shared_prefix(prompts)
    prefix = PrefillKV()
    forward(torch.tensor([prompts[0][:split]]), torch.arange(split)[None], prefix, None)
    kv = PackedPrefillKV([len(ids) - split for ids in prompts], [prefix] * len(prompts), CPU)
    ids = torch.tensor([[token for p in prompts for token in p[split:]]])
    positions = torch.cat([torch.arange(split, len(p)) for p in prompts])[None]
    return list(forward.packed(ids, positions, kv)), kv.prompts


def batched_logits(forward, prompts, continuations, packed: bool = False) -> list[torch.Tensor]:
    """Every prompt prefilled (alone, or all in one packed pass) and merged into one left-padded batch, then
    decoded together, each row fed its own continuation (a row whose continuation ended repeats its last
    token; its logits are dropped)."""
    kv = BatchKV(CPU)
    rows = []
    with torch.inference_mode():
        if packed:
            last, prefills = packed_prefill(forward, prompts)
        else:
            prefills = [PrefillKV() for _ in prompts]
            last = [
                forward(torch.tensor([ids]), torch.arange(len(ids))[None], prefill, None)[0]
                for ids, prefill in zip(prompts, prefills)
            ]
        for ids, first, prefill in zip(prompts, last, prefills):
            rows.append([first])
            kv.add_rows(prefill, torch.ones((1, len(ids)), dtype=torch.long))
        for step in range(max(map(len, continuations)) - 1):
            tokens = torch.tensor([[cont[min(step, len(cont) - 1)]] for cont in continuations])
            mask, positions = kv.step_inputs()
            logits = forward(tokens, positions, kv, mask)
            kv.commit_step()
            for row, cont, out in zip(rows, continuations, logits):
                if step < len(cont) - 1:
                    row.append(out)
    return [torch.stack(row).float() for row in rows]


def engine_logits(forward, probes, path: str) -> list[torch.Tensor]:
    prompts, continuations, _ = probes
    if path in ("batch", "packed"):
        return batched_logits(forward, prompts, continuations, packed=path == "packed")

    def prefix(ids: list[int]) -> int:
        return {"prefix": shared_prefix(prompts), "cached": len(ids) - 1}.get(path, 0)

    return [served_logits(forward, ids, cont, CPU, prefix=prefix(ids)) for ids, cont in zip(prompts, continuations)]


def test_the_probes_cover_clear_and_prefix_positions(probes):
    prompts, continuations, logits = probes
    assert shared_prefix(prompts) >= 20  # SmolLM2's default system block
    assert sum(map(len, continuations)) >= 60
    assert divergence(logits, logits).clear_positions >= 30


@pytest.mark.parametrize("path", PATHS)
def test_fp32_engine_matches_transformers(smollm2_served, probes, path):
    _, forward = smollm2_served("float32")
    result = divergence(probes[2], engine_logits(forward, probes, path))
    assert result.top1 == 1.0 and result.mean_kl < 1e-5, result


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("label, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_half_precision_engine_is_as_close_to_fp32_as_transformers_in_that_dtype(
    smollm2_served, smollm2_transformers, probes, path, label, dtype
):
    """Our fused forward, prefix cache and batch must add no error of their own on top of the dtype's
    rounding: they stay within twice the divergence transformers' own forward shows in the same dtype,
    agree with it on every clearly decided token, and pass the bar ``--dtype auto`` applies."""
    prompts, continuations, reference = probes
    _, forward = smollm2_served(label)
    ours = engine_logits(forward, probes, path)
    plain = [reference_logits(smollm2_transformers(dtype), ids, cont) for ids, cont in zip(prompts, continuations)]
    ours_vs_fp32, plain_vs_fp32 = divergence(reference, ours), divergence(reference, plain)
    assert ours_vs_fp32.passes(), ours_vs_fp32
    assert ours_vs_fp32.mean_kl <= 2 * plain_vs_fp32.mean_kl + 1e-4, (ours_vs_fp32, plain_vs_fp32)
    assert divergence(plain, ours).clear_top1 == 1.0, divergence(plain, ours)


@pytest.mark.parametrize("path", ["whole", "prefix", "cached", "packed"])
def test_int8_stays_within_its_stated_tolerance_and_below_the_bar(smollm2_served, probes, path):
    """Dynamic int8 linear layers (one activation scale per tensor) stray far more than bf16 on SmolLM2:
    measured mean KL ~0.56 nats and 83% of clearly decided tokens kept (README, "Precision"). The
    tolerance here catches it getting worse; the bar is why ``--dtype auto`` does not serve it on this model.
    If int8 improves past the bar, update the README and this test."""
    _, forward = smollm2_served("int8")
    result = divergence(probes[2], engine_logits(forward, probes, path))
    assert result.mean_kl <= 0.8 and result.clear_top1 >= 0.75, result
    assert not result.passes(ACCURACY_BAR), result


@pytest.mark.parametrize("path", PATHS)
def test_w8a16_passes_the_bar_on_every_path(smollm2_served, probes, path):
    """int8 weights with bf16 activations (``w8a16``) round each weight to one of 255 steps of its row: on
    SmolLM2 they stray about three times as far as bf16 does (mean KL ~0.003 nats) and keep every clearly decided
    token (README, "Precision"). Decoding a few rows goes through the int8 kernel and prefilling a prompt through
    the bf16 copy, so the paths here cover both."""
    _, forward = smollm2_served("w8a16")
    result = divergence(probes[2], engine_logits(forward, probes, path))
    assert result.passes(ACCURACY_BAR) and result.mean_kl <= 0.01 and result.clear_top1 == 1.0, result


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("label", ["w4a16", "w4a32"])
def test_w4_passes_the_bar_on_every_path(smollm2_served, probes, path, label):
    """int4 weights in groups of 32: the bundled SmolLM2 comes from a GGUF ``Q4_1`` file, whose 4-bit steps they
    recover, so they stray about as far as bf16 does (README, "Precision") and keep every clearly decided token.
    Decoding a few rows goes through the int4 kernel and prefilling a prompt through the float copy, where that is
    faster here, so the paths here cover both."""
    _, forward = smollm2_served(label)
    result = divergence(probes[2], engine_logits(forward, probes, path))
    assert result.passes(ACCURACY_BAR) and result.mean_kl <= 0.01 and result.clear_top1 == 1.0, result
