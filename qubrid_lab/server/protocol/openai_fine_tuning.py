"""OpenAI's fine-tuning API (``/v1/files``, ``/v1/fine_tuning/jobs``): the same datasets and jobs as the
platform's ``/fine-tuning/...`` API, in OpenAI's shapes, so code written for OpenAI runs unchanged.

A file uploaded with ``purpose: "fine-tune"`` is a dataset and a dataset is a file (one id, both APIs); a job
created through either API is a job of both. Times are Unix seconds here, as OpenAI's are.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.server.protocol.common import WireModel
from qubrid_lab.server.protocol.fine_tuning import FineTuningCheckpoint
from qubrid_lab.storage.datasets import DatasetRecord
from qubrid_lab.storage.jobs import EventRecord, JobRecord
from qubrid_lab.training.checkpoints import Checkpoint
from qubrid_lab.training.hyperparameters import Hyperparameters

BASE_LEARNING_RATE = Hyperparameters.model_fields["learning_rate"].default  # what a multiplier of 1 means
# "auto" as OpenAI describes it: epochs so that small datasets are seen often enough, and a batch of about
# 0.2% of the rows (at least 1, at most 256)
AUTO_EXAMPLES_SEEN = 100
AUTO_EPOCHS = (3, 25)
AUTO_BATCH_FRACTION = 0.002
STATUSES = {
    "queued": "queued",
    "running": "running",
    "paused": "paused",
    "completed": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}


def unix(timestamp: float | None) -> int | None:
    return None if timestamp is None else int(timestamp)


# --- files ----------------------------------------------------------------------------------------------


class FileObject(WireModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["fine-tune", "fine-tune-results"] = "fine-tune"
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None

    @classmethod
    def of(cls, record: DatasetRecord) -> FileObject:
        return cls(id=record.id, bytes=record.size_bytes, created_at=unix(record.created_at), filename=record.filename)


RESULT_FILE_PREFIX = "ftresult-"  # a job's metrics CSV, made from its events when read


def result_file_id(job_id: str) -> str:
    return RESULT_FILE_PREFIX + job_id.removeprefix("ftjob-")


def result_job_id(file_id: str) -> str | None:
    """The job whose result file ``file_id`` is, or None for any other file."""
    return "ftjob-" + file_id.removeprefix(RESULT_FILE_PREFIX) if file_id.startswith(RESULT_FILE_PREFIX) else None


def result_file(job: JobRecord, content: str) -> FileObject:
    return FileObject(
        id=result_file_id(job.id),
        bytes=len(content.encode()),
        created_at=unix(job.completed_at),
        filename="step_metrics.csv",
        purpose="fine-tune-results",
    )


def cursor_page(items: list, after: str | None, limit: int, missing: str) -> dict:
    """OpenAI's cursor paging over ``items`` (each with an ``id``), in their order: up to ``limit`` of those after
    the item ``after``, with ``has_more``, ``first_id`` and ``last_id``; an unknown ``after`` is a 400 saying
    ``missing``."""
    if after is not None:
        ids = [item.id for item in items]
        if after not in ids:
            raise InvalidRequestError(f"after: {missing} '{after}'.", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return {
        "data": page,
        "has_more": len(items) > limit,
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
    }


class FileList(WireModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(WireModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# --- jobs -----------------------------------------------------------------------------------------------


class OpenAIHyperparameters(WireModel):
    """OpenAI's three, each a number or "auto"; any platform hyperparameter may be added (an extension)."""

    model_config = ConfigDict(extra="allow")

    n_epochs: int | Literal["auto"] = Field("auto", description="Passes over the training file (1-100).")
    batch_size: int | Literal["auto"] = Field("auto", description="Rows per optimizer step (1-1024).")
    learning_rate_multiplier: float | Literal["auto"] = Field(
        "auto", description=f"Scales the LoRA learning rate {BASE_LEARNING_RATE:g}."
    )

    def platform(self, rows: int) -> dict:
        """The platform's hyperparameters for a training file of ``rows`` rows, "auto" chosen from it."""
        chosen = dict(self.model_extra or {})
        low, high = AUTO_EPOCHS
        chosen["epochs"] = (
            min(high, max(low, math.ceil(AUTO_EXAMPLES_SEEN / max(rows, 1))))
            if self.n_epochs == "auto"
            else self.n_epochs
        )
        chosen["batch_size"] = (
            min(256, max(1, round(rows * AUTO_BATCH_FRACTION))) if self.batch_size == "auto" else self.batch_size
        )
        multiplier = 1.0 if self.learning_rate_multiplier == "auto" else self.learning_rate_multiplier
        chosen["learning_rate"] = BASE_LEARNING_RATE * multiplier
        return chosen


class SupervisedMethod(WireModel):
    hyperparameters: OpenAIHyperparameters | None = None


class Method(WireModel):
    type: Literal["supervised"] = Field(description="Only supervised fine-tuning (LoRA) runs here.")
    supervised: SupervisedMethod | None = None


class CreateOpenAIJobRequest(WireModel):
    model: str
    training_file: str
    hyperparameters: OpenAIHyperparameters | None = None
    suffix: str | None = None
    validation_file: str | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    method: Method | None = None
    metadata: dict[str, str] | None = None

    @model_validator(mode="after")
    def _one_place_for_hyperparameters(self) -> CreateOpenAIJobRequest:
        if self.hyperparameters and self.method and self.method.supervised and self.method.supervised.hyperparameters:
            raise ValueError("give hyperparameters once: at the top level or in method.supervised, not both")
        return self

    def chosen_hyperparameters(self) -> OpenAIHyperparameters:
        inner = self.method.supervised.hyperparameters if self.method and self.method.supervised else None
        return self.hyperparameters or inner or OpenAIHyperparameters()


class JobError(WireModel):
    code: str
    message: str
    param: str | None = None


class OpenAIJobHyperparameters(WireModel):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class OpenAIFineTuningJob(WireModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: OpenAIJobHyperparameters
    model: str
    organization_id: str = "local"
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
    trained_tokens: int | None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    method: dict
    user_provided_suffix: str | None = None

    @classmethod
    def of(cls, job: JobRecord, trained_tokens: int | None) -> OpenAIFineTuningJob:
        chosen = job.hyperparameters
        hyperparameters = OpenAIJobHyperparameters(
            n_epochs=chosen["epochs"],
            batch_size=chosen["batch_size"],
            learning_rate_multiplier=round(chosen["learning_rate"] / BASE_LEARNING_RATE, 6),
        )
        return cls(
            id=job.id,
            created_at=unix(job.created_at),
            error=JobError(code="job_failed", message=job.error) if job.status == "failed" and job.error else None,
            fine_tuned_model=job.fine_tuned_model,
            finished_at=unix(job.completed_at),
            hyperparameters=hyperparameters,
            model=job.base_model,
            seed=chosen["seed"],
            status=STATUSES[job.status],
            trained_tokens=trained_tokens if job.status == "completed" else None,
            training_file=job.dataset_id,
            validation_file=job.validation_dataset_id,
            method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters.model_dump()}},
            user_provided_suffix=job.suffix,
            result_files=[result_file_id(job.id)] if job.status == "completed" else [],
        )


class OpenAIJobList(WireModel):
    object: Literal["list"] = "list"
    data: list[OpenAIFineTuningJob]
    has_more: bool


class OpenAIJobEvent(WireModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict

    @classmethod
    def of(cls, event: EventRecord) -> OpenAIJobEvent:
        return cls(
            id=event.id,
            created_at=unix(event.created_at),
            level="warn" if event.level == "warning" else event.level,
            message=event.message,
            type=event.type,
            data=event.data,
        )


class OpenAICheckpoint(WireModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float]
    step_number: int

    @classmethod
    def of(cls, job: JobRecord, checkpoint: Checkpoint) -> OpenAICheckpoint:
        shown = FineTuningCheckpoint.of(job, checkpoint)
        return cls(
            id=shown.id,
            created_at=unix(checkpoint.created_at),
            fine_tuning_job_id=job.id,
            fine_tuned_model_checkpoint=shown.fine_tuned_model_checkpoint,
            metrics=checkpoint.metrics,
            step_number=checkpoint.step,
        )


class OpenAICheckpointList(WireModel):
    object: Literal["list"] = "list"
    data: list[OpenAICheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class OpenAIJobEventList(WireModel):
    object: Literal["list"] = "list"
    data: list[OpenAIJobEvent]
    has_more: bool
