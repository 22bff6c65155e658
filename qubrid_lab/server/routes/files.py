"""``/v1/files`` (OpenAI's Files API, ``purpose: "fine-tune"``): the datasets of the fine-tuning API by another name.

A file uploaded here is a dataset of ``/fine-tuning/datasets`` with the same id, and every dataset is listed here.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.server.auth import owner_of, scope_of
from qubrid_lab.server.protocol.openai_fine_tuning import FileDeleted, FileList, FileObject
from qubrid_lab.server.uploads import receive_upload

router = APIRouter(prefix="/files", tags=["Files (OpenAI)"])

UPLOAD_PATH = router.prefix  # streamed by the handler itself: the app's JSON body limit does not apply
PURPOSES = ("fine-tune",)
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "The training file: CSV, or JSONL in OpenAI's chat format."},
                   "purpose": {"type": "string", "enum": list(PURPOSES)}}}}}}}


@router.post("", openapi_extra=UPLOAD_BODY)
async def create_file(request: Request) -> FileObject:
    """Stream the file to disk (413 past ``max_dataset_bytes``), check it, and keep it as a dataset."""
    store = request.app.state.datasets
    upload = await receive_upload(request, store.incoming_file(), file_field="file",
                                  max_file_bytes=request.app.state.settings.max_dataset_bytes,
                                  limit_setting="QUBRID_LAB_MAX_DATASET_BYTES")
    purpose = upload.fields.get("purpose", "").strip()
    if purpose not in PURPOSES:
        upload.path.unlink(missing_ok=True)
        raise InvalidRequestError(f"purpose: this server keeps files for fine-tuning only; send purpose "
                                  f"'fine-tune' (got {purpose!r}).", param="purpose")
    record = await run_in_threadpool(store.add, upload.path, upload.filename, None, owner_of(request))
    return FileObject.of(record)


@router.get("")
def list_files(request: Request, purpose: str | None = Query(None), limit: int = Query(10000, ge=1, le=10000),
               after: str | None = Query(None), order: str = Query("desc", pattern="^(asc|desc)$")) -> FileList:
    """The key's files, newest first (``order=asc``: oldest first), those after the file ``after``."""
    records = request.app.state.datasets.all(scope_of(request))
    if purpose not in (None, *PURPOSES):
        records = []
    if order == "asc":
        records.reverse()
    if after is not None:
        ids = [record.id for record in records]
        if after not in ids:
            raise InvalidRequestError(f"after: no file '{after}'.", param="after")
        records = records[ids.index(after) + 1:]
    page = [FileObject.of(record) for record in records[:limit]]
    return FileList(data=page, has_more=len(records) > limit, first_id=page[0].id if page else None,
                    last_id=page[-1].id if page else None)


@router.get("/{file_id}")
def retrieve_file(file_id: str, request: Request) -> FileObject:
    return FileObject.of(request.app.state.datasets.get(file_id, scope_of(request)))


@router.delete("/{file_id}")
def delete_file(file_id: str, request: Request) -> FileDeleted:
    """Delete the file (the dataset); 409 while a queued or running job trains on it."""
    request.app.state.datasets.delete(file_id, scope_of(request))
    return FileDeleted(id=file_id)


@router.get("/{file_id}/content", response_class=FileResponse)
def download_file(file_id: str, request: Request) -> FileResponse:
    record = request.app.state.datasets.get(file_id, scope_of(request))
    return FileResponse(record.path, filename=record.filename)
