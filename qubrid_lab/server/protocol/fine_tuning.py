"""The fine-tuning API (``/fine-tuning/...``): datasets, jobs, job events and fine-tuned models.

Fields follow the order of the reference spec; extensions are marked. Timestamps are ISO 8601 in UTC
(``2025-01-31T12:00:00Z``), as the spec's ``date-time`` format asks.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import Field

from qubrid_lab.server.protocol.common import WireModel
from qubrid_lab.storage.datasets import DatasetRecord
from qubrid_lab.storage.jobs import EventRecord, FineTunedModelRecord, JobRecord
from qubrid_lab.training.checkpoints import Checkpoint, checkpoint_model_id, fine_tuned_model_id
from qubrid_lab.training.hyperparameters import Hyperparameters


def iso_utc(timestamp: float | None, timespec: str = "seconds") -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec=timespec).replace("+00:00", "Z")


# --- datasets -------------------------------------------------------------------------------------------


class Dataset(WireModel):
    id: str
    name: str = Field(description="The display name given at upload, else the original filename.")
    size_bytes: int
    row_count: int
    columns: list[str]
    created_at: str

    @classmethod
    def of(cls, record: DatasetRecord) -> Dataset:
        return cls(
            id=record.id,
            name=record.name,
            size_bytes=record.size_bytes,
            row_count=record.row_count,
            columns=record.columns,
            created_at=iso_utc(record.created_at),
        )


class DatasetList(WireModel):
    data: list[Dataset]


# --- jobs -----------------------------------------------------------------------------------------------


class TrainingMetrics(WireModel):
    training_loss: float | None = None
    validation_loss: float | None = None
    steps_completed: int = 0
    epochs_completed: int = 0


class CreateFineTuningJobRequest(WireModel):
    """``task_type`` and ``hyperparameters`` are checked by the job manager, so one 400 lists every problem."""

    base_model: str
    dataset_id: str
    task_type: str = Field(description="'qa' or 'not_qa' (CSV columns), or 'chat' (extension: JSONL conversations).")
    hyperparameters: dict | None = None
    suffix: str | None = None
    column_mapping: dict[str, str] | None = Field(
        None, description="Extension: the dataset's column for each role (question, answer, context, text)."
    )
    validation_dataset_id: str | None = Field(
        None, description="Extension: a dataset to validate on, instead of a validation_split of the training one."
    )


class FineTuningJob(WireModel):
    id: str
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    base_model: str
    dataset_id: str
    task_type: Literal["qa", "not_qa", "chat"] = Field(description="'chat' (JSONL conversations) is an extension.")
    hyperparameters: Hyperparameters
    fine_tuned_model: str | None
    training_metrics: TrainingMetrics
    created_at: str
    completed_at: str | None
    # Extensions
    suffix: str | None = None
    column_mapping: dict[str, str] | None = None
    error: str | None = Field(None, description="Extension: why the job failed, in words.")
    started_at: str | None = Field(None, description="Extension: when training first started.")
    total_steps: int | None = Field(None, description="Extension: optimizer steps the run will take, once known.")
    validation_dataset_id: str | None = Field(None, description="Extension: the dataset it validates on, if any.")
    status_detail: str | None = Field(
        None, description="Extension: why a job is in its status (a paused job shows as queued with 'paused' here)."
    )

    @classmethod
    def of(cls, job: JobRecord) -> FineTuningJob:
        paused = job.status == "paused"  # the platform's statuses have no "paused"
        return cls(
            id=job.id,
            status="queued" if paused else job.status,
            base_model=job.base_model,
            dataset_id=job.dataset_id,
            task_type=job.task_type,
            hyperparameters=Hyperparameters.model_construct(**job.hyperparameters),
            fine_tuned_model=job.fine_tuned_model,
            training_metrics=TrainingMetrics(
                training_loss=job.training_loss,
                validation_loss=job.validation_loss,
                steps_completed=job.steps_completed,
                epochs_completed=int(job.epochs_completed + 1e-6),
            ),
            created_at=iso_utc(job.created_at),
            completed_at=iso_utc(job.completed_at),
            suffix=job.suffix,
            column_mapping=job.column_mapping,
            error=job.error,
            started_at=iso_utc(job.started_at),
            total_steps=job.total_steps,
            validation_dataset_id=job.validation_dataset_id,
            status_detail="paused: POST .../resume queues it again, to continue from its newest checkpoint"
            if paused
            else None,
        )


class FineTuningJobList(WireModel):
    data: list[FineTuningJob]
    total: int


class FineTuningJobEvent(WireModel):
    """Extension (as in OpenAI's API): one line of a job's log; ``metrics`` events carry numbers in ``data``."""

    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: str
    level: Literal["info", "warning", "error"]
    type: Literal["message", "metrics"]
    message: str
    data: dict

    @classmethod
    def of(cls, event: EventRecord) -> FineTuningJobEvent:
        # milliseconds: a live plot or a benchmark times steps a fraction of a second apart
        return cls(
            id=event.id,
            created_at=iso_utc(event.created_at, "milliseconds"),
            level=event.level,
            type=event.type,
            message=event.message,
            data=event.data,
        )


class FineTuningJobEventList(WireModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class FineTuningCheckpoint(WireModel):
    """Extension: a checkpoint the job saved, with the metrics at its step, servable as a model of its own."""

    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    step: int
    created_at: str
    fine_tuned_model_checkpoint: str = Field(description="The model id that serves this checkpoint on /v1.")
    metrics: dict[str, float]

    @classmethod
    def of(cls, job: JobRecord, checkpoint: Checkpoint) -> FineTuningCheckpoint:
        return cls(
            id=checkpoint_id(job.id, checkpoint.step),
            step=checkpoint.step,
            created_at=iso_utc(checkpoint.created_at),
            metrics=checkpoint.metrics,
            fine_tuned_model_checkpoint=checkpoint_model_id(
                fine_tuned_model_id(job.base_model, job.suffix, job.id), checkpoint.step
            ),
        )


class FineTuningCheckpointList(WireModel):
    object: Literal["list"] = "list"
    data: list[FineTuningCheckpoint]
    has_more: bool = False


def checkpoint_id(job_id: str, step: int) -> str:
    return f"ftckpt-{job_id.removeprefix('ftjob-')}-{step}"


# --- fine-tuned models ----------------------------------------------------------------------------------


class FineTunedModel(WireModel):
    id: str
    base_model: str
    job_id: str
    status: Literal["available", "deploying", "deleted"]
    created_at: str

    @classmethod
    def of(cls, model: FineTunedModelRecord) -> FineTunedModel:
        return cls(
            id=model.id,
            base_model=model.base_model,
            job_id=model.job_id,
            status=model.status,
            created_at=iso_utc(model.created_at),
        )


class FineTunedModelList(WireModel):
    data: list[FineTunedModel]
