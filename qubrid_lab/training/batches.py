"""Training examples into batches: the dataset the Trainer reads, and how its rows are put together.

A batch is packed when the model allows it: its rows end to end in one sequence, no padding, position ids
restarting at 0 on each row (transformers' ``DataCollatorWithFlattening``). With no attention mask given,
transformers' masking reads the row boundaries from the position ids and lets each token attend to the earlier
tokens of its own row only, so every row is computed as it would be alone. ``keeps_packed_rows_apart`` checks
that on the model at hand; a model it fails for gets padded batches of rows of similar length instead. On the
CPU, packed rows go through attention one at a time (``row_attention``), at the cost of the rows alone.

The train / validation split and the step count are plain list arithmetic, in ``qubrid_lab.data.splits``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qubrid_lab.data.formatting import IGNORE_INDEX
from qubrid_lab.training.row_attention import attend_row_by_row

PACKED = "packed"  # a batch's rows in one sequence, kept apart by their position ids
PADDED = "padded"  # rows of similar length together, each padded to the batch's longest


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


def collator(batching: str, pad_id: int):
    """The collator of ``batching``. Packed batches are ``input_ids``, ``labels`` and ``position_ids`` of shape
    [1, total tokens]; each row's first label is -100, so the last token of a row predicts nothing, as it predicts
    padding in a padded batch, and the loss is taken on the same tokens either way."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(separator_id=IGNORE_INDEX) if batching == PACKED else PaddingCollator(pad_id)


def keeps_packed_rows_apart(model) -> bool:
    """True when ``model`` computes a row packed after another as it computes that row alone.

    It does when its attention takes restarting position ids as row boundaries (transformers' masking does for
    sdpa, eager and flex attention, when no attention mask and no cache are passed; flash attention reads them
    too) and nothing else carries over from one row to the next. It does not for models whose mask runs across
    the rows (OPT, unless it attends row by row) or that carry a state along the sequence (Mamba). The same row
    placed first, where causal attention cannot see the other, measures the rounding a longer sequence brings,
    which the row placed second may not exceed by more than a hair.
    """
    embeddings = model.get_input_embeddings()
    generator = torch.Generator().manual_seed(0)
    row, other = (torch.randint(embeddings.num_embeddings, (length,), generator=generator) for length in (5, 7))

    def logits(*rows: torch.Tensor) -> torch.Tensor:
        input_ids = torch.cat(rows)[None].to(embeddings.weight.device)
        position_ids = torch.cat([torch.arange(len(part)) for part in rows])[None].to(input_ids.device)
        # use_cache=False as in training (the Trainer sets it): with a cache, transformers ignores the position ids
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[0].float()

    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone, first, second = logits(row), logits(row, other)[: len(row)], logits(other, row)[len(other) :]
    except (TypeError, ValueError):  # a forward that takes no position ids
        return False
    finally:
        model.train(training)
    rounding = (first - alone).abs().max()
    return bool((second - alone).abs().max() <= 2 * rounding + 1e-4 * alone.abs().max())


def choose_batching(model, device: str) -> str:
    """``PACKED`` when the model keeps packed rows apart, else ``PADDED``. On the CPU a model on sdpa attention is
    switched to attend row by row (``row_attention``), and checked that way."""
    row_by_row = device == "cpu" and attend_row_by_row(model)
    if keeps_packed_rows_apart(model):
        return PACKED
    if row_by_row:
        model.set_attn_implementation("sdpa")
    return PADDED
