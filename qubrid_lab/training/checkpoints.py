"""A job's checkpoints on disk (``<job dir>/checkpoints/checkpoint-N``): the newest to resume from while it trains,
and afterwards every kept one with its metrics, to be listed and served as a model of its own.

Each checkpoint is what the Trainer saved: the LoRA adapter (``adapter_config.json``, weights) and
``trainer_state.json``, which the Trainer writes last, so its presence marks a complete checkpoint; its
``log_history`` holds the metrics of every step up to it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from qubrid_lab.training.errors import TrainingError

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_FILE = "trainer_state.json"
# a checkpoint served as a model: its job's fine-tuned model id and the step, as OpenAI names them
CHECKPOINT_MODEL = re.compile(r"^(ft:.+:(ftjob-[A-Za-z0-9]+)):ckpt-step-(\d+)$")
# OpenAI's names for a checkpoint's metrics, from the Trainer's log entries at its step
METRIC_NAMES = {
    "loss": "train_loss",
    "eval_loss": "valid_loss",
    "eval_mean_token_accuracy": "valid_mean_token_accuracy",
}


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    created_at: float
    metrics: dict[str, float] = field(default_factory=dict)


def _numbered(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    if not checkpoints_dir.is_dir():
        return []
    return sorted(
        (
            (int(match.group(1)), path)
            for path in checkpoints_dir.iterdir()
            if path.is_dir() and (match := CHECKPOINT_PATTERN.match(path.name))
        ),
        reverse=True,
    )


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint; one cut short while being written (no trainer state) is passed over."""
    for _, path in _numbered(checkpoints_dir):
        if (path / TRAINER_STATE_FILE).is_file():
            return path
        log.warning("skipping incomplete checkpoint %s", path)
    return None


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint was saved at, read from its trainer state; unreadable state is an error."""
    try:
        return int(json.loads((checkpoint / TRAINER_STATE_FILE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TrainingError(f"cannot resume: checkpoint {checkpoint} is unusable ({error}).") from error


def saved_checkpoints(checkpoints_dir: Path) -> list[Checkpoint]:
    """Every complete checkpoint, newest first, with the metrics logged at its step."""
    found = []
    for step, path in _numbered(checkpoints_dir):
        state_file = path / TRAINER_STATE_FILE
        try:
            history = json.loads(state_file.read_text()).get("log_history", [])
        except (OSError, ValueError):
            continue  # being written, or cut short: not a checkpoint yet
        metrics = {"step": step}
        for entry in history:
            if entry.get("step") == step:
                metrics.update({METRIC_NAMES[name]: value for name, value in entry.items() if name in METRIC_NAMES})
        found.append(Checkpoint(step, path, state_file.stat().st_mtime, metrics))
    return found


def fine_tuned_model_id(base_model: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base_model}:{suffix or ''}:{job_id}"


def checkpoint_model_id(fine_tuned_model: str, step: int) -> str:
    return f"{fine_tuned_model}:ckpt-step-{step}"


def parse_checkpoint_model(model_id: str) -> tuple[str, str, int] | None:
    """``(fine-tuned model id, job id, step)`` of a checkpoint model id, or None for any other id."""
    match = CHECKPOINT_MODEL.fullmatch(model_id)
    return (match.group(1), match.group(2), int(match.group(3))) if match else None
