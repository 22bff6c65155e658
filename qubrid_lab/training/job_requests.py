"""Checking a fine-tuning job request before it is queued: every problem at once, each naming its field.

The rules a request meets on its own are in ``training.job_request_rules``, which the notebook's form runs too;
the checks a job's data must pass are the dataset profile's (``training.dataset_profile``), so a notebook's
profile and the server's refusal agree.
"""

from __future__ import annotations

from pathlib import Path

from qubrid_lab.data.columns import TASK_TYPES, plan_columns
from qubrid_lab.data.dataset_files import read_dataset
from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.models.catalogue import Catalogue, ModelEntry
from qubrid_lab.models.loading import source_status, weights_location
from qubrid_lab.storage.datasets import DatasetStore
from qubrid_lab.training.dataset_profile import tokenizer_at, untrainable_reason, unusable_dataset_reason
from qubrid_lab.training.hyperparameters import Hyperparameters, tracker_problems
from qubrid_lab.training.job_request_rules import check_request_fields, missing_dataset_problem

ROWS_CHECKED_AT_CREATION = 50_000  # larger datasets are tokenized by the worker only


def check_job_request(
    catalogue: Catalogue,
    datasets: DatasetStore,
    model_cache_dir: Path,
    *,
    base_model: str,
    dataset_id: str,
    task_type: str,
    hyperparameters: dict | None,
    suffix: str | None,
    column_mapping: dict[str, str] | None,
    scope: str | None,
    validation_dataset_id: str | None,
) -> Hyperparameters:
    """The request's hyperparameters, resolved, once every field checks out; else one 400 listing every problem.

    ``scope`` is what the creating key may see: a dataset outside it is "no dataset" here too.
    """
    problems: list[tuple[str, str]] = []
    entry = catalogue.entries.get(base_model)
    if entry is None or entry.kind != "chat":
        chat_models = sorted(m for m, e in catalogue.entries.items() if e.kind == "chat")
        what = "is not in the model catalogue" if entry is None else "is an embedding model"
        problems.append(
            (
                "base_model",
                f"'{base_model}' {what}; fine-tune one of the chat models: "
                + (", ".join(chat_models) or "(none registered)"),
            )
        )
    elif not entry.trainable:
        problems.append(
            (
                "base_model",
                f"'{base_model}' is served by the '{entry.backend}' backend from "
                f"{entry.base_url or entry.url}: its weights are not on this machine, so "
                "it cannot be fine-tuned here. Fine-tune a local model, or give the "
                "entry a 'source' naming the weights to train from.",
            )
        )
    dataset = datasets.find(dataset_id, scope)
    if dataset is None:
        problems.append(missing_dataset_problem(dataset_id))
    check = check_request_fields(
        task_type=task_type,
        hyperparameters=hyperparameters,
        suffix=suffix,
        column_mapping=column_mapping,
        dataset_id=dataset_id,
        dataset_columns=dataset.columns if dataset else None,
        dataset_format=dataset.path.suffix[1:] if dataset else None,
        validation_dataset=validation_dataset_id is not None,
    )
    problems += check.problems
    plan, resolved = check.plan, check.hyperparameters
    if (
        resolved is not None
        and entry is not None
        and entry.backend == "vllm"
        and resolved.lora_rank > entry.max_lora_rank
    ):
        problems.append(
            (
                "hyperparameters.lora_rank",
                f"{resolved.lora_rank} is above {entry.max_lora_rank}, "
                f"the largest LoRA rank the vLLM serving '{base_model}' loads (its entry's "
                "max_lora_rank); lower lora_rank or raise max_lora_rank",
            )
        )
    if resolved is not None:
        problems += tracker_problems(resolved.report_to)
    problems += _validation_dataset_problems(
        datasets, validation_dataset_id, task_type, column_mapping, resolved, scope
    )
    if plan is not None:  # the dataset profile's checks: rows the worker would find nothing to train on
        validation_split = resolved.validation_split if resolved else 0.0
        try:
            rows = read_dataset(dataset.path)
        except FileNotFoundError:  # deleted since it was looked up
            rows = None
            problems.append(("dataset_id", f"no dataset '{dataset_id}'; it was deleted"))
        reason = unusable_dataset_reason(rows, plan, validation_split) if rows is not None else None
        if reason is None and rows is not None and resolved is not None and entry is not None:
            reason = _cut_to_nothing(model_cache_dir, entry, rows, plan, resolved.max_seq_length)
        if reason:
            problems.append(("dataset_id", f"dataset '{dataset_id}' cannot train a {task_type} job: {reason}"))
    if problems:
        raise InvalidRequestError(
            "Invalid fine-tuning job: "
            + "; ".join(text if text.startswith(f"{param}:") else f"{param}: {text}" for param, text in problems)
            + ".",
            param=problems[0][0],
        )
    return resolved


def _cut_to_nothing(
    model_cache_dir: Path, entry: ModelEntry, rows: list[dict], plan, max_seq_length: int
) -> str | None:
    """Why ``max_seq_length`` leaves no row anything to train on, when the base model's tokenizer is on this
    machine and the dataset is small enough to tokenize while the request waits; else the worker finds out."""
    if len(rows) > ROWS_CHECKED_AT_CREATION or source_status(entry, model_cache_dir) not in (
        "ready",
        "ready (in the Hugging Face cache)",
    ):
        return None
    try:
        tokenizer = tokenizer_at(weights_location(entry, model_cache_dir))
        return untrainable_reason(rows, plan, tokenizer, max_seq_length)
    except (OSError, ValueError):  # no usable tokenizer or template: the worker reports it in its words
        return None


def _validation_dataset_problems(
    datasets: DatasetStore,
    dataset_id: str | None,
    task_type: str,
    column_mapping: dict | None,
    resolved: Hyperparameters | None,
    scope: str | None,
) -> list[tuple[str, str]]:
    """What is wrong with a job's validation dataset: missing, of the other format, or its columns do not
    fit the task; and a validation split beside it."""
    if dataset_id is None:
        return []
    field = "validation_dataset_id"
    dataset = datasets.find(dataset_id, scope)
    if dataset is None:
        return [(field, f"no dataset '{dataset_id}'")]
    problems = []
    if resolved is not None and resolved.validation_split > 0:
        problems.append(
            ("hyperparameters.validation_split", "give a validation dataset or a validation_split, not both")
        )
    if task_type in TASK_TYPES and (task_type == "chat") != (dataset.path.suffix == ".jsonl"):
        problems.append(
            (
                field,
                f"dataset '{dataset_id}' is {dataset.path.suffix[1:].upper()}, but a {task_type} "
                "job validates on data of its training format",
            )
        )
    elif task_type in TASK_TYPES:
        try:
            plan_columns(dataset.columns, task_type, column_mapping)
        except InvalidRequestError as exc:
            problems.append((field, f"dataset '{dataset_id}': {exc.message.rstrip('.')}"))
    return problems
