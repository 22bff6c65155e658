"""Training examples into batches: the dataset the Trainer reads and the padding collator.

The train / validation split and the step count are plain list arithmetic, in ``qubrid_lab.data.splits``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qubrid_lab.data.formatting import IGNORE_INDEX


def has_target(example: dict[str, list[int]]) -> bool:
    """True when the example has at least one token the loss is taken on."""
    return any(label != IGNORE_INDEX for label in example["labels"])


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
