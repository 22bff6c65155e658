"""The seeded train / validation split and the step count: plain arithmetic on lists, no tensors."""

from __future__ import annotations

import pytest

from qubrid_lab.data.splits import split_examples, steps_per_epoch, validation_split_problem


def examples(count: int) -> list[dict[str, list[int]]]:
    return [{"input_ids": [index, index], "labels": [-100, index]} for index in range(count)]


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
    with pytest.raises(ValueError, match="at least 2 usable rows"):
        split_examples(examples(1), 0.2, seed=0)
    assert validation_split_problem(1, 0.2).endswith("the dataset has 1. Add rows or set validation_split to 0")
    assert validation_split_problem(1, 0.0) is None and validation_split_problem(2, 0.5) is None


@pytest.mark.parametrize(
    ("rows", "batch", "accumulation", "processes", "expected"),
    [(12, 4, 1, 1, 3), (13, 4, 1, 1, 4), (13, 4, 2, 1, 2), (3, 8, 1, 1, 1), (13, 2, 1, 2, 4), (13, 2, 3, 2, 2)],
)
def test_steps_per_epoch_counts_batches_per_process_and_partial_accumulation(
    rows, batch, accumulation, processes, expected
):
    assert steps_per_epoch(rows, batch, accumulation, processes) == expected
