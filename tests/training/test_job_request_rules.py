"""The rules a job request meets on its own, which the server and the notebook form both apply."""

from __future__ import annotations

from qubrid_lab.data.columns import ColumnPlan
from qubrid_lab.training.hyperparameters import Hyperparameters
from qubrid_lab.training.job_request_rules import check_request_fields

QA = {
    "task_type": "qa",
    "dataset_id": "ds-1",
    "dataset_columns": ["question", "answer"],
    "column_mapping": None,
    "suffix": None,
    "hyperparameters": None,
}


def test_a_good_request_gets_its_column_plan_and_every_default():
    check = check_request_fields(**{**QA, "hyperparameters": {"epochs": 2}, "suffix": "facts.v2"})

    assert check.problems == []
    assert check.plan == ColumnPlan("qa", question="question", answer="answer")
    assert check.hyperparameters == Hyperparameters(epochs=2)


def test_every_problem_is_named_by_its_request_field_one_per_hyperparameter():
    check = check_request_fields(
        **{
            **QA,
            "hyperparameters": {"epochs": 0, "learning_rate": -1, "warp": 9, "load_best_at_end": True},
            "suffix": "bad suffix!",
        }
    )

    assert [name for name, _ in check.problems] == [
        "hyperparameters.epochs",
        "hyperparameters.learning_rate",
        "hyperparameters.warp",
        "suffix",
    ]
    assert dict(check.problems)["hyperparameters.epochs"] == "Input should be greater than or equal to 1 (got 0)"
    assert dict(check.problems)["suffix"].endswith("starting with a letter or digit (got 'bad suffix!')")
    assert check.hyperparameters is None


def test_the_task_type_must_fit_the_datasets_format_and_columns():
    unknown = check_request_fields(**{**QA, "task_type": "summarise"})
    assert unknown.problems == [("task_type", "must be 'qa', 'not_qa' or 'chat' (got 'summarise')")]
    jsonl = check_request_fields(**{**QA, "dataset_columns": ["messages"], "dataset_format": "jsonl"})
    assert jsonl.problems[0][0] == "task_type" and "dataset 'ds-1' is JSONL" in jsonl.problems[0][1]
    mapped = check_request_fields(**{**QA, "column_mapping": {"question": "nope"}})
    assert mapped.problems[0][0] == "column_mapping" and "nope" in mapped.problems[0][1] and mapped.plan is None
    unknown_columns = check_request_fields(**{**QA, "dataset_columns": None})
    assert unknown_columns.problems == [] and unknown_columns.plan is None


def test_settings_that_need_validation_data_are_refused_without_any():
    settings = {"early_stopping_patience": 2, "load_best_at_end": True}
    alone = check_request_fields(**{**QA, "hyperparameters": settings})
    assert [name for name, _ in alone.problems] == [
        "hyperparameters.early_stopping_patience",
        "hyperparameters.load_best_at_end",
    ]
    assert check_request_fields(**{**QA, "hyperparameters": settings}, validation_dataset=True).problems == []
    held_out = check_request_fields(**{**QA, "hyperparameters": {**settings, "validation_split": 0.1}})
    assert held_out.problems == []
