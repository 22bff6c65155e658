"""HyperparameterForm: choices read from the server, presets, inline errors, and the exact request it sends."""

from __future__ import annotations

import html

import pytest

from qubrid_lab.settings import DEFAULT_EMBEDDING_MODEL
from qubrid_lab.training.hyperparameters import Hyperparameters
from qubrid_lab.widgets import FormError, HyperparameterForm, ServerError
from qubrid_lab.widgets.form import PRESETS
from tests.widgets.conftest import TEXT_NOTES, upload

DEFAULTS = Hyperparameters().model_dump()


def job_count(server) -> int:
    return server.http.get("/v1/fine-tuning/jobs").json()["total"]


def test_the_form_offers_the_servers_chat_models_and_datasets(server, chat_model, facts_dataset):
    notes = upload(server, TEXT_NOTES)
    form = HyperparameterForm(server, dataset_id=facts_dataset["id"])

    assert form.base_model.options == (chat_model,)  # no embedding model, no fine-tuned model
    assert DEFAULT_EMBEDDING_MODEL in [model.id for model in server.client.models.list()]
    assert {facts_dataset["id"], notes["id"]} <= {value for _, value in form.dataset.options}
    assert form.value == {
        "base_model": chat_model,
        "dataset_id": facts_dataset["id"],
        "task_type": "qa",
        "hyperparameters": DEFAULTS,
    }
    assert form.errors == {}

    form.dataset.value = notes["id"]  # a text-only dataset: the task type follows its columns
    assert form.value["task_type"] == "not_qa" and form.errors == {}


def test_presets_and_typed_values_make_the_payload(server, facts_dataset):
    form = HyperparameterForm(server, dataset_id=facts_dataset["id"])
    for name, preset in PRESETS.items():
        form.preset_buttons[name].click()
        assert form.value["hyperparameters"] == Hyperparameters(**{**DEFAULTS, **preset}).model_dump()
        assert form.errors == {}

    form.update(max_steps=7, learning_rate=3e-4, target_modules=["q_proj", "v_proj"], suffix="facts")
    form.fields["eval_steps"].value = " 2 "
    form.fields["column_mapping"].value = "question = question, answer=answer"
    form.fields["gradient_checkpointing"].value = True
    value = form.value
    assert value["suffix"] == "facts" and value["column_mapping"] == {"question": "question", "answer": "answer"}
    assert {
        key: value["hyperparameters"][key]
        for key in ("max_steps", "learning_rate", "target_modules", "eval_steps", "gradient_checkpointing")
    } == {
        "max_steps": 7,
        "learning_rate": 3e-4,
        "target_modules": ["q_proj", "v_proj"],
        "eval_steps": 2,
        "gradient_checkpointing": True,
    }

    form.fields["max_steps"].value = ""
    assert form.value["hyperparameters"]["max_steps"] is None and form.errors == {}


def test_bad_values_are_shown_next_to_their_fields_and_nothing_is_sent(server, facts_dataset):
    form = HyperparameterForm(server, dataset_id=facts_dataset["id"])
    before = job_count(server)

    form.fields["learning_rate"].value = "0"
    assert "greater than 0" in form.errors["learning_rate"]
    assert "greater than 0" in form._hyper_fields["learning_rate"].error.value
    form.fields["target_modules"].value = "q_proj, "
    form.fields["max_steps"].value = "ten"
    form.fields["validation_split"].value = 1.0
    form.fields["suffix"].value = "no spaces please"
    form.fields["column_mapping"].value = "question"
    assert set(form.errors) == {
        "learning_rate",
        "target_modules",
        "max_steps",
        "validation_split",
        "suffix",
        "column_mapping",
    }
    assert all(
        html.unescape(form._all_fields[name].error.value).endswith(f"{problem}</span>")
        for name, problem in form.errors.items()
    )

    form.submit_button.click()
    assert "6 field(s)" in form.status.value
    with pytest.raises(FormError) as refused:
        form.submit()
    assert set(refused.value.errors) == set(form.errors)
    assert job_count(server) == before

    form.fields["learning_rate"].value = "1e-4"
    assert "learning_rate" not in form.errors and form._hyper_fields["learning_rate"].error.value == ""


def test_a_request_the_server_refuses_shows_its_message_at_the_field(server, facts_dataset):
    form = HyperparameterForm(server, dataset_id=facts_dataset["id"])
    form.base_model.options = [*form.base_model.options, "no-such/model"]
    form.base_model.value = "no-such/model"
    assert form.errors == {}  # only the server knows its catalogue

    with pytest.raises(ServerError) as refused:
        form.submit()
    assert refused.value.status == 400
    assert "not in the model catalogue" in form.errors["base_model"]
    assert "not in the model catalogue" in form.status.value and form.job is None

    missing = HyperparameterForm(server, dataset_id="ds-missing")
    assert "no dataset 'ds-missing'" in missing.errors["dataset_id"]


def test_the_form_words_each_problem_as_the_server_does(server, facts_dataset):
    form = HyperparameterForm(server, dataset_id=facts_dataset["id"])
    bad_values = {"learning_rate": "0", "target_modules": "q_proj, ", "suffix": "no spaces please"}
    needs_validation_data = {"early_stopping_patience": "2", "load_best_at_end": True, "suffix": ""}
    for values in (bad_values, needs_validation_data):
        for name, value in values.items():
            form.fields[name].value = value
        assert set(form.errors) == {name for name, value in values.items() if value}

        refused = server.http.post("/v1/fine-tuning/jobs", json=form.value)
        assert refused.status_code == 400
        message = refused.json()["error"]["message"]
        for name, problem in form.errors.items():
            assert f"{name if name == 'suffix' else 'hyperparameters.' + name}: {problem}" in message, message
        form.apply_preset("quick test")  # every hyperparameter valid again, no validation data
