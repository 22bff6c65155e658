"""Profiling a CSV dataset before fine-tuning on it: what training will see, and what to fix first.

``profile_csv`` reads the file with the parser the server validates uploads with, finds the column roles with
the rules a job uses (``plan_columns``), and tokenizes the rows with ``build_examples``, the function training
calls, so token lengths, cut rows and skipped rows are exactly those of a job with the same settings. The
server runs ``unusable_dataset_reason`` on the same rows when a job is created.

Row numbers count data rows: row 1 is the first row after the header. They are not the file's line numbers,
which differ when a field spans several lines or blank lines are skipped.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from qubrid_lab.data.columns import ACCEPTED_NAMES, OPTIONAL_ROLES, ColumnError, ColumnPlan, plan_columns
from qubrid_lab.data.csv_ingest import inspect_csv, read_rows
from qubrid_lab.data.formatting import IGNORE_INDEX, build_examples
from qubrid_lab.data.splits import split_examples, steps_per_epoch, validation_split_problem
from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.settings import DEFAULT_CHAT_MODEL
from qubrid_lab.training.hyperparameters import Hyperparameters

ROW_NUMBERING = "Rows are numbered from 1, the first data row after the header (not the file's line numbers)."
LENGTH_MULTIPLE = 64  # the suggested max_seq_length is a multiple of this ...
COVERED_SHARE = 0.99  # ... that this share of the rows fit in
SHORT_ANSWER_CHARS = 3  # qa answers shorter than this get a warning
SHOWN_RUNS = 8  # row ranges a warning spells out before "and N more"
UNLIMITED = 2**31 - 1  # a max_seq_length that cuts nothing: lengths are measured before truncation


@dataclass
class ColumnStats:
    """Lengths in characters of one column's non-empty cells (surrounding spaces stripped, as training does)."""

    name: str
    empty: int  # cells that are empty or only spaces
    min_chars: int
    mean_chars: float
    max_chars: int


@dataclass
class DatasetWarning:
    """Something to look at before training, and the data rows involved (row 1 follows the header)."""

    message: str
    rows: list[int] = field(default_factory=list)


@dataclass(repr=False)
class DatasetProfile:
    """What a fine-tuning job would make of a dataset; renders as a summary in a notebook."""

    rows: int  # data rows in the file
    columns: list[str]
    task_type: str | None  # the one asked for, else the detected one ('qa' tried first); None if none fits
    plan: ColumnPlan | None  # column roles; None when no task type fits
    empty_rows: list[int]  # rows with an empty required cell: training skips them
    duplicate_rows: list[int]  # rows identical to an earlier row (the first of them is not listed)
    column_stats: list[ColumnStats]
    token_lengths: list[int]  # tokens of each row training tokenizes, before truncation
    token_length_rows: list[int]  # the row number of each entry of token_lengths
    max_seq_length: int
    over_max_share: float  # share of token_lengths above max_seq_length (those rows are cut or skipped)
    suggested_max_seq_length: int
    trainable_rows: int  # rows a job trains or validates on
    batch_size: int
    validation_split: float
    steps_per_epoch: int  # optimizer steps per epoch on one device without gradient accumulation
    model: str  # whose tokenizer measured the lengths
    context_length: int | None  # the model's longest sequence, when known
    warnings: list[DatasetWarning] = field(default_factory=list)
    # the first trainable row as training sees it (cut to max_seq_length): (text, takes the loss) pieces
    example_row: int | None = None
    example: list[tuple[str, bool]] = field(default_factory=list)

    def roles(self) -> dict[str, str]:
        """Column name -> role (question, answer, context or text) of the columns a job uses."""
        if self.plan is None:
            return {}
        return {column: role for role, column in asdict(self.plan).items() if role != "task_type" and column}

    def length_percentile(self, share: float) -> int:
        """The token length that ``share`` (0 to 1) of the tokenized rows do not exceed; 0 without rows."""
        return _percentile(sorted(self.token_lengths), share)

    def length_histogram(self, bins: int = 24) -> list[tuple[int, int, int]]:
        """Tokenized rows counted in about ``bins`` equal length ranges: ``(start, end, rows)``, ``end`` excluded.

        The ranges span the lengths, and reach ``max_seq_length`` when it is near (up to 1.5 times the longest
        row); no range straddles it, so every range is either kept whole or cut. [] without tokenized rows.
        """
        if not self.token_lengths:
            return []
        low, high, limit = min(self.token_lengths), max(self.token_lengths), self.max_seq_length
        if limit <= high * 1.5:
            high = max(high, limit + 1)
        width = max(1, math.ceil((high - low + 1) / bins))
        start = low - (low - limit - 1) % width  # a range starts right after max_seq_length
        counts = [0] * math.ceil((high + 1 - start) / width)
        for length in self.token_lengths:
            counts[(length - start) // width] += 1
        return [(start + index * width, start + (index + 1) * width, count) for index, count in enumerate(counts)]

    def to_dict(self) -> dict:
        """Every field as plain JSON-ready values."""
        return asdict(self)

    def __repr__(self) -> str:
        lengths = (
            f"tokens median {self.length_percentile(0.5)} max {max(self.token_lengths)}"
            if self.token_lengths
            else "no tokenized rows"
        )
        return (
            f"<DatasetProfile {self.rows} rows, task_type={self.task_type!r}, {lengths}, "
            f"suggested_max_seq_length={self.suggested_max_seq_length}, "
            f"steps_per_epoch={self.steps_per_epoch}, {len(self.warnings)} warning(s)>"
        )

    def _repr_html_(self) -> str:
        from qubrid_lab.training.dataset_profile_html import render

        return render(self)


def profile_csv(
    path_or_df,
    model: str = DEFAULT_CHAT_MODEL,
    task_type: str | None = None,
    *,
    column_mapping: dict[str, str] | None = None,
    max_seq_length: int = 512,
    batch_size: int = 8,
    validation_split: float = 0.0,
    tokenizer=None,
    cache_dir: str | Path | None = None,
) -> DatasetProfile:
    """Profile a CSV file (or a pandas DataFrame) as fine-tuning data for ``model``.

    ``model`` is a catalogue id (the default is the bundled chat model, whose tokenizer is read from the
    converted-model cache ``cache_dir``, default ``<home>/models``) or a model directory; a loaded
    ``tokenizer`` replaces it. ``task_type`` None detects the task: 'qa' when the columns fit, else 'not_qa'.
    ``column_mapping``, ``max_seq_length``, ``batch_size`` and ``validation_split`` mean what they mean in a job
    and are checked the same way. A file that is not a usable CSV raises the ``DatasetError`` an upload of it
    would get. Warnings and row lists number data rows from 1, the first row after the header.
    """
    Hyperparameters(max_seq_length=max_seq_length, batch_size=batch_size, validation_split=validation_split)
    columns, rows = _read_table(path_or_df)
    plan, warnings = _detect_plan(columns, task_type, column_mapping)
    profile = DatasetProfile(
        rows=len(rows),
        columns=columns,
        task_type=plan.task_type if plan else task_type,
        plan=plan,
        empty_rows=empty_rows(rows, plan) if plan else [],
        duplicate_rows=duplicate_rows(rows, columns),
        column_stats=[_column_stats(name, rows) for name in columns],
        token_lengths=[],
        token_length_rows=[],
        max_seq_length=max_seq_length,
        over_max_share=0.0,
        suggested_max_seq_length=max_seq_length,
        trainable_rows=0,
        batch_size=batch_size,
        validation_split=validation_split,
        steps_per_epoch=0,
        model=model,
        context_length=None,
        warnings=warnings,
    )
    if profile.empty_rows:
        empty = profile.empty_rows
        profile.warnings.append(
            DatasetWarning(
                f"{_count(len(empty), 'row')} {_verb(empty, 'has', 'have')} an empty "
                f"{' or '.join(_required_roles(plan))} and {_verb(empty, 'is', 'are')} skipped in training: "
                f"{_rows_text(empty)}.",
                empty,
            )
        )
    if profile.duplicate_rows:
        copies = profile.duplicate_rows
        profile.warnings.append(
            DatasetWarning(
                f"{_count(len(copies), 'row')} {_verb(copies, 'repeats', 'repeat')} an earlier row exactly, so "
                f"training weighs it twice: {_rows_text(copies)}. Remove the copies unless that is intended.",
                copies,
            )
        )
    if plan is not None:
        if tokenizer is None:
            tokenizer = load_tokenizer(model, cache_dir)
        else:
            profile.model = getattr(tokenizer, "name_or_path", "") or model
        _measure_tokens(profile, rows, tokenizer)
    return profile


def empty_rows(rows: list[dict[str, str]], plan: ColumnPlan) -> list[int]:
    """Row numbers (from 1) whose required cell for ``plan`` is empty or only spaces; training skips them."""
    required = [getattr(plan, role) for role in _required_roles(plan)]
    return [number for number, row in enumerate(rows, 1) if any(_blank(row.get(column)) for column in required)]


def _blank(cell: str | list | None) -> bool:
    """An empty cell: no text but spaces, or (a chat row's messages) nothing at all."""
    return not cell.strip() if isinstance(cell, str) else not cell


def duplicate_rows(rows: list[dict[str, str]], columns: list[str]) -> list[int]:
    """Row numbers (from 1) of the rows whose every cell equals those of an earlier row."""
    seen: set[tuple[str, ...]] = set()
    copies = []
    for number, row in enumerate(rows, 1):
        key = tuple(row[column] for column in columns)
        if key in seen:
            copies.append(number)
        seen.add(key)
    return copies


def unusable_dataset_reason(rows: list[dict[str, str]], plan: ColumnPlan, validation_split: float) -> str | None:
    """Why a job of ``plan`` cannot train on these rows (every required cell is empty, or too few rows are left
    for the validation split), or None. The server refuses such a job when it is created; the profile warns."""
    empty = empty_rows(rows, plan)
    usable = len(rows) - len(empty)
    if usable == 0:
        return (
            f"no usable rows: each of its {_count(len(rows), 'row')} has an empty "
            f"{' or '.join(_required_roles(plan))} ({_rows_text(empty)})"
        )
    return validation_split_problem(usable, validation_split)


def rows_with_nothing_to_train(rows: list[dict], plan: ColumnPlan, tokenizer, max_seq_length: int) -> list[int]:
    """Row numbers (from 1) of the non-empty rows that ``max_seq_length`` cuts to no trained token (a prompt
    that alone fills it); empty rows are :func:`empty_rows`."""
    skipped = set(empty_rows(rows, plan))
    numbers = [number for number in range(1, len(rows) + 1) if number not in skipped]
    examples = build_examples([rows[number - 1] for number in numbers], plan, tokenizer, UNLIMITED).examples
    return [number for number, example in zip(numbers, examples) if _prompt_length(example) >= max_seq_length]


def trained_pieces(example: dict[str, list[int]], tokenizer, max_seq_length: int) -> list[tuple[str, bool]]:
    """An example's text as training sees it, cut to ``max_seq_length``: runs of tokens with whether the loss
    is taken on them (the answer and its end of turn) or not (the prompt, the template's headers)."""
    ids, labels = example["input_ids"][:max_seq_length], example["labels"][:max_seq_length]
    pieces: list[tuple[list[int], bool]] = []
    for token, label in zip(ids, labels):
        trained = label != IGNORE_INDEX
        if pieces and pieces[-1][1] == trained:
            pieces[-1][0].append(token)
        else:
            pieces.append(([token], trained))
    return [(tokenizer.decode(tokens), trained) for tokens, trained in pieces]


def untrainable_reason(rows: list[dict], plan: ColumnPlan, tokenizer, max_seq_length: int) -> str | None:
    """Why no row leaves a token to train on within ``max_seq_length``, naming the rows; None when one does."""
    cut = rows_with_nothing_to_train(rows, plan, tokenizer, max_seq_length)
    if not cut or len(cut) < len(rows) - len(empty_rows(rows, plan)):
        return None
    return (
        f"max_seq_length {max_seq_length} leaves no token to train on in any row: the prompt alone fills it in "
        f"{_rows_text(cut)}. Raise hyperparameters.max_seq_length or shorten the prompts"
    )


def load_tokenizer(model: str, cache_dir: str | Path | None = None):
    """The tokenizer of a catalogue id or model directory (a GGUF model is converted into ``cache_dir`` once).

    Loaded tokenizers are kept, so profiling again with the same model costs no load.
    """
    from qubrid_lab.models.catalogue import default_catalogue
    from qubrid_lab.models.loading import weights_location
    from qubrid_lab.settings import Settings

    entry = default_catalogue().resolve(model)
    if entry.kind != "chat":
        raise InvalidRequestError(
            f"'{model}' is an embedding model; profile a dataset for a chat model.", param="model"
        )
    cache = Path(cache_dir).expanduser() if cache_dir else Settings().model_cache_dir
    return tokenizer_at(weights_location(entry, cache))


@lru_cache(maxsize=4)
def tokenizer_at(location: str):
    """The tokenizer at a ``from_pretrained`` location, loaded once."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location)


def _read_table(path_or_df) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows of a CSV file, or of a DataFrame read as the CSV file an upload of it would be."""
    if hasattr(path_or_df, "to_csv"):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "dataframe.csv"
            path_or_df.to_csv(path, index=False, encoding="utf-8")
            return _read_table(path)
    path = Path(path_or_df).expanduser()
    return inspect_csv(path, path.name).columns, read_rows(path)


def _detect_plan(
    columns: list[str], task_type: str | None, column_mapping: dict[str, str] | None
) -> tuple[ColumnPlan | None, list[DatasetWarning]]:
    """The column plan for ``task_type``, or for the first of qa, not_qa that fits; else why none fits."""
    problems = []
    for candidate in (task_type,) if task_type else ("qa", "not_qa"):
        try:
            return plan_columns(columns, candidate, column_mapping), []
        except ColumnError as error:
            problems.append(DatasetWarning(error.message))
    return None, problems


def _measure_tokens(profile: DatasetProfile, rows: list[dict[str, str]], tokenizer) -> None:
    """Token lengths, cut and skipped rows, the suggested length and the steps per epoch, into ``profile``."""
    plan, limit, warnings = profile.plan, profile.max_seq_length, profile.warnings
    try:
        examples = build_examples(rows, plan, tokenizer, UNLIMITED).examples
    except ValueError as error:  # qa with a tokenizer that has no chat template
        warnings.append(DatasetWarning(str(error)))
        return
    skipped = set(profile.empty_rows)
    numbers = [number for number in range(1, len(rows) + 1) if number not in skipped]
    lengths = [len(example["input_ids"]) for example in examples]
    profile.token_lengths, profile.token_length_rows = lengths, numbers
    profile.context_length = _context_length(tokenizer)
    profile.over_max_share = sum(length > limit for length in lengths) / len(lengths) if lengths else 0.0
    profile.suggested_max_seq_length = _suggested_length(lengths, profile.context_length, limit)

    # 1. Rows over the limit: a qa row whose prompt alone fills it is skipped, any other one is cut.
    filled = {number for number, example in zip(numbers, examples) if _prompt_length(example) >= limit}
    cut = [number for number, length in zip(numbers, lengths) if length > limit and number not in filled]
    if cut:
        fits = sum(length <= profile.suggested_max_seq_length for length in lengths) / len(lengths)
        warnings.append(
            DatasetWarning(
                f"{_count(len(cut), 'row')} ({len(cut) / len(lengths):.1%}) {_verb(cut, 'is', 'are')} longer than "
                f"max_seq_length {limit} tokens and will be cut, losing the end of the "
                f"{'answer' if plan.task_type == 'qa' else 'text'}: {_rows_text(cut)}. "
                f"max_seq_length {profile.suggested_max_seq_length} fits {fits:.0%} of the rows.",
                cut,
            )
        )
    if filled:
        warnings.append(
            DatasetWarning(
                f"{_count(len(filled), 'row')} {_verb(filled, 'is', 'are')} skipped: the question alone fills "
                f"max_seq_length {limit}, leaving no room for the answer: {_rows_text(sorted(filled))}.",
                sorted(filled),
            )
        )

    # 2. Answers too short to teach much.
    if plan.task_type == "qa":
        short = [number for number in numbers if len(rows[number - 1][plan.answer].strip()) < SHORT_ANSWER_CHARS]
        if short:
            warnings.append(
                DatasetWarning(
                    f"{_count(len(short), 'answer')} {_verb(short, 'is', 'are')} shorter than {SHORT_ANSWER_CHARS} "
                    f"characters: {_rows_text(short)}. Very short answers teach the model to answer tersely; check "
                    "that they are complete.",
                    short,
                )
            )

    # 3. Whether a job can train at all, and for how many steps an epoch.
    trainable = [example for number, example in zip(numbers, examples) if number not in filled]
    profile.trainable_rows = len(trainable)
    first = next((number for number in numbers if number not in filled), None)
    if first is not None:
        profile.example_row = first
        profile.example = trained_pieces(examples[numbers.index(first)], tokenizer, limit)
    reason = unusable_dataset_reason(rows, plan, profile.validation_split)
    if reason is None and not trainable:
        reason = f"no row leaves room for an answer within max_seq_length {limit}"
    reason = reason or validation_split_problem(len(trainable), profile.validation_split)
    if reason:
        warnings.append(DatasetWarning(f"A job cannot train on this dataset: {reason}."))
        return
    train = split_examples(trainable, profile.validation_split, seed=Hyperparameters().seed).train
    profile.steps_per_epoch = steps_per_epoch(len(train), profile.batch_size, 1, 1)
    if len(train) < profile.batch_size:
        warnings.append(
            DatasetWarning(
                f"Only {_count(len(train), 'row')} to train on, fewer than batch_size {profile.batch_size}: an epoch "
                "is a single step. Add rows, or lower batch_size and raise epochs."
            )
        )


def _required_roles(plan: ColumnPlan) -> list[str]:
    return [role for role in ACCEPTED_NAMES[plan.task_type] if role not in OPTIONAL_ROLES]


def _prompt_length(example: dict[str, list[int]]) -> int:
    """Leading tokens that take no loss: the rendered question of a qa row, none of a not_qa row."""
    labels = example["labels"]
    return next((index for index, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def _context_length(tokenizer) -> int | None:
    """The longest sequence the model takes: the tokenizer's own limit, else its model config's positions."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**7:  # an unset limit is stored as a huge number
        return limit
    config = Path(getattr(tokenizer, "name_or_path", "") or "") / "config.json"
    if config.is_file():
        positions = json.loads(config.read_text()).get("max_position_embeddings")
        return positions if isinstance(positions, int) and positions > 0 else None
    return None


def _suggested_length(lengths: list[int], context_length: int | None, fallback: int) -> int:
    """The length ``COVERED_SHARE`` of the rows fit in, rounded up to a multiple of 64 and capped by the model's
    context: the rare longest rows are cut rather than every batch padded to them."""
    if not lengths:
        return fallback
    covered = _percentile(sorted(lengths), COVERED_SHARE)
    suggested = max(LENGTH_MULTIPLE, math.ceil(covered / LENGTH_MULTIPLE) * LENGTH_MULTIPLE)
    return min(suggested, context_length) if context_length else suggested


def _percentile(ordered: list[int], share: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return 0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def _column_stats(name: str, rows: list[dict[str, str]]) -> ColumnStats:
    sizes = [len(text) for text in (row[name].strip() for row in rows) if text]
    if not sizes:
        return ColumnStats(name, empty=len(rows), min_chars=0, mean_chars=0.0, max_chars=0)
    return ColumnStats(
        name,
        empty=len(rows) - len(sizes),
        min_chars=min(sizes),
        mean_chars=round(sum(sizes) / len(sizes), 1),
        max_chars=max(sizes),
    )


def _rows_text(numbers: list[int]) -> str:
    """``rows 3, 7-9 and 12``; past ``SHOWN_RUNS`` ranges the rest is counted (``and 40 more``)."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    spelled = [str(first) if first == last else f"{first}-{last}" for first, last in runs[:SHOWN_RUNS]]
    hidden = sum(last - first + 1 for first, last in runs[SHOWN_RUNS:])
    if hidden:
        spelled.append(f"{hidden} more")
    noun = "row" if len(numbers) == 1 else "rows"
    return f"{noun} {spelled[0]}" if len(spelled) == 1 else f"{noun} {', '.join(spelled[:-1])} and {spelled[-1]}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun if number == 1 else noun + 's'}"


def _verb(items, singular: str, plural: str) -> str:
    return singular if len(items) == 1 else plural
