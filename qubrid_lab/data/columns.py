"""Which columns of a dataset feed a fine-tuning task: a question/answer pair (qa), a text column (not_qa), or
the conversations of a JSONL chat dataset (chat, its one ``messages`` column).

Columns are found by the common names below, compared ignoring case and surrounding spaces. For each role
the first name in its list that the dataset has wins, and a column serves one role only; so
``instruction,input,output`` (the Alpaca layout) reads as question = instruction, context = input,
answer = output, while ``input,output`` reads as question = input, answer = output. The ``column_mapping``
extension of a job names the columns of any role outright and overrides the lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qubrid_lab.errors import InvalidRequestError

TASK_TYPES = ("qa", "not_qa", "chat")

# role -> accepted column names, in order of preference; a role is required unless listed in OPTIONAL_ROLES.
ACCEPTED_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "qa": {
        "question": ("question", "prompt", "instruction", "query", "input"),
        "answer": ("answer", "completion", "response", "output"),
        "context": ("context", "input"),
    },
    "not_qa": {
        "text": ("text", "content", "document"),
    },
    "chat": {
        "messages": ("messages",),
    },
}
OPTIONAL_ROLES = frozenset({"context"})
MAPPING_EXAMPLES = {
    "qa": '{"question": "my_question_column", "answer": "my_answer_column"}',
    "not_qa": '{"text": "my_text_column"}',
    "chat": '{"messages": "messages"} (chat datasets are JSONL files, one {"messages": [...]} per line)',
}


@dataclass(frozen=True)
class ColumnPlan:
    """The dataset columns a job trains on, by role; names are spelled as in the dataset's header."""

    task_type: Literal["qa", "not_qa", "chat"]
    question: str | None = None  # qa: the prompt column (question / prompt / instruction)
    answer: str | None = None  # qa: the target column (answer / completion / output / response)
    context: str | None = None  # qa, optional: extra input appended to the question (input / context)
    text: str | None = None  # not_qa: the text column
    messages: str | None = None  # chat: the conversations (a JSONL dataset's one column)


class ColumnError(InvalidRequestError):
    """The dataset's columns do not fit the task type (or the column_mapping is wrong); a 400."""


def plan_columns(columns: list[str], task_type: str, column_mapping: dict[str, str] | None = None) -> ColumnPlan:
    """Choose the columns a ``task_type`` job trains on from a dataset's ``columns``.

    ``column_mapping`` maps roles (qa: question, answer, context; not_qa: text) to column names and wins
    over the accepted names. Raises ``ColumnError`` listing every problem at once, the columns found, the
    names accepted and how to use ``column_mapping``.
    """
    if task_type not in TASK_TYPES:
        raise ColumnError(f"task_type must be one of {', '.join(TASK_TYPES)}; got {task_type!r}.", param="task_type")
    roles = ACCEPTED_NAMES[task_type]
    by_key: dict[str, str] = {}
    for column in columns:
        by_key.setdefault(_key(column), column)

    chosen, problems = _mapped_columns(column_mapping or {}, roles, by_key, task_type)
    mapping_failed = bool(problems)
    for role, names in roles.items():
        if role in chosen or role in (column_mapping or {}):
            continue
        used = set(chosen.values())
        found = next((by_key[name] for name in names if name in by_key and by_key[name] not in used), None)
        if found is not None:
            chosen[role] = found
        elif role not in OPTIONAL_ROLES:
            problems.append(f"it has no {role} column")
    if problems:
        raise ColumnError(
            _explain(task_type, problems, columns), param="column_mapping" if mapping_failed else "task_type"
        )
    return ColumnPlan(task_type=task_type, **chosen)


def _mapped_columns(
    mapping: dict[str, str], roles: dict[str, tuple[str, ...]], by_key: dict[str, str], task_type: str
) -> tuple[dict[str, str], list[str]]:
    chosen: dict[str, str] = {}
    problems = []
    for role, column in mapping.items():
        if role not in roles:
            problems.append(
                f"column_mapping key {role!r} is not a role of task_type {task_type!r} (use {', '.join(roles)})"
            )
        elif not isinstance(column, str) or _key(column) not in by_key:
            problems.append(f"column_mapping maps {role!r} to {column!r}, which is not a column of the dataset")
        elif by_key[_key(column)] in chosen.values():
            other = next(name for name, value in chosen.items() if value == by_key[_key(column)])
            problems.append(
                f"column_mapping maps both {other!r} and {role!r} to column {column!r}; each role needs its own column"
            )
        else:
            chosen[role] = by_key[_key(column)]
    return chosen, problems


def _explain(task_type: str, problems: list[str], columns: list[str]) -> str:
    roles = ACCEPTED_NAMES[task_type]
    accepted = "; ".join(
        f"{role}{' (optional)' if role in OPTIONAL_ROLES else ''}: {', '.join(names)}" for role, names in roles.items()
    )
    needs = " and ".join(f"a {role} column" for role in roles if role not in OPTIONAL_ROLES)
    found = ", ".join(f"'{column}'" for column in columns) or "none"
    return (
        f"The dataset does not fit task_type {task_type!r}, which needs {needs}: {'; '.join(problems)}. "
        f"Columns found: {found}. Accepted names (ignoring case): {accepted}. "
        "To use other columns, name them with the column_mapping extension, "
        f"e.g. {MAPPING_EXAMPLES[task_type]}."
    )


def _key(name: str) -> str:
    return name.strip().casefold()


def infer_task_type(columns: list[str]) -> str:
    """The task a dataset with ``columns`` trains without being told (OpenAI's API has no task type): ``chat``
    for a JSONL chat dataset, ``qa`` when it has question and answer columns, else ``not_qa`` (its text column
    is checked when the job is)."""
    for task_type in ("chat", "qa"):
        try:
            plan_columns(columns, task_type)
        except ColumnError:
            continue
        return task_type
    return "not_qa"
