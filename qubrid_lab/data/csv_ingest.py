"""CSV datasets: validate an upload once, read its rows when a job trains on it.

A dataset is a UTF-8 CSV file (a byte-order mark is allowed) whose first line is a header of distinct,
non-blank column names, followed by at least one data row with one field per column. Fields follow RFC 4180:
a quoted field may hold commas, line breaks and quotes written twice (""), so one row may span several lines.
Blank lines are ignored. Every rejection is a ``DatasetError`` (400) saying what is wrong, on which line,
and what to do about it.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from qubrid_lab.errors import InvalidRequestError

UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# The csv module refuses fields over 128 KiB by default; a long document is a legitimate not_qa row, and the
# server's upload size limit already bounds the file.
FIELD_SIZE_LIMIT = 2**31 - 1
SAVE_AS_UTF8 = 'Save the file as UTF-8 (in Excel: "CSV UTF-8 (Comma delimited)") and upload it again.'


class DatasetError(InvalidRequestError):
    """A file that is not a usable CSV dataset; the message names the problem, the line and the fix."""

    def __init__(self, message: str, *, param: str | None = "file"):
        super().__init__(message, param=param)


@dataclass(frozen=True)
class CsvSummary:
    """What an upload holds: data rows (not physical lines), column names in file order, bytes on disk."""

    row_count: int
    columns: list[str]
    size_bytes: int


@dataclass(frozen=True)
class _Table:
    columns: list[str]
    rows: list[list[str]]


def inspect_csv(path: Path, filename: str) -> CsvSummary:
    """Validate an uploaded file as a CSV dataset and summarise it; raises ``DatasetError`` on any problem.

    ``filename`` is the name the client gave the upload; only names ending in ``.csv`` are accepted.
    """
    if not (filename or "").strip().lower().endswith(".csv"):
        raise DatasetError(
            f"Only CSV files are accepted, and '{filename}' does not end in .csv. "
            "Export the data as CSV (comma-separated, UTF-8) and upload that file."
        )
    table = _parse(Path(path))
    return CsvSummary(row_count=len(table.rows), columns=table.columns, size_bytes=Path(path).stat().st_size)


def read_rows(path: Path) -> list[dict[str, str]]:
    """Every data row of a CSV dataset as ``{column: text}`` ("" for an empty field), in file order.

    The file is validated as ``inspect_csv`` does, so a file changed on disk fails with the same messages.
    Line breaks inside fields are normalised to "\\n".
    """
    table = _parse(Path(path))
    return [
        {column: value.replace("\r\n", "\n").replace("\r", "\n") for column, value in zip(table.columns, row)}
        for row in table.rows
    ]


def _parse(path: Path) -> _Table:
    text = _decode(path.read_bytes())
    if not text.strip():
        raise DatasetError(
            "The file is empty. Upload a CSV file with a header line of column names and at least one data row."
        )
    if "\x00" in text:
        line = _line_of(text, text.index("\x00"))
        raise DatasetError(
            f"Line {line} contains a NUL character, so this is not a text CSV file "
            "(it may be UTF-16 or binary). " + SAVE_AS_UTF8
        )
    records = _records(text)
    header_line, header = next(records)
    columns = _check_header(header_line, header)
    rows = []
    for line, record in records:
        if len(record) <= 1 and not "".join(record).strip():
            continue
        if len(record) != len(columns):
            raise DatasetError(
                f"The row on line {line} has {_count(len(record), 'field')} but the header "
                f"(line {header_line}) has {_count(len(columns), 'column')} ({', '.join(columns)}). "
                "Give every row one field per column, and put quotes around a field that contains "
                'a comma or a line break ("like, this").'
            )
        rows.append(record)
    if not rows:
        raise DatasetError(
            f"The file has a header ({', '.join(columns)}) but no data rows. Add at least one row below the header."
        )
    return _Table(columns=columns, rows=rows)


def _decode(data: bytes) -> str:
    if data.startswith(UTF16_BOMS):
        raise DatasetError(
            "The file is encoded as UTF-16, not UTF-8 (line 1 starts with a UTF-16 mark). " + SAVE_AS_UTF8
        )
    skip = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = skip + error.start
        valid = data[skip:offset].decode("utf-8")
        raise DatasetError(
            f"The file is not valid UTF-8: line {_line_of(valid, len(valid))} has the byte "
            f"0x{data[offset]:02x} (byte {offset + 1} of the file), which UTF-8 does not allow there; "
            "the file is probably in another encoding such as Windows-1252. " + SAVE_AS_UTF8
        ) from None


def _records(text: str):
    """Yield ``(line where the record starts, fields)`` per CSV record; blank lines come out as ``[]``."""
    csv.field_size_limit(max(csv.field_size_limit(), FIELD_SIZE_LIMIT))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise _quoting_error(error, start, reader.line_num) from None
        yield start, record
        start = reader.line_num + 1


def _quoting_error(error: csv.Error, start: int, line: int) -> DatasetError:
    reason = str(error)
    if "unexpected end of data" in reason:
        return DatasetError(
            f"The row starting on line {start} opens a quoted field that is never closed, "
            "so the rest of the file was read into it. Close the quote, "
            'and write a quote inside a quoted field as two quotes ("").'
        )
    if "expected after" in reason:
        return DatasetError(
            f"Line {line} has text right after the closing quote of a quoted field. Write a quote inside a "
            'quoted field as two quotes (""), and put a comma after the closing quote.'
        )
    return DatasetError(f"Line {line} cannot be parsed as CSV ({reason}). Check its quotes and commas.")


def _check_header(line: int, header: list[str]) -> list[str]:
    columns = [name.strip() for name in header]
    if not any(columns):
        state = "is blank" if not header else "has no column names"
        raise DatasetError(
            f"Line {line} {state}, but the first line of a CSV dataset must be the header "
            "with the column names (for example question,answer). "
            "Add the header line (or delete the blank lines above it)."
        )
    if all(_is_number(name) for name in columns):
        raise DatasetError(
            f"The first line (line {line}) holds only numbers ({', '.join(columns)}), "
            "so the file has no header. Add a first line with the column names, "
            "for example question,answer."
        )
    if len(columns) == 1:
        separator = next((name for sep, name in ((";", "';'"), ("\t", "tabs")) if sep in columns[0]), None)
        if separator:
            raise DatasetError(
                f"The header (line {line}) is a single column '{columns[0]}': the file seems to "
                f"separate fields with {separator}. Save it with commas between fields "
                "(CSV, comma delimited) and upload it again."
            )
    problems = []
    blank = [str(index) for index, name in enumerate(columns, 1) if not name]
    if len(blank) == 1:
        problems.append(f"column {blank[0]} has no name")
    elif blank:
        problems.append(f"columns {', '.join(blank)} have no name")
    seen: dict[str, int] = {}
    for index, name in enumerate(columns, 1):
        first = seen.setdefault(name.casefold(), index)
        if name and first != index:
            problems.append(
                f"columns {first} ('{columns[first - 1]}') and {index} ('{name}') have the same name "
                "(names are compared ignoring case)"
            )
    if problems:
        raise DatasetError(
            f"In the header (line {line}), {'; '.join(problems)}. "
            "Give every column a distinct, non-blank name (and delete empty columns)."
        )
    return columns


def _line_of(text: str, position: int) -> int:
    """1-based line of ``text[position]``, counting \\n, \\r\\n and \\r as the csv reader does."""
    before = text[:position]
    return before.count("\n") + before.count("\r") - before.count("\r\n") + 1


def _is_number(name: str) -> bool:
    return name.lstrip("+-").replace(".", "", 1).isdigit()


def _count(number: int, noun: str) -> str:
    return f"{number} {noun if number == 1 else noun + 's'}"
