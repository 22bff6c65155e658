"""The collators and the device check, without a model (``test_packed_batches.py`` runs them through one)."""

from __future__ import annotations

import pytest
import torch

from qubrid_lab.training.batches import PACKED, PaddingCollator, collator
from qubrid_lab.training.errors import TrainingError
from qubrid_lab.training.lora import resolve_placement


def test_the_collator_pads_inputs_with_the_pad_id_labels_with_minus_100_and_masks_the_padding():
    batch = PaddingCollator(pad_id=0)(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
            {"input_ids": [8], "labels": [8]},
        ]
    )

    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_the_packed_collator_puts_the_rows_end_to_end_with_positions_restarting_and_no_label_across_rows():
    batch = collator(PACKED, pad_id=0)(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
            {"input_ids": [8, 9], "labels": [8, 9]},
        ]
    )

    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # 7 must not be trained to predict 8, the next row's first token: its label is -100, as padding's is
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert "attention_mask" not in batch  # a mask would stop transformers reading the rows from the positions
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_devices_are_checked_before_anything_loads(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert resolve_placement("cpu").device == "cpu"
    assert resolve_placement("auto").dtype == torch.float32
    with pytest.raises(TrainingError, match="no usable CUDA GPU"):
        resolve_placement("cuda")
    with pytest.raises(TrainingError, match="not a training device"):
        resolve_placement("tpu")
