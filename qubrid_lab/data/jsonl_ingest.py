"""JSONL datasets in OpenAI's chat fine-tuning format: one conversation per line, ``{"messages": [...]}``.

Each message has a ``role`` (``system``, ``user`` or ``assistant``) and text ``content`` (a string, or a list of
``{"type": "text", "text": ...}`` parts); an assistant message may carry ``"weight": 0`` to take no loss, as in
OpenAI's format. Every conversation needs at least one assistant message with text and a weight of 1. Blank
lines are ignored. Every rejection is a ``DatasetError`` (400) naming the line and what to fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from qubrid_lab.data.csv_ingest import CsvSummary, DatasetError

ROLES = ("system", "user", "assistant")
MESSAGES_COLUMN = "messages"  # the one "column" a chat dataset has
FORMAT_HINT = (
    'Each line must be one JSON object like {"messages": [{"role": "user", "content": "..."}, '
    '{"role": "assistant", "content": "..."}]}.'
)


def inspect_jsonl(path: Path, filename: str) -> CsvSummary:
    """Validate a JSONL chat dataset and summarise it (its one column is ``messages``)."""
    conversations = read_conversations(path)
    return CsvSummary(row_count=len(conversations), columns=[MESSAGES_COLUMN], size_bytes=Path(path).stat().st_size)


def read_conversations(path: Path) -> list[dict[str, list[dict]]]:
    """Every conversation as ``{"messages": [{"role", "content", "weight"}...]}`` with text content, in file order."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DatasetError(f"Line {line} is not UTF-8 text. Save the file as UTF-8 and upload it again.") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            rows.append({MESSAGES_COLUMN: _messages(line, number)})
    if not rows:
        raise DatasetError(f"The file holds no conversations. {FORMAT_HINT}")
    return rows


def _messages(line: str, number: int) -> list[dict]:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"Line {number} is not valid JSON ({error.msg} at column {error.colno}). {FORMAT_HINT}"
        ) from None
    if not isinstance(item, dict) or not isinstance(item.get(MESSAGES_COLUMN), list) or not item[MESSAGES_COLUMN]:
        raise DatasetError(f"Line {number} has no 'messages' list. {FORMAT_HINT}")
    if "tools" in item or "functions" in item:
        raise DatasetError(
            f"Line {number}: tool and function definitions are not supported for fine-tuning here "
            "yet; keep plain conversations."
        )
    messages = [_message(message, number, index) for index, message in enumerate(item[MESSAGES_COLUMN])]
    if not any(m["role"] == "assistant" and m["weight"] and m["content"].strip() for m in messages):
        raise DatasetError(f"Line {number} has no assistant message to learn from (one with text and weight 1).")
    return messages


def _message(message: object, number: int, index: int) -> dict:
    where = f"Line {number}, messages[{index}]"
    if not isinstance(message, dict):
        raise DatasetError(f"{where} is not an object with 'role' and 'content'.")
    role = message.get("role")
    if role not in ROLES:
        extra = " (tool calls are not supported for fine-tuning here yet)" if role in ("tool", "function") else ""
        raise DatasetError(f"{where}: role must be one of {', '.join(ROLES)}; got {role!r}{extra}.")
    if message.get("tool_calls") or message.get("function_call"):
        raise DatasetError(f"{where}: tool calls are not supported for fine-tuning here yet.")
    weight = message.get("weight", 1)
    if weight not in (0, 1) or isinstance(weight, bool) or (weight == 0 and role != "assistant"):
        raise DatasetError(f"{where}: weight must be 0 or 1, on assistant messages only; got {weight!r}.")
    return {"role": role, "content": _text(message.get("content"), where), "weight": int(weight)}


def _text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(part["text"] for part in content)
    raise DatasetError(f"{where}: content must be text (a string, or a list of text parts).")
