"""``/v1/files`` (OpenAI's Files API): the datasets of the fine-tuning API by another name, and each completed
job's result file.

A file uploaded here (``purpose: "fine-tune"``) is a dataset of ``/fine-tuning/datasets`` with the same id, and
every dataset is listed here. A completed job's ``result_files`` name its metrics CSV (``purpose:
"fine-tune-results"``), made from the job's events when it is read.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from qubrid_lab.errors import ConflictError, InvalidRequestError, NotFoundError
from qubrid_lab.server.auth import owner_of, scope_of
from qubrid_lab.server.protocol.openai_fine_tuning import (
    FileDeleted,
    FileList,
    FileObject,
    cursor_page,
    result_file,
    result_job_id,
)
from qubrid_lab.server.uploads import receive_upload
from qubrid_lab.storage.jobs import JobRecord

router = APIRouter(prefix="/files", tags=["Files (OpenAI)"])

UPLOAD_PATH = router.prefix  # streamed by the handler itself: the app's JSON body limit does not apply
PURPOSES = ("fine-tune", "fine-tune-results")
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "The training file: CSV, or JSONL in OpenAI's chat format.",
                        },
                        "purpose": {"type": "string", "enum": ["fine-tune"]},
                    },
                }
            }
        },
    }
}


@router.post("", openapi_extra=UPLOAD_BODY)
async def create_file(request: Request) -> FileObject:
    """Stream the file to disk (413 past ``max_dataset_bytes``), check it, and keep it as a dataset."""
    store = request.app.state.datasets
    upload = await receive_upload(
        request,
        store.incoming_file(),
        file_field="file",
        max_file_bytes=request.app.state.settings.max_dataset_bytes,
        limit_setting="QUBRID_LAB_MAX_DATASET_BYTES",
    )
    purpose = upload.fields.get("purpose", "").strip()
    if purpose != "fine-tune":
        upload.path.unlink(missing_ok=True)
        raise InvalidRequestError(
            f"purpose: this server keeps files for fine-tuning only; send purpose 'fine-tune' (got {purpose!r}).",
            param="purpose",
        )
    record = await run_in_threadpool(store.add, upload.path, upload.filename, None, owner_of(request))
    return FileObject.of(record)


def _result(request: Request, file_id: str) -> tuple[FileObject, str] | None:
    """A job's result file and its content, when ``file_id`` names one the key may see; None for other ids."""
    job_id = result_job_id(file_id)
    if job_id is None:
        return None
    job = request.app.state.job_manager.jobs.find(job_id, scope_of(request))
    if job is None or job.status != "completed":
        raise NotFoundError(f"No file '{file_id}'.", param="file_id")
    return _result_of(request, job)


def _result_of(request: Request, job: JobRecord) -> tuple[FileObject, str]:
    """A completed job's result file: the worker's CSV, or one made from the job's events when it left none."""
    manager = request.app.state.job_manager
    written = manager.files(job.id).metrics
    content = written.read_text() if written.is_file() else manager.jobs.metrics_csv(job.id)
    return result_file(job, content), content


def _results(request: Request) -> list[FileObject]:
    jobs = request.app.state.job_manager.jobs
    return [
        _result_of(request, job)[0] for job in jobs.page(10_000, 0, scope_of(request))[0] if job.status == "completed"
    ]


@router.get("")
def list_files(
    request: Request,
    purpose: str | None = Query(None),
    limit: int = Query(10000, ge=1, le=10000),
    after: str | None = Query(None),
    order: str = Query("desc", pattern="^(asc|desc)$"),
) -> FileList:
    """The key's files newest first (``order=asc``: oldest first), those after the file ``after``."""
    files = []
    if purpose in (None, "fine-tune"):
        files += [FileObject.of(record) for record in request.app.state.datasets.all(scope_of(request))]
    if purpose in (None, "fine-tune-results"):
        files += _results(request)
    files.sort(key=lambda file: file.created_at, reverse=order == "desc")
    return FileList(**cursor_page(files, after, limit, "no file"))


@router.get("/{file_id}")
def retrieve_file(file_id: str, request: Request) -> FileObject:
    result = _result(request, file_id)
    return result[0] if result else FileObject.of(request.app.state.datasets.get(file_id, scope_of(request)))


@router.delete("/{file_id}")
def delete_file(file_id: str, request: Request) -> FileDeleted:
    """Delete the file (the dataset); 409 while a queued or running job trains on it, or for a job's result
    file, which stays as long as its job."""
    if _result(request, file_id):
        raise ConflictError(f"'{file_id}' is a job's result file; it stays as long as its job.", param="file_id")
    request.app.state.datasets.delete(file_id, scope_of(request))
    return FileDeleted(id=file_id)


@router.get("/{file_id}/content", response_class=FileResponse)
def download_file(file_id: str, request: Request) -> Response:
    result = _result(request, file_id)
    if result:
        return Response(result[1], media_type="text/csv")
    record = request.app.state.datasets.get(file_id, scope_of(request))
    return FileResponse(record.path, filename=record.filename)
