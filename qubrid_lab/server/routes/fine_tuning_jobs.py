"""``/fine-tuning/jobs``: create, list, retrieve and cancel jobs, and read a job's events (extension)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from qubrid_lab.server.auth import key_of, owner_of, scope_of
from qubrid_lab.server.protocol.common import WireModel
from qubrid_lab.server.protocol.fine_tuning import (
    CreateFineTuningJobRequest,
    FineTuningCheckpoint,
    FineTuningCheckpointList,
    FineTuningJob,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
)

router = APIRouter(prefix="/fine-tuning/jobs", tags=["Fine-Tuning Jobs"])


def _polled(body: WireModel) -> Response:
    """``body`` as the JSON response of a route that clients poll while a job trains.

    A sync route that returns a model makes FastAPI check it again in a second hop to the thread pool; these
    routes build their model themselves, so they hand FastAPI the finished JSON.
    """
    return Response(body.model_dump_json(), media_type="application/json")


@router.post("", status_code=201)
def create_fine_tuning_job(body: CreateFineTuningJobRequest, request: Request) -> FineTuningJob:
    """Queue a job; every problem with the request is listed in one 400; 402 once the key's credit is spent."""
    request.app.state.meter.require_credit(key_of(request))
    job = request.app.state.job_manager.create(
        base_model=body.base_model,
        dataset_id=body.dataset_id,
        task_type=body.task_type,
        hyperparameters=body.hyperparameters,
        suffix=body.suffix,
        column_mapping=body.column_mapping,
        owner=owner_of(request),
        scope=scope_of(request),
        validation_dataset_id=body.validation_dataset_id,
    )
    return FineTuningJob.of(job)


@router.get("")
def list_fine_tuning_jobs(
    request: Request, limit: int = Query(20, ge=1, le=100), offset: int = Query(0, ge=0, le=2**31 - 1)
) -> FineTuningJobList:
    """Jobs newest first, a page at a time; ``total`` counts them all."""
    jobs, total = request.app.state.job_manager.jobs.page(limit, offset, scope_of(request))
    return FineTuningJobList(data=[FineTuningJob.of(job) for job in jobs], total=total)


@router.get("/{job_id}", response_model=FineTuningJob)
def get_fine_tuning_job(job_id: str, request: Request) -> Response:
    return _polled(FineTuningJob.of(request.app.state.job_manager.jobs.get(job_id, scope_of(request))))


@router.post("/{job_id}/cancel")
def cancel_fine_tuning_job(job_id: str, request: Request) -> FineTuningJob:
    """Cancel a queued or running job; 409 once it has finished."""
    return FineTuningJob.of(request.app.state.job_manager.cancel(job_id, scope_of(request)))


@router.post("/{job_id}/pause")
def pause_fine_tuning_job(job_id: str, request: Request) -> FineTuningJob:
    """Extension: pause a queued or running job (a running one saves a checkpoint first); 409 otherwise."""
    return FineTuningJob.of(request.app.state.job_manager.pause(job_id, scope_of(request)))


@router.post("/{job_id}/resume")
def resume_fine_tuning_job(job_id: str, request: Request) -> FineTuningJob:
    """Extension: queue a paused job again; it continues from its newest checkpoint. 409 unless paused."""
    return FineTuningJob.of(request.app.state.job_manager.resume(job_id, scope_of(request)))


@router.get("/{job_id}/checkpoints")
def list_fine_tuning_checkpoints(job_id: str, request: Request) -> FineTuningCheckpointList:
    """Extension: the checkpoints the job has saved, newest first; each is served as a model on first use."""
    job, checkpoints = request.app.state.job_manager.checkpoints(job_id, scope_of(request))
    return FineTuningCheckpointList(data=[FineTuningCheckpoint.of(job, checkpoint) for checkpoint in checkpoints])


@router.get("/{job_id}/events", response_model=FineTuningJobEventList)
def list_fine_tuning_events(
    job_id: str, request: Request, after: str | None = Query(None), limit: int = Query(100, ge=1, le=1000)
) -> Response:
    """Extension: the job's events oldest first; pass the last id seen as ``after`` to get only newer ones."""
    events, has_more = request.app.state.job_manager.jobs.events(job_id, after, limit, scope_of(request))
    page = FineTuningJobEventList(data=[FineTuningJobEvent.of(event) for event in events], has_more=has_more)
    return _polled(page)
