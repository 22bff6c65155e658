"""Column planning: which columns a qa / not_qa job trains on, column_mapping, and the errors users see."""

from __future__ import annotations

import pytest

from qubrid_lab.data.columns import ColumnError, ColumnPlan, plan_columns
from qubrid_lab.errors import InvalidRequestError


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["question", "answer"], ColumnPlan("qa", question="question", answer="answer")),
        (["prompt", "completion"], ColumnPlan("qa", question="prompt", answer="completion")),
        (["prompt", "response"], ColumnPlan("qa", question="prompt", answer="response")),
        (["question", "response"], ColumnPlan("qa", question="question", answer="response")),
        (["query", "response"], ColumnPlan("qa", question="query", answer="response")),
        (["instruction", "output"], ColumnPlan("qa", question="instruction", answer="output")),
        (
            ["instruction", "input", "output"],
            ColumnPlan("qa", question="instruction", answer="output", context="input"),
        ),
        (["input", "output"], ColumnPlan("qa", question="input", answer="output")),
        (
            ["id", "context", "question", "answer"],
            ColumnPlan("qa", question="question", answer="answer", context="context"),
        ),
        ([" Question ", "ANSWER", "notes"], ColumnPlan("qa", question=" Question ", answer="ANSWER")),
        (
            ["Instruction", "Input", "Output"],
            ColumnPlan("qa", question="Instruction", answer="Output", context="Input"),
        ),
    ],
)
def test_qa_columns_are_found_by_common_names(columns, expected):
    assert plan_columns(columns, "qa") == expected


def test_earlier_names_win_when_several_are_present():
    plan = plan_columns(["prompt", "question", "output", "answer"], "qa")

    assert (plan.question, plan.answer) == ("question", "answer")


@pytest.mark.parametrize(
    ("columns", "text"),
    [
        (["text"], "text"),
        (["id", "Content"], "Content"),
        (["document", "text"], "text"),
        (["Document"], "Document"),
    ],
)
def test_not_qa_uses_the_text_column(columns, text):
    assert plan_columns(columns, "not_qa") == ColumnPlan("not_qa", text=text)


def test_column_mapping_overrides_the_names():
    plan = plan_columns(["Frage", "Antwort", "question", "answer"], "qa", {"question": "frage", "answer": "Antwort"})

    assert plan == ColumnPlan("qa", question="Frage", answer="Antwort")


def test_partial_mapping_keeps_finding_the_other_roles():
    plan = plan_columns(["body", "answer", "background"], "qa", {"question": "body", "context": "background"})

    assert plan == ColumnPlan("qa", question="body", answer="answer", context="background")


def test_a_column_mapped_to_one_role_is_not_found_again_for_another():
    plan = plan_columns(["answer", "reply", "response"], "qa", {"question": "answer"})

    assert plan == ColumnPlan("qa", question="answer", answer="response")


def test_not_qa_mapping_names_the_text_column():
    assert plan_columns(["body"], "not_qa", {"text": "body"}) == ColumnPlan("not_qa", text="body")


def column_error(*args) -> ColumnError:
    with pytest.raises(ColumnError) as caught:
        plan_columns(*args)
    assert isinstance(caught.value, InvalidRequestError) and caught.value.status_code == 400
    return caught.value


def test_missing_qa_columns_list_the_columns_found_and_the_names_accepted():
    error = column_error(["title", "body"], "qa")

    assert error.param == "task_type"
    assert "it has no question column; it has no answer column" in error.message
    assert "Columns found: 'title', 'body'" in error.message
    assert "question: question, prompt, instruction, query, input" in error.message
    assert "answer: answer, completion, response, output" in error.message
    assert "context (optional): context, input" in error.message
    assert 'column_mapping extension, e.g. {"question": ' in error.message


def test_qa_with_only_a_question_reports_the_missing_answer():
    error = column_error(["question", "notes"], "qa")

    assert "no answer column" in error.message and "no question column" not in error.message


def test_missing_text_column_for_not_qa():
    error = column_error(["question", "answer"], "not_qa")

    assert "task_type 'not_qa', which needs a text column: it has no text column" in error.message
    assert "text: text, content, document" in error.message
    assert "'question', 'answer'" in error.message and '{"text": ' in error.message


def test_unknown_task_type_names_the_allowed_values():
    error = column_error(["text"], "summarise")

    assert error.param == "task_type"
    assert error.message == "task_type must be one of qa, not_qa, chat; got 'summarise'."


def test_mapping_problems_are_all_reported_at_once():
    error = column_error(["q", "a"], "qa", {"question": "missing", "text": "q", "answer": "a"})

    assert error.param == "column_mapping"
    assert "column_mapping maps 'question' to 'missing', which is not a column of the dataset" in error.message
    assert "column_mapping key 'text' is not a role of task_type 'qa' (use question, answer, context)" in error.message
    assert "no question column" not in error.message
    assert "Columns found: 'q', 'a'" in error.message


def test_mapping_two_roles_to_one_column_is_rejected():
    error = column_error(["q", "a"], "qa", {"question": "q", "answer": "Q"})

    assert "maps both 'question' and 'answer' to column 'Q'" in error.message


def test_mapping_a_value_that_is_not_a_name_is_rejected():
    error = column_error(["text"], "not_qa", {"text": 3})

    assert "maps 'text' to 3, which is not a column" in error.message
