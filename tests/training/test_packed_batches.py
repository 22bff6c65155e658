"""Packed batches through real models: each row computed as alone, the same loss, gradients and evaluation as
padded batches, and which models get which batches.

The loss check runs the Trainer's own step (its count of the tokens the loss is averaged over, then forward and
backward) on the job's training arguments, once on padded and once on packed batches of the same rows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qubrid_lab.data.columns import ColumnPlan
from qubrid_lab.data.formatting import IGNORE_INDEX, build_examples
from qubrid_lab.training.batches import PACKED, PADDED, ExampleDataset, choose_batching, collator
from qubrid_lab.training.hyperparameters import Hyperparameters
from qubrid_lab.training.lora import Placement, lora_model
from qubrid_lab.training.row_attention import ROW_SDPA, attend_row_by_row
from qubrid_lab.training.runner import (
    TrainingSpec,
    mean_token_accuracy,
    plan_schedule,
    predicted_tokens,
    training_arguments,
)

CPU = Placement("cpu", torch.float32, distributed=False)


@pytest.fixture(scope="module")
def examples(tiny_tokenizer) -> list[dict[str, list[int]]]:
    """Seven qa rows of different lengths (the prompt takes no loss) and one text row (every token does)."""
    rows = [
        {"question": f"What is fact number {i}?", "answer": "It is that " + "one more, " * i + "and done."}
        for i in range(7)
    ]
    qa = build_examples(rows, ColumnPlan("qa", question="question", answer="answer"), tiny_tokenizer, 128)
    text = build_examples(
        [{"text": "The quick brown fox jumps over the lazy dog."}],
        ColumnPlan("not_qa", text="text"),
        tiny_tokenizer,
        128,
    )
    examples = qa.examples + text.examples
    assert len({len(example["input_ids"]) for example in examples}) > 4
    assert examples[-1]["labels"][0] != IGNORE_INDEX  # the row whose first label the packed collator masks
    return examples


def tiny(kind: str):
    """A two-layer model of a family, with random weights; ``mistral-window`` attends to its last 4 tokens only."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MambaConfig,
        MambaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        OPTConfig,
        OPTForCausalLM,
    )

    torch.manual_seed(0)
    sizes = {"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2}
    attention = {"intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    if kind.startswith("llama"):
        return LlamaForCausalLM._from_config(
            LlamaConfig(**sizes, **attention), attn_implementation=kind.partition("-")[2]
        )
    if kind == "mistral-window":
        return MistralForCausalLM._from_config(
            MistralConfig(**sizes, **attention, sliding_window=4), attn_implementation="sdpa"
        )
    if kind == "opt":
        return OPTForCausalLM(OPTConfig(**sizes, ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32))
    return MambaForCausalLM(MambaConfig(**sizes, state_size=4))


def assert_rows_as_alone(model, rows: list[list[int]]) -> None:
    """Each row's logits in one packed sequence of ``rows`` are its logits computed alone."""
    batch = collator(PACKED, pad_id=0)([{"input_ids": row, "labels": row} for row in rows])
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row]), use_cache=False).logits
            torch.testing.assert_close(packed[:, start : start + len(row)], alone, rtol=1e-5, atol=1e-5)
            start += len(row)


@pytest.mark.parametrize("row_by_row", [False, True], ids=["whole-sequence mask", "row by row"])
def test_each_row_of_a_packed_batch_gets_the_logits_it_gets_alone(tiny_model_dir, examples, row_by_row):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    assert attend_row_by_row(model) if row_by_row else model.config._attn_implementation == "sdpa"

    assert_rows_as_alone(model, [example["input_ids"] for example in examples])


def test_row_by_row_attention_keeps_the_models_own_mask_within_each_row():
    model = tiny("mistral-window")
    attend_row_by_row(model)

    # rows longer than the 4-token window, and a row of one token
    assert_rows_as_alone(model, [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15, 16, 17, 18, 19, 20, 21]])


@pytest.mark.parametrize(
    ("kind", "device", "batching", "attention"),
    [
        ("llama-sdpa", "cpu", PACKED, ROW_SDPA),  # transformers' masking reads the rows from the position ids
        ("llama-sdpa", "cuda", PACKED, "sdpa"),  # row by row is for the CPU, where it was measured
        ("llama-eager", "cpu", PACKED, "eager"),
        ("opt", "cuda", PADDED, "sdpa"),  # its mask runs across the rows
        ("opt", "cpu", PACKED, ROW_SDPA),  # row by row, it cannot
        ("mamba", "cpu", PADDED, "eager"),  # its state runs on from one row into the next
    ],
)
def test_models_that_keep_packed_rows_apart_get_packed_batches_and_others_padded_ones(
    kind, device, batching, attention
):
    model = tiny(kind).train()

    assert choose_batching(model, device) == batching
    assert model.config._attn_implementation == attention
    assert model.training  # the check ran in eval mode and put the model back


def test_a_model_left_on_padded_batches_keeps_its_own_attention(monkeypatch):
    monkeypatch.setattr("qubrid_lab.training.batches.keeps_packed_rows_apart", lambda model: False)
    model = tiny("llama-sdpa")

    assert choose_batching(model, "cpu") == PADDED
    assert model.config._attn_implementation == "sdpa"


def test_the_bundled_default_model_gets_packed_batches(smollm2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert choose_batching(model, "cpu") == PACKED


def lora_trainer(model_dir: Path, tmp_path: Path, batching: str, examples, lora_b: bool = True, **hyperparameters):
    """A Trainer built as a job builds it, without dropout (which would draw different masks for different shapes)
    and, with ``lora_b``, on LoRA B matrices that are not zero (at zero, the A matrices would get no gradient to
    compare). Rows are taken in order, so that padded and packed batches hold the same rows."""
    from transformers import Trainer

    settings = Hyperparameters(**{"lora_rank": 4, "lora_dropout": 0.0, "batch_size": 4, **hyperparameters})
    model = lora_model(str(model_dir), CPU, settings)
    if batching == PACKED:
        assert choose_batching(model, "cpu") == PACKED  # as a job on the CPU: row by row attention
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if lora_b and "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    spec = TrainingSpec(str(model_dir), tmp_path / "unused.csv", None, settings, tmp_path / batching)
    arguments = training_arguments(spec, plan_schedule(settings, len(examples)), CPU, True, batching)
    arguments.train_sampling_strategy = "random"  # padded runs group rows by length, in evaluation too
    return Trainer(
        model=model,
        args=arguments,
        data_collator=collator(batching, pad_id=0),
        eval_dataset=ExampleDataset(examples),
        compute_metrics=mean_token_accuracy,
        preprocess_logits_for_metrics=predicted_tokens,
    )


def one_step(trainer, examples) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and the LoRA gradients of one optimizer step over ``examples``, in micro-batches as configured."""
    rows = trainer.args.per_device_train_batch_size
    batches = [trainer.data_collator(examples[start : start + rows]) for start in range(0, len(examples), rows)]
    samples, items = trainer.get_batch_samples(iter(batches), len(batches), trainer.args.device)
    trainer.model.zero_grad()
    loss = sum(float(trainer.training_step(trainer.model, batch, items)) for batch in samples)
    gradients = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    return loss, gradients


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_packed_batch_gives_the_loss_and_gradients_of_the_padded_one(
    tiny_model_dir, tmp_path, examples, accumulation
):
    padded_loss, padded = one_step(
        lora_trainer(tiny_model_dir, tmp_path, PADDED, examples, gradient_accumulation_steps=accumulation), examples
    )
    packed_loss, packed = one_step(
        lora_trainer(tiny_model_dir, tmp_path, PACKED, examples, gradient_accumulation_steps=accumulation), examples
    )

    # The mean over the same answer tokens: the Trainer divides the summed token losses of every micro-batch
    # of the step by one count of non-ignored shifted labels, which packing leaves unchanged.
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert len(packed) == 2 * 4 * 2  # lora_A and lora_B on q_proj, k_proj, v_proj, o_proj of two layers
    for name, gradient in padded.items():
        assert gradient.abs().sum() > 0, name
        torch.testing.assert_close(packed[name], gradient, rtol=1e-4, atol=1e-6)


def greedy_example(model, example: dict[str, list[int]], tokens: int) -> dict[str, list[int]]:
    """The prompt of ``example`` answered with ``tokens`` of the model's own greedy continuation, so the model
    predicts every answer token right."""
    ids = example["input_ids"][: example["labels"].index(next(label for label in example["labels"] if label >= 0))]
    prompt = len(ids)
    with torch.no_grad():
        for _ in range(tokens):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


def test_evaluation_of_packed_batches_gives_the_loss_and_token_accuracy_of_padded_ones(
    tiny_model, tiny_model_dir, tmp_path, examples
):
    # Rows the model gets right among rows it gets wrong, in batches of three (the last one short).
    rows = [
        examples[0],
        greedy_example(tiny_model, examples[1], 9),
        examples[2],
        examples[3],
        greedy_example(tiny_model, examples[4], 4),
    ]
    padded = lora_trainer(tiny_model_dir, tmp_path, PADDED, rows, lora_b=False, batch_size=3).evaluate()
    packed = lora_trainer(tiny_model_dir, tmp_path, PACKED, rows, lora_b=False, batch_size=3).evaluate()

    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-5)
    answer_tokens = sum(label != IGNORE_INDEX for row in rows for label in row["labels"][1:])
    assert padded["eval_mean_token_accuracy"] == pytest.approx((9 + 4) / answer_tokens)
    assert packed["eval_mean_token_accuracy"] == padded["eval_mean_token_accuracy"]
