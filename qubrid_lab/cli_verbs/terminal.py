"""What the API verbs print and the arguments they read: JSON for scripts, aligned tables, durations, CSV paths."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def print_json(value) -> None:
    """``value`` (the API's own JSON object, or a list of them) on stdout, for scripts to parse."""
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def print_result(value, as_json: bool, render: Callable[..., str]) -> None:
    """``value`` as the API's JSON for scripts (``--json``), else as ``render(value)`` for people."""
    if as_json:
        print_json(value)
    else:
        print(render(value))


def table(headers: Sequence[str] | None, rows: Sequence[Sequence[object]]) -> str:
    """Rows (under their ``headers``, if any) in columns padded to the widest cell; numbers are aligned right."""
    body = [["-" if cell is None else str(cell) for cell in row] for row in rows]
    cells = ([list(headers)] if headers else []) + body
    if not cells:
        return ""
    columns = range(len(cells[0]))
    widths = [max(len(row[index]) for row in cells) for index in columns]
    numeric = [bool(rows) and all(_is_number(row[index]) for row in rows) for index in columns]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if right else cell.ljust(width) for cell, width, right in zip(row, widths, numeric)
        ).rstrip()
        for row in cells
    )


def _is_number(cell: object) -> bool:
    return isinstance(cell, (int, float)) and not isinstance(cell, bool)


def duration(seconds: float | None) -> str:
    """``1:02:03`` or ``2:03`` for a number of seconds; ``?`` when it is not known."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def dataset_file(text: str) -> Path:
    """An argparse type: a CSV or JSONL file that exists (a clear usage error otherwise)."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}" if not path.exists() else f"not a file: {text}")
    return path


def column_pair(text: str) -> tuple[str, str]:
    """An argparse type: ``ROLE=COLUMN`` (role: question, answer, context or text)."""
    role, equals, column = text.partition("=")
    if not equals or not role.strip() or not column.strip():
        raise argparse.ArgumentTypeError(f"expected ROLE=COLUMN, e.g. question=prompt (got {text!r})")
    return role.strip(), column.strip()


def add_column_flag(parser: argparse.ArgumentParser) -> None:
    """``--column ROLE=COLUMN`` (repeatable): the column_mapping of a profile or a job."""
    parser.add_argument(
        "--column",
        dest="columns",
        type=column_pair,
        action="append",
        metavar="ROLE=COLUMN",
        help="the dataset's column for a role (question, answer, context, text), when its name is "
        "not one of the accepted ones (repeatable)",
    )


def column_mapping(args: argparse.Namespace) -> dict[str, str] | None:
    return dict(args.columns) if args.columns else None
