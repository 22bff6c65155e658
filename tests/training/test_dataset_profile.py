"""Dataset profiles on the tiny chat model's tokenizer: what a user reads before training, checked against what
training really does with the same rows (``build_examples``, the Trainer's steps, the server's job checks)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from qubrid_lab import profile_csv
from qubrid_lab.data.columns import ColumnPlan, plan_columns
from qubrid_lab.data.csv_ingest import DatasetError, read_rows
from qubrid_lab.data.formatting import build_examples
from qubrid_lab.engine.registry import ModelRegistry
from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.models.catalogue import Catalogue, ModelEntry
from qubrid_lab.server.app import create_app
from qubrid_lab.settings import DEFAULT_EMBEDDING_MODEL, Settings

DATA = Path(__file__).parents[1] / "data"  # the CSV files the data tests use too
QA_CSV = DATA / "qa_facts.csv"  # 15 rows, question,answer
TEXT_CSV = DATA / "text_notes.csv"  # 3 rows, text (one spans two lines)
NO_LIMIT = 10**6


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def lengths_in_training(path: Path, plan: ColumnPlan, tokenizer, max_seq_length: int = NO_LIMIT) -> list[int]:
    return [len(e["input_ids"]) for e in build_examples(read_rows(path), plan, tokenizer, max_seq_length).examples]


@pytest.fixture
def messy_csv(tmp_path) -> Path:
    """Row 1 spans two lines, so data rows and file lines are numbered differently."""
    return write(
        tmp_path / "messy.csv",
        (
            "question,answer\n"
            '"Where is the\nferry?",It crosses the bay twice a day.\n'  # row 1, lines 2-3
            "Who rings the bell?,\n"  # row 2: empty answer
            "When does it open?,At dawn.\n"  # row 3
            "When does it open?,At dawn.\n"  # row 4: copy of row 3
            "  ,Nobody asked.\n"  # row 5: blank question
            "Is it far?,No\n"
        ),
    )  # row 6: a two-character answer


def test_a_qa_file_is_detected_and_measured_as_training_tokenizes_it(tiny_tokenizer):
    profile = profile_csv(QA_CSV, tokenizer=tiny_tokenizer)

    assert (profile.rows, profile.columns, profile.task_type) == (15, ["question", "answer"], "qa")
    assert profile.plan == plan_columns(["question", "answer"], "qa")
    assert profile.roles() == {"question": "question", "answer": "answer"}
    assert profile.token_lengths == lengths_in_training(QA_CSV, profile.plan, tiny_tokenizer)
    assert profile.token_length_rows == list(range(1, 16))
    assert (profile.empty_rows, profile.duplicate_rows, profile.warnings) == ([], [], [])
    assert profile.trainable_rows == 15
    assert profile.steps_per_epoch == 2  # 15 rows in batches of 8
    assert profile.context_length == 256  # the tiny model's max_position_embeddings
    bars = profile.length_histogram()  # max_seq_length 512 is far past every row: the bars span the rows only
    assert bars[0][0] <= min(profile.token_lengths) and max(profile.token_lengths) < bars[-1][1] < 512
    assert sum(count for _, _, count in bars) == 15 and len(bars) <= 25


def test_lengths_are_measured_before_truncation_and_cut_rows_are_those_training_cuts(tiny_tokenizer):
    limit = sorted(profile_csv(QA_CSV, tokenizer=tiny_tokenizer).token_lengths)[7]  # the median row's
    profile = profile_csv(QA_CSV, tokenizer=tiny_tokenizer, max_seq_length=limit)
    in_training = build_examples(read_rows(QA_CSV), profile.plan, tiny_tokenizer, limit)

    assert profile.token_lengths == lengths_in_training(QA_CSV, profile.plan, tiny_tokenizer)
    cut = next(warning for warning in profile.warnings if "will be cut" in warning.message)
    assert 0 < len(cut.rows) == in_training.truncated < 8
    assert all(profile.token_lengths[row - 1] > limit for row in cut.rows)
    longer = in_training.truncated + in_training.skipped_too_long
    assert profile.over_max_share == pytest.approx(longer / 15)
    assert profile.trainable_rows == len(in_training.examples)
    assert f"longer than max_seq_length {limit} tokens" in cut.message
    assert f"max_seq_length {profile.suggested_max_seq_length} fits 100% of the rows" in cut.message


def test_a_row_whose_question_fills_max_seq_length_is_reported_as_skipped(tmp_path, tiny_tokenizer):
    path = write(
        tmp_path / "long_question.csv",
        "question,answer\nShort?,Yes it is.\n" + "Why " * 60 + "?,Because.\nAnother?,Another one.\n",
    )
    profile = profile_csv(path, tokenizer=tiny_tokenizer, max_seq_length=32, batch_size=1)
    skipped_in_training = build_examples(read_rows(path), profile.plan, tiny_tokenizer, 32).skipped_too_long

    assert skipped_in_training == 1
    assert profile.trainable_rows == 2
    assert profile.steps_per_epoch == 2
    assert any(w.rows == [2] and "the question alone fills max_seq_length 32" in w.message for w in profile.warnings)


def test_a_text_file_is_not_qa_and_its_lengths_include_the_end_of_sequence_token(tiny_tokenizer):
    profile = profile_csv(TEXT_CSV, tokenizer=tiny_tokenizer)

    assert (profile.rows, profile.task_type, profile.plan) == (3, "not_qa", ColumnPlan("not_qa", text="text"))
    assert profile.token_lengths == lengths_in_training(TEXT_CSV, profile.plan, tiny_tokenizer)
    first = read_rows(TEXT_CSV)[0]["text"]
    assert profile.token_lengths[0] == len(tiny_tokenizer(first)["input_ids"]) + 1


def test_the_alpaca_layout_uses_the_same_roles_as_a_job(tiny_tokenizer):
    path = DATA / "instruction_input_output.csv"
    profile = profile_csv(path, tokenizer=tiny_tokenizer)

    assert profile.roles() == {"Instruction": "question", "Input": "context", "Output": "answer"}
    assert profile.token_lengths == lengths_in_training(path, profile.plan, tiny_tokenizer)


def test_column_mapping_and_an_explicit_task_type_are_honoured(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "notes.csv", "title,body\nFerns,Water them on Tuesdays.\nCactus,Never water it.\n")

    undetected = profile_csv(path, model=str(tmp_path / "no-model"))  # no plan: no tokenizer is loaded
    assert (undetected.task_type, undetected.plan, undetected.token_lengths) == (None, None, [])
    assert [w.message.split(",")[0] for w in undetected.warnings] == [
        "The dataset does not fit task_type 'qa'",
        "The dataset does not fit task_type 'not_qa'",
    ]
    assert all("Columns found: 'title', 'body'" in w.message for w in undetected.warnings)

    mapped = profile_csv(path, column_mapping={"text": "body"}, tokenizer=tiny_tokenizer)
    assert (mapped.task_type, mapped.roles()) == ("not_qa", {"body": "text"})

    wrong = profile_csv(QA_CSV, task_type="not_qa", tokenizer=tiny_tokenizer)
    assert (wrong.task_type, wrong.plan) == ("not_qa", None)
    [warning] = wrong.warnings
    assert "it has no text column" in warning.message


def test_empty_and_duplicate_rows_are_numbered_from_the_first_row_after_the_header(messy_csv, tiny_tokenizer):
    profile = profile_csv(messy_csv, tokenizer=tiny_tokenizer, batch_size=2)

    assert profile.rows == 6
    assert profile.empty_rows == [2, 5]
    assert profile.duplicate_rows == [4]
    skipped = build_examples(read_rows(messy_csv), profile.plan, tiny_tokenizer, 512).skipped_empty
    assert len(profile.empty_rows) == skipped
    assert profile.token_length_rows == [1, 3, 4, 6]
    messages = {tuple(w.rows): w.message for w in profile.warnings}
    assert messages[(2, 5)].startswith(
        "2 rows have an empty question or answer and are skipped in training: rows 2 and 5."
    )
    assert messages[(4,)].startswith("1 row repeats an earlier row exactly")
    assert "shorter than 3 characters: row 6" in messages[(6,)]
    question, answer = profile.column_stats
    assert (question.name, question.empty, question.min_chars, question.max_chars) == ("question", 1, 10, 19)
    assert (answer.empty, answer.min_chars, answer.max_chars) == (1, 2, 31)
    assert profile.trainable_rows == 4
    assert profile.steps_per_epoch == 2


def test_steps_per_epoch_follow_the_batch_size_and_the_validation_split(tiny_tokenizer):
    assert profile_csv(QA_CSV, tokenizer=tiny_tokenizer, batch_size=4).steps_per_epoch == 4  # 15 rows
    held_out = profile_csv(QA_CSV, tokenizer=tiny_tokenizer, batch_size=4, validation_split=0.2)
    assert held_out.steps_per_epoch == 3  # 3 rows validate, 12 train
    small = profile_csv(TEXT_CSV, tokenizer=tiny_tokenizer)
    assert small.steps_per_epoch == 1
    assert any("Only 3 rows to train on, fewer than batch_size 8" in w.message for w in small.warnings)


def test_a_dataset_a_job_cannot_train_on_says_why(tmp_path, tiny_tokenizer):
    empty = write(tmp_path / "empty.csv", "question,answer\nA?,\nB?, \n")
    profile = profile_csv(empty, tokenizer=tiny_tokenizer)
    assert (profile.trainable_rows, profile.steps_per_epoch) == (0, 0)
    assert any(w.message.startswith("A job cannot train on this dataset: no usable rows") for w in profile.warnings)

    one = write(tmp_path / "one.csv", "question,answer\nA question?,An answer.\n")
    profile = profile_csv(one, tokenizer=tiny_tokenizer, validation_split=0.1)
    assert profile.steps_per_epoch == 0
    assert any("validation_split 0.1 needs at least 2 usable rows" in w.message for w in profile.warnings)

    one_fits = write(tmp_path / "one_fits.csv", "question,answer\nShort?,Yes.\n" + "Why " * 60 + "?,Because.\n")
    profile = profile_csv(one_fits, tokenizer=tiny_tokenizer, max_seq_length=32, validation_split=0.1)
    assert (profile.trainable_rows, profile.steps_per_epoch) == (1, 0)
    assert any("needs at least 2 usable rows" in w.message and "has 1" in w.message for w in profile.warnings)


def test_the_suggested_length_covers_nearly_every_row_and_stays_within_the_model(tmp_path, tiny_tokenizer):
    rows = [f"Note {i}: " + "the ferry crosses the bay " * (3 + i % 5) for i in range(150)]
    outlier = "the lighthouse keeper writes a very long entry " * 30
    one_long = pd.DataFrame({"text": rows + [outlier]})
    profile = profile_csv(one_long, tokenizer=tiny_tokenizer)
    usual = max(profile.token_lengths[:-1])
    assert profile.token_lengths[-1] > profile.suggested_max_seq_length >= usual
    assert profile.suggested_max_seq_length % 64 == 0 and profile.suggested_max_seq_length - usual < 64

    many_long = pd.DataFrame({"text": rows[:10] + [outlier] * 10})
    assert max(profile_csv(many_long, tokenizer=tiny_tokenizer).token_lengths) > 256
    assert profile_csv(many_long, tokenizer=tiny_tokenizer).suggested_max_seq_length == 256  # the context


def test_a_dataframe_is_profiled_as_the_csv_an_upload_of_it_would_be(tmp_path, tiny_tokenizer):
    frame = pd.DataFrame({"question": ["What is 2+2?", "Name a colour.", None], "answer": [4, float("nan"), "Blue."]})
    path = tmp_path / "frame.csv"
    frame.to_csv(path, index=False)

    from_frame = profile_csv(frame, tokenizer=tiny_tokenizer)
    assert from_frame.empty_rows == [2, 3]
    assert from_frame.token_lengths == lengths_in_training(path, from_frame.plan, tiny_tokenizer)
    assert from_frame.to_dict() == profile_csv(path, tokenizer=tiny_tokenizer).to_dict()


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("ragged.csv", "question,answer\nq1,a1\nq2,a2,extra\n", ["line 3", "3 fields"]),
        ("notes.txt", "question,answer\nq,a\n", [".csv"]),
        ("empty.csv", "", ["empty"]),
    ],
)
def test_a_file_the_server_would_refuse_raises_the_same_error(tmp_path, tiny_tokenizer, name, content, words):
    with pytest.raises(DatasetError) as error:
        profile_csv(write(tmp_path / name, content), tokenizer=tiny_tokenizer)
    assert all(word in error.value.message for word in words)


def test_settings_out_of_a_jobs_range_and_embedding_models_are_refused():
    with pytest.raises(ValidationError, match="max_seq_length"):
        profile_csv(QA_CSV, max_seq_length=0)
    with pytest.raises(InvalidRequestError, match="embedding model"):
        profile_csv(QA_CSV, model=DEFAULT_EMBEDDING_MODEL)


def test_a_model_directory_gives_its_own_tokenizer(tiny_model_dir, tiny_tokenizer):
    profile = profile_csv(QA_CSV, model=str(tiny_model_dir))
    assert profile.model == str(tiny_model_dir)
    assert profile.token_lengths == profile_csv(QA_CSV, tokenizer=tiny_tokenizer).token_lengths


def test_the_notebook_view_shows_the_numbers_and_escapes_the_data(tmp_path, tiny_tokenizer):
    path = write(
        tmp_path / "html.csv",
        "question,answer,<b>notes</b>\nWhere?,Here and there.,x\nWhere?,Here and there.,x\nWhy?,,y\n",
    )
    limit = profile_csv(path, tokenizer=tiny_tokenizer).token_lengths[0] - 1  # answers lose their last token
    profile = profile_csv(path, tokenizer=tiny_tokenizer, max_seq_length=limit, batch_size=2)
    html = profile._repr_html_()

    for shown in (
        "3 rows",
        "qa",
        f"<b>{profile.suggested_max_seq_length}</b>",
        f"<b>{profile.steps_per_epoch}</b>",
        f"max {max(profile.token_lengths)}",
        "&lt;b&gt;notes&lt;/b&gt;",
        "(row 2)",
        "(row 3)",
        "Rows are numbered from 1",
    ):
        assert shown in html, shown
    assert "<b>notes</b>" not in html
    assert html.count("<li") == len(profile.warnings) == 3  # duplicate, empty, cut
    bars = profile.length_histogram()
    assert sum(count for _, _, count in bars) == 2 and bars[-1][1] > max(limit, *profile.token_lengths)
    assert [start for start, _, count in bars if count] == [limit + 1]  # a bar starts right past the cut-off
    assert html.count("background:#e45756") == 1  # drawn as cut
    assert html.count('<td title="') == len(bars)
    assert json.loads(json.dumps(profile.to_dict()))["plan"]["answer"] == "answer"
    assert "suggested_max_seq_length=" in repr(profile)
    # row 1 as training sees it, cut at max_seq_length: the answer highlighted but for its lost last token
    assert profile.example_row == 1
    assert "".join(piece for piece, trained in profile.example if trained) == "Here and there."
    assert "".join(piece for piece, _ in profile.example).startswith("<|im_start|>user\nWhere?<|im_end|>")
    assert "Row 1 as training sees it" in html and 'border-radius:2px">Here and there.</span>' in html


def test_the_server_refuses_a_job_the_profile_says_cannot_train(tmp_path, tiny_model_dir):
    catalogue = Catalogue()
    catalogue.register(ModelEntry("tiny", "chat", f"dir:{tiny_model_dir}", owned_by="test"))
    app = create_app(
        Settings(home=tmp_path / "home", max_running_jobs=0), ModelRegistry(), close_registry=False, catalogue=catalogue
    )
    with TestClient(app) as client:

        def job_on(csv: str, **hyperparameters):
            upload = client.post("/v1/fine-tuning/datasets", files={"file": ("d.csv", csv.encode(), "text/csv")})
            return client.post(
                "/v1/fine-tuning/jobs",
                json={
                    "base_model": "tiny",
                    "dataset_id": upload.json()["id"],
                    "task_type": "qa",
                    "hyperparameters": hyperparameters,
                },
            )

        refused = job_on("question,answer\nA?,\nB?, \n")
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "dataset_id"
        assert (
            "no usable rows: each of its 2 rows has an empty question or answer (rows 1-2)"
            in refused.json()["error"]["message"]
        )
        one_row = job_on("question,answer\nA?,B.\n", validation_split=0.5)
        assert "validation_split 0.5 needs at least 2 usable rows" in one_row.json()["error"]["message"]
        assert job_on("question,answer\nA?,B.\n").status_code == 201
        assert job_on("question,answer\nA?,B.\nC?,D.\n", validation_split=0.5).status_code == 201
