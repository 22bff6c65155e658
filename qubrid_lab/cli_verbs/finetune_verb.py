"""``qubrid-lab finetune data.csv --model …``: upload the dataset, create the job, follow it to its model id.

The hyperparameter flags are generated from the ``Hyperparameters`` model's fields (name, type, description,
default), so a field added there is a flag here; only the flags given are sent, the server fills the rest.
"""

from __future__ import annotations

import argparse
import sys
from types import NoneType
from typing import TYPE_CHECKING, get_args, get_origin

from qubrid_lab.cli_verbs.connection import connect
from qubrid_lab.cli_verbs.job_follow import follow_job, report_finished
from qubrid_lab.cli_verbs.terminal import add_column_flag, column_mapping, dataset_file, print_result
from qubrid_lab.client.api_errors import InvalidRequestError, QubridLabError
from qubrid_lab.settings import DEFAULT_CHAT_MODEL
from qubrid_lab.training.hyperparameters import Hyperparameters

if TYPE_CHECKING:
    from qubrid_lab.client import Client

METAVARS = {int: "N", float: "X", str: "NAME"}


def module_names(text: str) -> list[str] | str:
    """``target_modules`` from the command line: ``q_proj,v_proj`` or ``all-linear``."""
    return text if text == "all-linear" else [name.strip() for name in text.split(",")]


def _flag_type(annotation) -> type:
    """The Python type a field's flag parses to: its annotation without ``None``; a list is given comma-separated."""
    kinds = [kind for kind in (get_args(annotation) or (annotation,)) if kind is not NoneType]
    return list if any(get_origin(kind) is list for kind in kinds) else kinds[0]


def add_hyperparameter_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``Hyperparameters`` field (``--learning-rate``, ``--lora-rank``, ...), unset by default."""
    group = parser.add_argument_group("hyperparameters (those not given take the server's defaults)")
    for name, field in Hyperparameters.model_fields.items():
        flag, kind = "--" + name.replace("_", "-"), _flag_type(field.annotation)
        default = "" if field.default_factory or field.default is None else f" (default {field.default})"
        help_text = (field.description + default).replace("%", "%%")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif kind is list:
            group.add_argument(
                flag,
                type=module_names,
                default=argparse.SUPPRESS,
                metavar="NAMES",
                help=help_text + " (comma-separated)",
            )
        else:
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=METAVARS[kind], help=help_text)


def given_hyperparameters(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in Hyperparameters.model_fields if hasattr(args, name)}


def check_before_upload(args: argparse.Namespace, hyperparameters: dict) -> None:
    """The request-only rules the server applies (``check_request_fields``), before anything is uploaded: every
    problem at once, the first one's field as ``param``."""
    from qubrid_lab.training.job_request_rules import check_request_fields

    check = check_request_fields(
        task_type=args.task_type or "qa",
        hyperparameters=hyperparameters,
        suffix=args.suffix,
        column_mapping=column_mapping(args),
        dataset_id=args.csv.name,
    )
    if check.problems:
        raise InvalidRequestError(
            "Invalid fine-tuning job: " + "; ".join(f"{field}: {problem}" for field, problem in check.problems) + ".",
            param=check.problems[0][0],
        )


def create_job(client: Client, args: argparse.Namespace, hyperparameters: dict) -> dict:
    """Upload the dataset and create the job on it; a refused job leaves no dataset behind."""
    from qubrid_lab.data.columns import infer_task_type

    dataset = client.datasets.upload(args.csv)
    print(f"uploaded {args.csv.name} as {dataset['id']} ({dataset['row_count']} rows)", file=sys.stderr)
    try:
        return client.jobs.create(
            args.model,
            dataset["id"],
            args.task_type or infer_task_type(dataset["columns"]),
            hyperparameters,
            suffix=args.suffix,
            column_mapping=column_mapping(args),
        )
    except QubridLabError:
        try:
            client.datasets.delete(dataset["id"])
        except QubridLabError:
            pass  # the refusal is what the user needs to read
        raise


def cmd_finetune(args: argparse.Namespace) -> int:
    hyperparameters = given_hyperparameters(args)
    check_before_upload(args, hyperparameters)
    with connect(args) as client:
        job = create_job(client, args, hyperparameters)
        print(f"created job {job['id']} ({job['task_type']}, base model {job['base_model']})", file=sys.stderr)
        if args.detach:
            print_result(job, args.json, lambda created: created["id"])
            print(f"follow it with: qubrid-lab jobs follow {job['id']}", file=sys.stderr)
            return 0
        return report_finished(follow_job(client, job["id"], cancel_on_interrupt=True), as_json=args.json)


def add_finetune_verb(commands, parents: list[argparse.ArgumentParser]) -> None:
    finetune = commands.add_parser(
        "finetune",
        parents=parents,
        help="fine-tune a model on a CSV (or JSONL chat) file, following the job",
        description="Upload the dataset, create a LoRA fine-tuning job and follow it with a progress bar until it "
        "ends, then print the fine-tuned model's id. Ctrl-C cancels the job.",
    )
    finetune.add_argument(
        "csv",
        type=dataset_file,
        metavar="DATA",
        help="the training data: a CSV file (or a JSONL file of chat conversations)",
    )
    finetune.add_argument(
        "--model",
        default=DEFAULT_CHAT_MODEL,
        help=f"the base model: a catalogue id the server serves (default {DEFAULT_CHAT_MODEL})",
    )
    finetune.add_argument(
        "--task-type",
        choices=["qa", "not_qa", "chat"],
        help="default: chat for JSONL, qa when there are question and answer columns, else not_qa",
    )
    finetune.add_argument("--suffix", help="a name put in the fine-tuned model's id")
    add_column_flag(finetune)
    finetune.add_argument(
        "--detach",
        action="store_true",
        help="return once the job is created, printing its id (follow it with `jobs follow`)",
    )
    finetune.add_argument(
        "--json",
        action="store_true",
        help="print the job's JSON (the created one with --detach, else the finished one)",
    )
    add_hyperparameter_flags(finetune)
    finetune.set_defaults(run=cmd_finetune)
