"""The rules a fine-tuning job request must meet on its own: no model, no stored file, no torch.

The server (``job_requests.check_job_request``, which adds what only it knows: its catalogue, the dataset's
rows, the packages installed) and the notebook's ``HyperparameterForm`` both call ``check_request_fields``,
so a problem reads the same in the form as in the server's 400.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydantic import ValidationError

from qubrid_lab.data.columns import TASK_TYPES, ColumnPlan, plan_columns
from qubrid_lab.errors import InvalidRequestError, validation_problems
from qubrid_lab.training.hyperparameters import Hyperparameters, validation_needs

SUFFIX_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SUFFIX_RULE = "use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"


@dataclass
class FieldCheck:
    """What the request-only rules made of a job request."""

    hyperparameters: Hyperparameters | None  # resolved with every default; None when they do not validate
    plan: ColumnPlan | None  # the dataset's column roles; None when not checked or they do not fit
    problems: list[tuple[str, str]] = field(default_factory=list)  # (field, problem), in the server's order


def missing_dataset_problem(dataset_id: str) -> tuple[str, str]:
    """The problem of a request naming a dataset the server does not have."""
    return "dataset_id", f"no dataset '{dataset_id}'; upload one with POST /fine-tuning/datasets"


def check_request_fields(
    *,
    task_type: str,
    hyperparameters: dict | None,
    suffix: str | None,
    column_mapping: dict[str, str] | None,
    dataset_id: str,
    dataset_columns: list[str] | None = None,
    dataset_format: str | None = None,
    validation_dataset: bool = False,
) -> FieldCheck:
    """Check a request's task type against its dataset's columns, its hyperparameters, and its suffix.

    ``dataset_columns`` (None: not known, not checked) and ``dataset_format`` ('csv' or 'jsonl'; None: not
    known) describe the dataset ``dataset_id``; ``validation_dataset`` says whether the request names one.
    Field names are the request's: ``hyperparameters.learning_rate``, ``suffix``...
    """
    problems: list[tuple[str, str]] = []
    plan = resolved = None
    if task_type not in TASK_TYPES:
        problems.append(("task_type", f"must be 'qa', 'not_qa' or 'chat' (got {task_type!r})"))
    elif dataset_format is not None and (task_type == "chat") != (dataset_format == "jsonl"):
        problems.append(
            (
                "task_type",
                (
                    "chat jobs train on JSONL conversations and qa or not_qa jobs on CSV "
                    f"columns; dataset '{dataset_id}' is {dataset_format.upper()}"
                ),
            )
        )
    elif dataset_columns is not None:
        try:
            plan = plan_columns(dataset_columns, task_type, column_mapping)
        except InvalidRequestError as exc:
            problems.append((exc.param or "task_type", exc.message.rstrip(".")))
    try:
        resolved = Hyperparameters.model_validate(hyperparameters or {})
    except ValidationError as exc:
        located = [{**error, "loc": ("hyperparameters", *error["loc"])} for error in exc.errors()]
        problems += validation_problems(located)
    if resolved is not None:
        problems += validation_needs(resolved, validation_dataset)
    if suffix and not SUFFIX_PATTERN.fullmatch(suffix):
        problems.append(("suffix", f"{SUFFIX_RULE} (got {suffix!r})"))
    return FieldCheck(resolved, plan, problems)
