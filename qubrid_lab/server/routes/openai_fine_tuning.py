"""``/v1/fine_tuning/jobs`` (OpenAI's fine-tuning API): the platform's jobs in OpenAI's shapes.

A job created here is a job of ``/fine-tuning/jobs`` too (and the other way round), trains through the same
queue, and its model is served at once on ``/v1`` under its ``fine_tuned_model`` id.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from qubrid_lab.data.columns import infer_task_type
from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.server.auth import key_of, owner_of, scope_of
from qubrid_lab.server.protocol.openai_fine_tuning import (
    CreateOpenAIJobRequest,
    OpenAICheckpoint,
    OpenAICheckpointList,
    OpenAIFineTuningJob,
    OpenAIJobEvent,
    OpenAIJobEventList,
    OpenAIJobList,
    cursor_page,
)
from qubrid_lab.storage.jobs import JobRecord

router = APIRouter(prefix="/fine_tuning/jobs", tags=["Fine-tuning (OpenAI)"])


def _shown(request: Request, job: JobRecord) -> OpenAIFineTuningJob:
    tokens = request.app.state.job_manager.jobs.trained_tokens(job.id) if job.status == "completed" else None
    return OpenAIFineTuningJob.of(job, tokens)


@router.post("")
def create_fine_tuning_job(body: CreateOpenAIJobRequest, request: Request) -> OpenAIFineTuningJob:
    """Queue a job on ``training_file``; "auto" hyperparameters are chosen from its size. Every problem with
    the request is listed in one 400; 402 once the key's credit is spent."""
    request.app.state.meter.require_credit(key_of(request))
    manager = request.app.state.job_manager
    dataset = manager.datasets.find(body.training_file, scope_of(request))
    if dataset is None:
        raise InvalidRequestError(
            f"training_file: no file '{body.training_file}'; upload one with POST /v1/files (purpose 'fine-tune').",
            param="training_file",
        )
    hyperparameters = body.chosen_hyperparameters().platform(dataset.row_count)
    if body.seed is not None:
        hyperparameters["seed"] = body.seed
    try:
        job = manager.create(
            base_model=body.model,
            dataset_id=dataset.id,
            task_type=infer_task_type(dataset.columns),
            hyperparameters=hyperparameters,
            suffix=body.suffix,
            owner=owner_of(request),
            scope=scope_of(request),
            validation_dataset_id=body.validation_file,
        )
    except InvalidRequestError as exc:
        raise _in_openai_names(exc) from None
    return _shown(request, job)


# the job manager's field names where OpenAI's request names the same thing differently
OPENAI_NAMES = {
    "base_model": "model",
    "dataset_id": "training_file",
    "validation_dataset_id": "validation_file",
    "hyperparameters.epochs": "hyperparameters.n_epochs",
}


def _in_openai_names(error: InvalidRequestError) -> InvalidRequestError:
    message = error.message.replace("POST /fine-tuning/datasets", "POST /v1/files")
    for platform, openai in OPENAI_NAMES.items():
        message = message.replace(f"{platform}:", f"{openai}:")
    return InvalidRequestError(message, param=OPENAI_NAMES.get(error.param, error.param))


@router.get("")
def list_fine_tuning_jobs(
    request: Request, after: str | None = Query(None), limit: int = Query(20, ge=1, le=100)
) -> OpenAIJobList:
    """Jobs newest first, those older than the job ``after`` when given."""
    jobs, has_more = request.app.state.job_manager.jobs.page_after(after, limit, scope_of(request))
    return OpenAIJobList(data=[_shown(request, job) for job in jobs], has_more=has_more)


@router.get("/{fine_tuning_job_id}")
def retrieve_fine_tuning_job(fine_tuning_job_id: str, request: Request) -> OpenAIFineTuningJob:
    return _shown(request, request.app.state.job_manager.jobs.get(fine_tuning_job_id, scope_of(request)))


@router.post("/{fine_tuning_job_id}/cancel")
def cancel_fine_tuning_job(fine_tuning_job_id: str, request: Request) -> OpenAIFineTuningJob:
    """Cancel a queued or running job; 409 once it has finished."""
    return _shown(request, request.app.state.job_manager.cancel(fine_tuning_job_id, scope_of(request)))


@router.post("/{fine_tuning_job_id}/pause")
def pause_fine_tuning_job(fine_tuning_job_id: str, request: Request) -> OpenAIFineTuningJob:
    """Pause a queued or running job (a running one saves a checkpoint first); 409 otherwise."""
    return _shown(request, request.app.state.job_manager.pause(fine_tuning_job_id, scope_of(request)))


@router.post("/{fine_tuning_job_id}/resume")
def resume_fine_tuning_job(fine_tuning_job_id: str, request: Request) -> OpenAIFineTuningJob:
    """Queue a paused job again; it continues from its newest checkpoint. 409 unless paused."""
    return _shown(request, request.app.state.job_manager.resume(fine_tuning_job_id, scope_of(request)))


@router.get("/{fine_tuning_job_id}/checkpoints")
def list_fine_tuning_job_checkpoints(
    fine_tuning_job_id: str, request: Request, after: str | None = Query(None), limit: int = Query(10, ge=1, le=100)
) -> OpenAICheckpointList:
    """The job's saved checkpoints newest first, those after the checkpoint ``after`` when given."""
    job, checkpoints = request.app.state.job_manager.checkpoints(fine_tuning_job_id, scope_of(request))
    shown = [OpenAICheckpoint.of(job, checkpoint) for checkpoint in checkpoints]
    return OpenAICheckpointList(**cursor_page(shown, after, limit, f"job {job.id} has no checkpoint"))


@router.get("/{fine_tuning_job_id}/events")
def list_fine_tuning_events(
    fine_tuning_job_id: str, request: Request, after: str | None = Query(None), limit: int = Query(20, ge=1, le=1000)
) -> OpenAIJobEventList:
    """The job's events newest first (OpenAI's order), those before the event ``after`` when given."""
    events, has_more = request.app.state.job_manager.jobs.events(
        fine_tuning_job_id, after, limit, scope_of(request), newest_first=True
    )
    return OpenAIJobEventList(data=[OpenAIJobEvent.of(event) for event in events], has_more=has_more)
