"""A dataset file of either format, told apart by its name: CSV (named columns) or JSONL (OpenAI's chat format)."""

from __future__ import annotations

from pathlib import Path

from qubrid_lab.data.csv_ingest import CsvSummary, DatasetError, inspect_csv, read_rows
from qubrid_lab.data.jsonl_ingest import inspect_jsonl, read_conversations

FORMATS = {".csv": (inspect_csv, read_rows), ".jsonl": (inspect_jsonl, read_conversations)}


def dataset_suffix(filename: str | None) -> str:
    """The format suffix of an upload's name; a name of another kind is a ``DatasetError`` saying what is accepted."""
    suffix = Path((filename or "").strip().lower()).suffix
    if suffix not in FORMATS:
        raise DatasetError(
            f"Only CSV and JSONL files are accepted, and '{filename}' ends in neither .csv nor .jsonl. Export the "
            'data as CSV (comma-separated, UTF-8), or as JSONL with one {"messages": [...]} conversation per line.'
        )
    return suffix


def inspect_dataset(path: Path, filename: str) -> CsvSummary:
    """Validate an upload in the format its ``filename`` names and summarise it."""
    return FORMATS[dataset_suffix(filename)][0](path, filename)


def read_dataset(path: Path) -> list[dict]:
    """The rows of a stored dataset (its file keeps the upload's suffix): CSV rows, or JSONL conversations."""
    return FORMATS[Path(path).suffix.lower()][1](path)
