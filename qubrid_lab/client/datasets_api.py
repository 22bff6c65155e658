"""``client.datasets``: training datasets (``/v1/fine-tuning/datasets``) from files, DataFrames or ``datasets``.

pandas and ``datasets`` are never imported here: a value can only be a DataFrame or a ``Dataset`` when the
caller has imported its library already, so the check looks in ``sys.modules``.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qubrid_lab.client.api_client import Client

DATASETS = "/v1/fine-tuning/datasets"
MEDIA_TYPES = {".csv": "text/csv", ".jsonl": "application/jsonl"}
CHAT_COLUMN = "messages"  # a table with this column holds OpenAI chat conversations: it is sent as JSONL


def _instance_of(value: Any, module: str, name: str) -> bool:
    kind = getattr(sys.modules.get(module), name, None)
    return kind is not None and isinstance(value, kind)


def _as_file(data: Any, filename: str | None) -> tuple[str, bytes]:
    """``data`` (bytes, a DataFrame or a ``datasets.Dataset``) as a file name and its content.

    A table with a ``messages`` column becomes JSONL (one conversation per line), any other a CSV.
    """
    if isinstance(data, (bytes, bytearray)):
        if not filename:
            raise ValueError("uploading bytes needs filename= (ending in .csv or .jsonl), which says their format")
        return filename, bytes(data)
    if _instance_of(data, "pandas", "DataFrame"):
        chat = CHAT_COLUMN in data.columns
        content = (
            data.to_json(orient="records", lines=True, force_ascii=False) if chat else data.to_csv(index=False)
        ).encode()
        return filename or ("dataframe.jsonl" if chat else "dataframe.csv"), content
    if _instance_of(data, "datasets", "Dataset"):
        chat = CHAT_COLUMN in data.column_names
        buffer = io.BytesIO()
        if chat:
            data.to_json(buffer, lines=True, force_ascii=False)
        else:
            data.to_csv(buffer, index=False)
        return filename or ("dataset.jsonl" if chat else "dataset.csv"), buffer.getvalue()
    raise TypeError(f"expected a file path, bytes, a pandas DataFrame or a datasets.Dataset, got {type(data)}")


class Datasets:
    """Upload, list, read and delete training datasets. Datasets are the server's JSON objects, as dicts."""

    def __init__(self, client: Client):
        self._client = client

    def upload(self, data: str | Path | bytes | Any, name: str | None = None, *, filename: str | None = None) -> dict:
        """Upload ``data`` as a dataset and return it (id, name, row count, columns).

        ``data`` is a path to a CSV or JSONL file (the server accepts both; its suffix says which), a pandas
        DataFrame or a ``datasets.Dataset`` (sent as CSV, or as JSONL when it has a ``messages`` column), or the
        file's bytes with ``filename``. ``name`` is the display name (default: the file name). The server checks
        the file: one it cannot train on is an ``InvalidRequestError`` naming the line at fault.
        """
        if isinstance(data, (str, Path)):
            path = Path(data).expanduser()
            with path.open("rb") as handle:
                return self._send(filename or path.name, handle, name)
        return self._send(*_as_file(data, filename), name)

    def list(self) -> list[dict]:
        return self._client.request("GET", DATASETS)["data"]

    def get(self, dataset_id: str) -> dict:
        return self._client.request("GET", f"{DATASETS}/{dataset_id}")

    def delete(self, dataset_id: str) -> None:
        """Delete the dataset and its file; ``ConflictError`` while a queued or running job uses it."""
        self._client.request("DELETE", f"{DATASETS}/{dataset_id}")

    def _send(self, filename: str, content: Any, name: str | None) -> dict:
        media_type = MEDIA_TYPES.get(Path(filename).suffix.lower(), "application/octet-stream")
        return self._client.request(
            "POST", DATASETS, data={"name": name} if name else None, files={"file": (filename, content, media_type)}
        )
