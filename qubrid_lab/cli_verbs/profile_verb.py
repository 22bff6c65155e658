"""``qubrid-lab profile data.csv``: ``profile_csv`` on the terminal (a table and its warnings) or as JSON.

It runs here, on the file, with no server: the tokenizer of ``--model`` is read from the home's model cache.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import TYPE_CHECKING

from qubrid_lab.cli_verbs.connection import home_settings
from qubrid_lab.cli_verbs.terminal import add_column_flag, column_mapping, dataset_file, print_json, table
from qubrid_lab.settings import DEFAULT_CHAT_MODEL

if TYPE_CHECKING:
    from qubrid_lab.training.dataset_profile import DatasetProfile

WIDTH = 100  # warnings are wrapped to this many characters


def render_profile(profile: DatasetProfile, name: str) -> str:
    """The profile as text: a summary, the columns with their roles and sizes, then the warnings."""
    from qubrid_lab.training.dataset_profile import ROW_NUMBERING

    summary = [
        ("rows", f"{profile.rows} in the file, {profile.trainable_rows} usable for training"),
        ("task type", profile.task_type or "none fits the columns"),
        ("empty required cells", len(profile.empty_rows)),
        ("duplicate rows", len(profile.duplicate_rows)),
    ]
    if profile.token_lengths:
        lengths = profile.token_lengths
        context = f" (model context {profile.context_length})" if profile.context_length else ""
        summary += [
            (
                "tokens per row",
                (
                    f"min {min(lengths)}, median {profile.length_percentile(0.5)}, "
                    f"p95 {profile.length_percentile(0.95)}, max {max(lengths)}"
                ),
            ),
            (
                f"longer than max_seq_length {profile.max_seq_length}",
                f"{sum(length > profile.max_seq_length for length in lengths)} ({profile.over_max_share:.1%})",
            ),
            ("suggested max_seq_length", f"{profile.suggested_max_seq_length}{context}"),
            (
                "steps per epoch",
                (
                    f"{profile.steps_per_epoch} at batch_size {profile.batch_size}, "
                    f"validation_split {profile.validation_split:g} (one device)"
                ),
            ),
        ]
    summary.append(("tokenizer", profile.model))
    roles = profile.roles()
    columns = [
        (stats.name, roles.get(stats.name, "unused"), stats.empty, stats.min_chars, stats.mean_chars, stats.max_chars)
        for stats in profile.column_stats
    ]
    lines = [
        f"Dataset profile of {name}",
        "",
        table(None, summary),
        "",
        table(("column", "role", "empty", "min chars", "mean chars", "max chars"), columns),
        "",
    ]
    if profile.warnings:
        lines.append(f"{len(profile.warnings)} warning(s):")
        lines += [
            textwrap.fill(warning.message, WIDTH, initial_indent="  - ", subsequent_indent="    ")
            for warning in profile.warnings
        ]
    else:
        lines.append("No warnings.")
    lines.append(ROW_NUMBERING)
    return "\n".join(lines)


def cmd_profile(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from qubrid_lab.errors import InvalidRequestError, describe_validation_errors
    from qubrid_lab.training.dataset_profile import profile_csv

    cache_dir = home_settings(getattr(args, "home", None)).model_cache_dir
    try:
        profile = profile_csv(
            args.csv,
            args.model,
            args.task_type,
            column_mapping=column_mapping(args),
            max_seq_length=args.max_seq_length,
            batch_size=args.batch_size,
            validation_split=args.validation_split,
            cache_dir=cache_dir,
        )
    except ValidationError as exc:  # the job settings it measures with, checked as a job checks them
        message, param = describe_validation_errors(exc.errors())
        raise InvalidRequestError(message, param=param) from None
    if args.json:
        print_json(profile.to_dict())
    else:
        print(render_profile(profile, args.csv.name))
    return 0


def add_profile_verb(commands, parents: list[argparse.ArgumentParser]) -> None:
    profile = commands.add_parser(
        "profile",
        parents=parents,
        help="profile a CSV file as fine-tuning data (locally; no server needed)",
        description="What a fine-tuning job would make of a CSV file: column roles, token lengths, cut and "
        "skipped rows, steps per epoch, and what to fix first.",
    )
    profile.add_argument("csv", type=dataset_file, metavar="DATA.csv", help="the CSV file to profile")
    profile.add_argument(
        "--model",
        default=DEFAULT_CHAT_MODEL,
        help=f"whose tokenizer measures the rows: a catalogue id or a model directory (default {DEFAULT_CHAT_MODEL})",
    )
    profile.add_argument("--task-type", choices=["qa", "not_qa"], help="default: qa when the columns fit, else not_qa")
    add_column_flag(profile)
    profile.add_argument(
        "--max-seq-length", type=int, default=512, metavar="N", help="as the job would set it (default 512)"
    )
    profile.add_argument("--batch-size", type=int, default=8, metavar="N", help="as the job would set it (default 8)")
    profile.add_argument(
        "--validation-split", type=float, default=0.0, metavar="X", help="as the job would set it (default 0)"
    )
    profile.add_argument("--json", action="store_true", help="print the profile as JSON")
    profile.set_defaults(run=cmd_profile)
