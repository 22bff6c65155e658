"""``/fine-tuning/datasets``: upload, list, retrieve and delete CSV training datasets."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.server.auth import owner_of, scope_of
from qubrid_lab.server.protocol.fine_tuning import Dataset, DatasetList
from qubrid_lab.server.uploads import receive_upload

router = APIRouter(prefix="/fine-tuning/datasets", tags=["Datasets"])

MAX_NAME_LENGTH = 256
UPLOAD_PATH = router.prefix  # streamed by the handler itself: the app's JSON body limit does not apply
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "The CSV file."},
                        "name": {
                            "type": "string",
                            "maxLength": MAX_NAME_LENGTH,
                            "description": "Display name (default: the file's name).",
                        },
                    },
                }
            }
        },
    }
}


@router.post("", status_code=201, openapi_extra=UPLOAD_BODY)
async def upload_dataset(request: Request) -> Dataset:
    """Stream the CSV to disk (413 past ``max_dataset_bytes``), check it, and keep it as a dataset."""
    store = request.app.state.datasets
    upload = await receive_upload(
        request,
        store.incoming_file(),
        file_field="file",
        max_file_bytes=request.app.state.settings.max_dataset_bytes,
        limit_setting="QUBRID_LAB_MAX_DATASET_BYTES",
    )
    name = upload.fields.get("name", "").strip() or None
    if name is not None and len(name) > MAX_NAME_LENGTH:
        upload.path.unlink(missing_ok=True)
        raise InvalidRequestError(f"name: at most {MAX_NAME_LENGTH} characters (got {len(name)}).", param="name")
    record = await run_in_threadpool(store.add, upload.path, upload.filename, name, owner_of(request))
    return Dataset.of(record)


@router.get("")
def list_datasets(request: Request) -> DatasetList:
    return DatasetList(data=[Dataset.of(record) for record in request.app.state.datasets.all(scope_of(request))])


@router.get("/{dataset_id}")
def get_dataset(dataset_id: str, request: Request) -> Dataset:
    return Dataset.of(request.app.state.datasets.get(dataset_id, scope_of(request)))


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: str, request: Request) -> Response:
    """Delete the dataset and its file; 409 while a queued or running job uses it."""
    request.app.state.datasets.delete(dataset_id, scope_of(request))
    return Response(status_code=204)
