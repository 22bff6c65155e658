"""Training examples into a seeded train / validation split, and the optimizer steps an epoch of them takes.

Plain functions on lists, no tensors: the dataset profile counts what a job would do with them and the training
run does it, so a profile's step count and refusals are the job's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

MIN_ROWS_TO_VALIDATE = 2  # one to train on, one to validate


@dataclass(frozen=True)
class Split:
    """The examples trained on and the ones held out to measure validation loss."""

    train: list[dict[str, list[int]]]
    validation: list[dict[str, list[int]]]


def validation_split_problem(usable_rows: int, validation_split: float) -> str | None:
    """Why ``validation_split`` cannot split ``usable_rows`` rows (too few to keep one on each side), or None."""
    if validation_split == 0 or usable_rows >= MIN_ROWS_TO_VALIDATE:
        return None
    return (
        f"validation_split {validation_split} needs at least {MIN_ROWS_TO_VALIDATE} usable rows (one to train "
        f"on, one to validate); the dataset has {usable_rows}. Add rows or set validation_split to 0"
    )


def split_examples(examples: list[dict[str, list[int]]], validation_split: float, seed: int) -> Split:
    """Hold out ``validation_split`` of the examples (at least one when the split is above 0), chosen by ``seed``.

    The split keeps the file's order within each part; the Trainer shuffles the training part itself. Too few
    examples for the split is a ``ValueError`` saying so (:func:`validation_split_problem`).
    """
    problem = validation_split_problem(len(examples), validation_split)
    if problem:
        raise ValueError(problem + ".")
    if validation_split == 0:
        return Split(list(examples), [])
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
