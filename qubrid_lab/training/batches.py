"""Training examples into batches: the seeded train / validation split, the dataset and the padding collator."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from qubrid_lab.training.errors import TrainingError

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens and padding)


@dataclass(frozen=True)
class Split:
    """The examples trained on and the ones held out to measure validation loss."""

    train: list[dict[str, list[int]]]
    validation: list[dict[str, list[int]]]


def has_target(example: dict[str, list[int]]) -> bool:
    """True when the example has at least one token the loss is taken on."""
    return any(label != IGNORE_INDEX for label in example["labels"])


def split_examples(examples: list[dict[str, list[int]]], validation_split: float, seed: int) -> Split:
    """Hold out ``validation_split`` of the examples (at least one when the split is above 0), chosen by ``seed``.

    The split keeps the file's order within each part; the Trainer shuffles the training part itself.
    """
    if validation_split == 0:
        return Split(list(examples), [])
    if len(examples) < 2:
        raise TrainingError(
            f"validation_split {validation_split} needs at least 2 usable rows (one to train on, one to "
            f"validate); the dataset has {len(examples)}. Add rows or set validation_split to 0."
        )
    count = min(max(1, round(len(examples) * validation_split)), len(examples) - 1)
    held_out = set(random.Random(seed).sample(range(len(examples)), count))
    return Split(
        [example for index, example in enumerate(examples) if index not in held_out],
        [example for index, example in enumerate(examples) if index in held_out],
    )


def steps_per_epoch(train_rows: int, batch_size: int, gradient_accumulation_steps: int, processes: int) -> int:
    """Optimizer steps in one pass over ``train_rows``, counted the way the Trainer's data loader batches them.

    Each process gets ``ceil(batches / processes)`` batches (accelerate pads the last round to even it out), and
    a short final accumulation round still makes a step.
    """
    batches = math.ceil(math.ceil(train_rows / batch_size) / processes)
    return max(1, math.ceil(batches / gradient_accumulation_steps))


class ExampleDataset(torch.utils.data.Dataset):
    """Token-id examples held as plain lists; the collator turns a batch of them into tensors."""

    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


@dataclass(frozen=True)
class PaddingCollator:
    """Right-pads a batch to its longest example: ``pad_id`` in the inputs, -100 in the labels, 0 in the mask."""

    pad_id: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(example["input_ids"]) for example in batch)
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, example in enumerate(batch):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.tensor(example["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
