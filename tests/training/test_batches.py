"""The split, the step count and the padding collator, without a model."""

from __future__ import annotations

import pytest
import torch

from qubrid_lab.training.batches import PaddingCollator, split_examples, steps_per_epoch
from qubrid_lab.training.errors import TrainingError
from qubrid_lab.training.lora import resolve_placement


def examples(count: int) -> list[dict[str, list[int]]]:
    return [{"input_ids": [index, index], "labels": [-100, index]} for index in range(count)]


def test_the_collator_pads_inputs_with_the_pad_id_labels_with_minus_100_and_masks_the_padding():
    batch = PaddingCollator(pad_id=0)([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ])

    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_no_split_keeps_every_example_for_training():
    split = split_examples(examples(5), 0.0, seed=1)

    assert split.train == examples(5) and split.validation == []


def test_the_split_is_fixed_by_the_seed_and_holds_out_the_fraction_asked_for():
    first = split_examples(examples(20), 0.25, seed=3)

    assert len(first.validation) == 5 and len(first.train) == 15
    assert sorted(first.train + first.validation, key=lambda e: e["input_ids"][0]) == examples(20)
    assert split_examples(examples(20), 0.25, seed=3) == first
    assert split_examples(examples(20), 0.25, seed=4) != first


def test_a_small_split_holds_out_one_example_and_a_large_one_leaves_one_to_train_on():
    assert len(split_examples(examples(10), 0.01, seed=0).validation) == 1
    assert len(split_examples(examples(3), 0.99, seed=0).train) == 1


def test_a_split_of_a_single_example_is_an_error():
    with pytest.raises(TrainingError, match="at least 2 usable rows"):
        split_examples(examples(1), 0.2, seed=0)


@pytest.mark.parametrize(
    ("rows", "batch", "accumulation", "processes", "expected"),
    [(12, 4, 1, 1, 3), (13, 4, 1, 1, 4), (13, 4, 2, 1, 2), (3, 8, 1, 1, 1), (13, 2, 1, 2, 4), (13, 2, 3, 2, 2)],
)
def test_steps_per_epoch_counts_batches_per_process_and_partial_accumulation(rows, batch, accumulation, processes,
                                                                            expected):
    assert steps_per_epoch(rows, batch, accumulation, processes) == expected


def test_devices_are_checked_before_anything_loads(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert resolve_placement("cpu").device == "cpu"
    assert resolve_placement("auto").dtype == torch.float32
    with pytest.raises(TrainingError, match="no usable CUDA GPU"):
        resolve_placement("cuda")
    with pytest.raises(TrainingError, match="not a training device"):
        resolve_placement("tpu")
