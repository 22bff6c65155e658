"""Serving LoRA adapters on a loaded base: each row of a batch decodes as its merged fine-tuned model would."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import shutil

import pytest
import torch

from qubrid_lab.engine.base import Failure, GenerationRun
from qubrid_lab.engine.forward import FusedLlama, transformers_forward
from qubrid_lab.engine.kv import BatchKV, PrefillKV
from qubrid_lab.engine.lora import LoraSet
from qubrid_lab.engine.registry import ModelRegistry
from qubrid_lab.engine.sampling import SamplingParams
from qubrid_lab.errors import InvalidRequestError, ModelNotFoundError
from qubrid_lab.models.loading import TRAINED_TEMPLATE_FILE
from tests.engine.test_kv import prompt
from tests.engine.test_scheduler import collect, generate

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(tiny_model, directory, targets, seed, rank=4, alpha=8.0):
    """A peft LoRA adapter with random (non-zero) A and B, saved the way a fine-tuning job saves one."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(tiny_model), config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    peft_model.save_pretrained(directory)
    return peft_model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """Two adapters: one on every linear layer, one on q/v only (fused q/k/v gets zero rows for k)."""
    root = tmp_path_factory.mktemp("adapters")
    merged = {
        "wide": make_adapter(tiny_model, root / "wide", ALL_LINEAR, seed=1),
        "narrow": make_adapter(tiny_model, root / "narrow", ["q_proj", "v_proj"], seed=2, rank=2, alpha=16.0),
    }
    return {name: root / name for name in merged}, merged


@pytest.fixture(params=["transformers", "fused"])
def served(request, tiny_model, adapters):
    """A copy of the tiny model with both adapters loaded, and its forward."""
    model = copy.deepcopy(tiny_model)
    if request.param == "fused":
        FusedLlama.fuse(model)
        forward = FusedLlama(model)
    else:
        forward = transformers_forward(model)
    lora = LoraSet(model)
    for name, directory in adapters[0].items():
        lora.load(name, directory)
    return forward, lora


def greedy(forward, lora, rows: list[tuple[str | None, list[int]]], steps: int) -> list[list[int]]:
    """Prefill each row alone with its adapter, then decode all rows together; the tokens of each row."""
    kv = BatchKV(torch.device("cpu"))
    tokens = []
    with torch.inference_mode():
        for adapter, ids in rows:
            prefill = PrefillKV()
            with lora.rows([adapter]):
                logits = forward(torch.tensor([ids]), torch.arange(len(ids))[None], prefill, None)
            kv.add_rows(prefill, torch.ones((1, len(ids)), dtype=torch.long))
            tokens.append([int(logits[0].argmax())])
        for _ in range(steps - 1):
            mask, positions = kv.step_inputs()
            with lora.rows([adapter for adapter, _ in rows]):
                logits = forward(torch.tensor([[t[-1]] for t in tokens]), positions, kv, mask)
            kv.commit_step()
            for row, step in zip(tokens, logits):
                row.append(int(step.argmax()))
    return tokens


def reference(model, ids: list[int], steps: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
    return out[0, len(ids) :].tolist()


def test_each_row_decodes_like_its_merged_model_in_one_mixed_batch(tiny_model, adapters, served):
    forward, lora = served
    merged = adapters[1]
    rows = [("wide", prompt(7, 1)), (None, prompt(11, 2)), ("narrow", prompt(5, 3)), ("wide", prompt(9, 4))]
    batch = greedy(forward, lora, rows, steps=6)
    expected = [reference(merged[a] if a else tiny_model, ids, 6) for a, ids in rows]
    assert batch == expected
    assert batch[0] != reference(tiny_model, rows[0][1], 6)  # the adapter really changes the output


def test_a_batch_of_one_adapter_takes_the_fast_path(tiny_model, adapters, served):
    forward, lora = served
    rows = [("narrow", prompt(6, 5)), ("narrow", prompt(8, 6))]
    assert greedy(forward, lora, rows, steps=5) == [reference(adapters[1]["narrow"], ids, 5) for _, ids in rows]


def test_a_removed_adapter_leaves_the_base_model_as_it_was(tiny_model, adapters, served):
    forward, lora = served
    lora.remove("wide")
    lora.remove("narrow")
    ids = prompt(9, 7)
    assert greedy(forward, lora, [(None, ids)], steps=5) == [reference(tiny_model, ids, 5)]
    assert "wide" not in lora


def test_an_adapter_for_another_model_is_refused_with_the_reason(tiny_model, tmp_path, served):
    _, lora = served
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    from safetensors.torch import save_file

    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 999),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2),
        },
        str(tmp_path / "adapter_model.safetensors"),
    )
    with pytest.raises(InvalidRequestError, match="does not fit the base model"):
        lora.load("odd", tmp_path)
    with pytest.raises(InvalidRequestError, match="readable LoRA adapter"):
        lora.load("missing", tmp_path / "nowhere")


def test_fine_tuned_models_are_served_next_to_their_base(engine_factory, adapters, tiny_model, tmp_path):
    base = engine_factory()
    registry = ModelRegistry(chat={"tiny": base})
    registry.add_adapter("ft:tiny:wide:ftjob-1", "tiny", adapters[0]["wide"], created=123)
    fine_tuned = registry.chat_model("ft:tiny:wide:ftjob-1")
    assert (fine_tuned.created, fine_tuned.context_length) == (123, base.context_length)

    merged_dir = tmp_path / "merged"
    adapters[1]["wide"].save_pretrained(merged_dir)
    base.tokenizer.save_pretrained(merged_dir)
    from qubrid_lab.engine.local import LocalChatEngine
    from qubrid_lab.models.catalogue import ModelEntry

    merged = LocalChatEngine(
        ModelEntry("merged", "chat", f"dir:{merged_dir}", owned_by="tests"),
        tmp_path / "cache",
        device="cpu",
        dtype="float32",
    )
    try:
        conversation = [{"role": "user", "content": "Hello there"}]

        async def both():
            runs = [
                GenerationRun(m, [m.encode_chat(conversation)], SamplingParams(temperature=0.0, max_tokens=10), 1)
                for m in (fine_tuned, base)
            ]
            return await asyncio.gather(*(collect(run) for run in runs))

        tuned_text, base_text = (outcome.text() for outcome in asyncio.run(both()))
        assert tuned_text == generate(merged, [merged.encode_chat(conversation)], temperature=0.0, max_tokens=10).text()
        assert base_text != tuned_text
    finally:
        merged.close()

    registry.remove_adapter("ft:tiny:wide:ftjob-1")
    with pytest.raises(ModelNotFoundError):
        registry.chat_model("ft:tiny:wide:ftjob-1")
    with pytest.raises(ModelNotFoundError, match="needs its base model 'absent'"):
        registry.add_adapter("ft:absent::ftjob-2", "absent", adapters[0]["wide"], created=1)


def test_deleting_a_fine_tuned_model_fails_its_running_requests_with_the_reason(engine_factory, adapters):
    base = engine_factory()
    registry = ModelRegistry(chat={"tiny": base})
    registry.add_adapter("ft:tiny:narrow:ftjob-3", "tiny", adapters[0]["narrow"], created=1)
    fine_tuned = registry.chat_model("ft:tiny:narrow:ftjob-3")

    async def run_then_delete():
        run = GenerationRun(
            fine_tuned,
            [fine_tuned.encode_chat([{"role": "user", "content": "Go"}])],
            SamplingParams(temperature=0.0, max_tokens=200),
            1,
        )
        events = run.events()
        await events.__anext__()  # decoding has started
        registry.remove_adapter("ft:tiny:narrow:ftjob-3")
        return [event async for event in events]

    events = asyncio.run(run_then_delete())
    assert isinstance(events[-1], Failure) and "was deleted" in events[-1].message


@pytest.mark.parametrize("dtype", ["int8", "w8a16", "w4a16"])
def test_adapters_also_apply_over_integer_layers(engine_factory, adapters, dtype):
    """CPU precisions quantize the base's linear layers; the adapters' float updates go on top of them."""
    base = engine_factory(f"tiny-{dtype}", dtype=dtype)
    registry = ModelRegistry(chat={"tiny": base})
    registry.add_adapter("ft:tiny:wide:ftjob-4", "tiny", adapters[0]["wide"], created=1)
    ids = base.encode_chat([{"role": "user", "content": "Hello there"}])
    tuned = generate(registry.chat_model("ft:tiny:wide:ftjob-4"), [ids], temperature=0.0, max_tokens=8).text()
    assert tuned != generate(base, [ids], temperature=0.0, max_tokens=8).text()
    registry.remove_adapter("ft:tiny:wide:ftjob-4")


def test_a_fine_tune_renders_prompts_with_the_template_it_was_trained_with(engine_factory, adapters, tmp_path, caplog):
    base = engine_factory()
    registry = ModelRegistry(chat={"tiny": base})
    conversation = [{"role": "user", "content": "Hello there"}]
    same, other = tmp_path / "same", tmp_path / "other"
    for folder, template in (
        (same, base.tokenizer.chat_template),
        (other, base.tokenizer.chat_template.replace("<|im_start|>", "<|im_start|>>")),
    ):
        shutil.copytree(adapters[0]["wide"], folder)
        (folder / TRAINED_TEMPLATE_FILE).write_text(template)
    registry.add_adapter("ft:tiny:same:ftjob-1", "tiny", same, created=1)
    assert registry.chat_model("ft:tiny:same:ftjob-1").encode_chat(conversation) == base.encode_chat(conversation)
    with caplog.at_level(logging.WARNING, logger="qubrid_lab.engine.local"):
        registry.add_adapter("ft:tiny:other:ftjob-2", "tiny", other, created=1)
    assert f"trained with a chat template other than {base.model_id}'s current one" in caplog.text
    ids = registry.chat_model("ft:tiny:other:ftjob-2").encode_chat(conversation)
    assert base.tokenizer.decode(ids).startswith("<|im_start|>>user")
    for model_id in ("ft:tiny:same:ftjob-1", "ft:tiny:other:ftjob-2"):
        registry.remove_adapter(model_id)
