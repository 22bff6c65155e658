"""``HyperparameterForm``: every field of a fine-tuning job request, checked as you type.

The hyperparameter inputs, their defaults, ranges and help texts are built from the fields of
``qubrid_lab.training.hyperparameters.Hyperparameters``, and the request is checked by the server's own rules
(``qubrid_lab.training.job_request_rules``), so the form and the server can never disagree about what is
allowed, nor word a problem differently. ``form.value`` is the exact body of ``POST /v1/fine-tuning/jobs``;
``form.submit()`` sends it.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets
from pydantic.fields import FieldInfo

from qubrid_lab.data.columns import TASK_TYPES, plan_columns
from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.training.hyperparameters import TRACKERS, Hyperparameters
from qubrid_lab.training.job_request_rules import check_request_fields, missing_dataset_problem
from qubrid_lab.widgets._client import ServerError, connect
from qubrid_lab.widgets._fields import bounds, range_text, status_html

# Typed or picked: learning rates are compared by their order of magnitude, so the picks step 1-2-5 per decade.
LEARNING_RATES = ["1e-5", "2e-5", "5e-5", "1e-4", "2e-4", "5e-4", "1e-3", "2e-3", "5e-3"]

# Each preset starts from the Hyperparameters defaults and changes only what it names.
PRESETS: dict[str, dict[str, Any]] = {
    # checks the whole pipeline (data, training, serving the adapter) in a minute or two
    "quick test": {
        "epochs": 1,
        "max_steps": 10,
        "lora_rank": 8,
        "lora_alpha": 16,
        "batch_size": 4,
        "max_seq_length": 256,
    },
    # the defaults, with a tenth of the rows held out so the validation loss shows over-fitting
    "balanced": {"validation_split": 0.1},
    # more passes and a larger adapter on every linear layer, with a gentler, warmed-up learning rate
    "thorough": {
        "epochs": 5,
        "learning_rate": 1e-4,
        "lora_rank": 32,
        "lora_alpha": 64,
        "target_modules": "all-linear",
        "validation_split": 0.1,
        "warmup_ratio": 0.05,
        "max_seq_length": 1024,
    },
}

LABEL_STYLE = {"description_width": "170px"}
INPUT_LAYOUT = {"width": "440px"}


class FormError(ValueError):
    """The form has fields the server would refuse; ``errors`` maps each field to its problem."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{name}: {problem}" for name, problem in errors.items()))
        self.errors = errors


@dataclass
class _Field:
    """One input of the form: its widget, how to read and write its value, and its inline error."""

    widget: widgets.ValueWidget
    read: Callable[[], Any]
    write: Callable[[Any], None]
    error: widgets.HTML
    row: widgets.HBox


def _field(widget: widgets.ValueWidget, hint: str = "", *, read=None, write=None, extra=()) -> _Field:
    error = widgets.HTML()
    read = read or (lambda: widget.value)
    write = write or (lambda value: setattr(widget, "value", value))
    row = widgets.HBox([widget, *extra, widgets.HTML(f'<span style="color:#666">{hint}</span>'), error])
    return _Field(widget, read, write, error, row)


def _optional_int(text: str) -> int | str | None:
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return text  # Hyperparameters names the problem


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text.strip()


def _scientific(value: float | str) -> str:
    """A learning rate as people write them: ``2e-4``, ``3.5e-5``."""
    if isinstance(value, str):
        return value
    mantissa, exponent = f"{value:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _module_names(text: str) -> list[str] | str:
    text = text.strip()
    return text if text == "all-linear" else [name.strip() for name in text.split(",")]


def _column_mapping(text: str) -> dict[str, str] | str | None:
    """``question=prompt, answer=reply`` as a dict; text that is not ``role=column`` pairs comes back as is."""
    if not text.strip():
        return None
    pairs = [part.split("=") for part in text.split(",")]
    if any(len(pair) != 2 or not all(side.strip() for side in pair) for pair in pairs):
        return text
    return {role.strip(): column.strip() for role, column in pairs}


def _hyperparameter_field(name: str, info: FieldInfo) -> _Field:
    """An input for one Hyperparameters field, chosen by its type; its help text and range become the hint."""
    default = info.get_default(call_default_factory=True)
    options = {"description": name, "tooltip": info.description, "style": LABEL_STYLE, "layout": INPUT_LAYOUT}
    hint = range_text(Hyperparameters, name)
    args = set(typing.get_args(info.annotation))
    if name == "learning_rate":
        widget = widgets.Combobox(value=_scientific(default), options=LEARNING_RATES, ensure_option=False, **options)
        return _field(
            widget,
            f"{hint} (pick or type, e.g. 3e-4)",
            read=lambda: _number(widget.value),
            write=lambda value: setattr(widget, "value", _scientific(value)),
        )
    if info.annotation is bool:
        return _field(widgets.Checkbox(value=default, indent=True, **options), info.description)
    if name == "report_to":
        return _field(
            widgets.Dropdown(options=["none", *TRACKERS], value=default, **options),
            "the tracker's package must be installed on the server",
        )
    if info.annotation is int:
        return _field(widgets.IntText(value=default, **options), hint)
    if info.annotation is float:
        fraction = bounds(Hyperparameters, name).get("lt") == 1
        return _field(widgets.FloatText(value=default, step=0.05 if fraction else None, **options), hint)
    if isinstance(info.annotation, types.UnionType) and args == {int, type(None)}:
        # "(default: about 10 times per run)" at the end of a description says what leaving it empty does
        empty = info.description.partition("(default: ")[2].rstrip(").") or "no limit"
        widget = widgets.Text(value="" if default is None else str(default), placeholder="empty", **options)
        return _field(
            widget,
            f"{hint}; empty: {empty}",
            read=lambda: _optional_int(widget.value),
            write=lambda value: setattr(widget, "value", "" if value is None else str(value)),
        )
    if list[str] in args:
        widget = widgets.Text(value=", ".join(default), placeholder="q_proj, v_proj  or  all-linear", **options)
        return _field(
            widget,
            "comma-separated module names, or all-linear",
            read=lambda: _module_names(widget.value),
            write=lambda value: setattr(widget, "value", value if isinstance(value, str) else ", ".join(value)),
        )
    raise TypeError(f"HyperparameterForm has no input for {name}: {info.annotation}")


class HyperparameterForm(widgets.VBox):
    """A fine-tuning job request: base model and dataset from the server, task type, suffix, every hyperparameter.

    ``value`` is the exact ``POST /v1/fine-tuning/jobs`` body; ``errors`` maps each field the server would refuse
    to its problem (shown next to the field as you type); ``submit()`` (the "Create job" button) posts the
    value and returns the job, showing a refusal inline. ``fields`` maps every payload key to its input widget.
    """

    def __init__(
        self,
        server: Any = None,
        dataset_id: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
    ):
        self.api = connect(server, base_url, api_key)
        self.job: dict | None = None
        self._datasets: dict[str, dict] = {}

        self.base_model = widgets.Dropdown(
            description="base_model",
            style=LABEL_STYLE,
            layout=INPUT_LAYOUT,
            tooltip="A chat model loaded on the server.",
        )
        self.dataset = widgets.Dropdown(
            description="dataset_id",
            style=LABEL_STYLE,
            layout=INPUT_LAYOUT,
            tooltip="A CSV uploaded with POST /v1/fine-tuning/datasets.",
        )
        self.refresh_button = widgets.Button(
            icon="refresh", tooltip="Read models and datasets again", layout=widgets.Layout(width="36px")
        )
        self.task_type = widgets.Dropdown(
            options=TASK_TYPES,
            description="task_type",
            style=LABEL_STYLE,
            layout=INPUT_LAYOUT,
            tooltip="qa: question/answer pairs; not_qa: plain text.",
        )
        self.column_mapping = widgets.Text(
            description="column_mapping",
            style=LABEL_STYLE,
            layout=INPUT_LAYOUT,
            placeholder="question=my_prompt, answer=my_reply",
        )
        self.suffix = widgets.Text(
            description="suffix",
            style=LABEL_STYLE,
            layout=INPUT_LAYOUT,
            placeholder="e.g. facts",
            tooltip="Becomes part of the fine-tuned model id.",
        )
        self._job_fields = {
            "base_model": _field(self.base_model, "chat models on the server"),
            "dataset_id": _field(self.dataset, extra=[self.refresh_button]),
            "task_type": _field(self.task_type, "picked from the dataset's columns"),
            "column_mapping": _field(
                self.column_mapping,
                "optional: role=column, … (default: by column name)",
                read=lambda: _column_mapping(self.column_mapping.value),
                write=lambda value: setattr(
                    self.column_mapping,
                    "value",
                    ", ".join(f"{role}={column}" for role, column in (value or {}).items()),
                ),
            ),
            "suffix": _field(self.suffix, "optional: letters, digits, . _ -", read=lambda: self.suffix.value.strip()),
        }
        self._hyper_fields = {
            name: _hyperparameter_field(name, info) for name, info in Hyperparameters.model_fields.items()
        }
        self._all_fields = {**self._job_fields, **self._hyper_fields}
        self.fields = {name: field.widget for name, field in self._all_fields.items()}

        self.preset_buttons = {
            name: widgets.Button(description=name, tooltip=f"Apply the '{name}' preset") for name in PRESETS
        }
        self.submit_button = widgets.Button(description="Create job", button_style="primary", icon="play")
        self.status = widgets.HTML()
        self.errors: dict[str, str] = {}

        for name, button in self.preset_buttons.items():
            button.on_click(lambda _, preset=name: self.apply_preset(preset))
        self.refresh_button.on_click(lambda _: self.refresh())
        self.submit_button.on_click(self._on_submit)
        self.dataset.observe(self._on_dataset, "value")
        for field in self._all_fields.values():
            field.widget.observe(lambda _: self._check(), "value")

        super().__init__(
            [
                widgets.HTML("<b>Fine-tuning job</b>"),
                widgets.HBox([widgets.Label("Presets:"), *self.preset_buttons.values()]),
                *(field.row for field in self._job_fields.values()),
                widgets.HTML("<b>Hyperparameters</b> (hover a name for its meaning)"),
                *(field.row for field in self._hyper_fields.values()),
                widgets.HBox([self.submit_button, self.status]),
            ]
        )
        self.refresh(dataset_id)

    # --- reading and writing ------------------------------------------------------------------------------

    @property
    def value(self) -> dict[str, Any]:
        """The ``POST /v1/fine-tuning/jobs`` body the form describes (optional fields only when set)."""
        payload = {name: self._job_fields[name].read() for name in ("base_model", "dataset_id", "task_type")}
        payload["hyperparameters"] = {name: field.read() for name, field in self._hyper_fields.items()}
        for name in ("suffix", "column_mapping"):
            if self._job_fields[name].read():
                payload[name] = self._job_fields[name].read()
        return payload

    def update(self, **values: Any) -> None:
        """Set fields by payload name (``learning_rate=1e-4``, ``suffix="facts"``, ``dataset_id=...``)."""
        unknown = sorted(set(values) - set(self._all_fields))
        if unknown:
            raise TypeError(f"no such field: {', '.join(unknown)}; fields: {', '.join(self._all_fields)}")
        for name, value in values.items():
            self._all_fields[name].write(value)

    def apply_preset(self, name: str) -> None:
        """Reset the hyperparameters to their defaults, then apply preset ``name`` (see ``PRESETS``)."""
        defaults = {
            name: info.get_default(call_default_factory=True) for name, info in Hyperparameters.model_fields.items()
        }
        self.update(**{**defaults, **PRESETS[name]})
        self.status.value = status_html(f"Preset '{name}' applied.")

    def refresh(self, dataset_id: str | None = None) -> None:
        """Read the server's chat models and datasets again, keeping the choices that still exist."""
        try:
            models = self.api.chat_models(fine_tuned=False)
            datasets = self.api.datasets()
        except ServerError as exc:
            self.status.value = status_html(exc.message, "error")
            return
        wanted_model = self.base_model.value
        self.base_model.options = models
        self.base_model.value = wanted_model if wanted_model in models else next(iter(models), None)
        self._datasets = {dataset["id"]: dataset for dataset in datasets}
        wanted = dataset_id or self.dataset.value
        options = [(f"{d['name']} · {d['row_count']} rows · {d['id']}", d["id"]) for d in datasets]
        if wanted and wanted not in self._datasets:
            options.append((f"{wanted} (not on the server)", wanted))
        self.dataset.options = options
        self.dataset.value = wanted or next((value for _, value in options), None)
        self._check()

    # --- checking and submitting --------------------------------------------------------------------------

    def _on_dataset(self, change: dict) -> None:
        """Pick the task type the new dataset's columns fit, when the current one does not fit them."""
        dataset = self._datasets.get(change["new"])
        if dataset is None or self._fits(dataset, self.task_type.value):
            return
        fitting = [task for task in TASK_TYPES if self._fits(dataset, task)]
        if fitting:
            self.task_type.value = fitting[0]

    def _fits(self, dataset: dict, task_type: str) -> bool:
        mapping = self._job_fields["column_mapping"].read()
        try:
            plan_columns(dataset["columns"], task_type, mapping if isinstance(mapping, dict) else None)
        except InvalidRequestError:
            return False
        return True

    def _check(self) -> dict[str, str]:
        """Find every problem the server would report, in its words, show each next to its field, and return them.

        The request's own rules are the server's (``check_request_fields``); whether the model and dataset exist
        is read from the server's lists, and only the server knows the rest (its catalogue, its packages).
        """
        payload = self.value
        errors: dict[str, str] = {}
        if not payload["base_model"]:
            errors["base_model"] = "the server has no chat model loaded"
        dataset = self._datasets.get(payload["dataset_id"])
        if not payload["dataset_id"]:
            errors["dataset_id"] = "no dataset yet: upload a CSV (DatasetProfiler or POST /v1/fine-tuning/datasets)"
        elif dataset is None:
            errors["dataset_id"] = missing_dataset_problem(payload["dataset_id"])[1]
        mapping = self._job_fields["column_mapping"].read()
        if isinstance(mapping, str):
            errors["column_mapping"] = "write role=column pairs separated by commas, e.g. question=prompt, answer=reply"
        check = check_request_fields(
            task_type=payload["task_type"],
            hyperparameters=payload["hyperparameters"],
            suffix=payload.get("suffix"),
            column_mapping=mapping if isinstance(mapping, dict) else None,
            dataset_id=payload["dataset_id"],
            dataset_columns=dataset["columns"] if dataset is not None and not isinstance(mapping, str) else None,
        )
        for name, problem in check.problems:
            name = self._field_name(name)
            errors[name] = f"{errors[name]}; {problem}" if name in errors else problem
        self._show(errors)
        return errors

    def _field_name(self, name: str) -> str:
        """The form's field for a request field: ``hyperparameters.target_modules[0]`` is ``target_modules``."""
        name = name.removeprefix("hyperparameters.").split("[")[0].split(".")[0]
        return name if name in self._all_fields else "task_type"

    def _show(self, errors: dict[str, str]) -> None:
        self.errors = errors
        for name, field in self._all_fields.items():
            field.error.value = status_html(errors.get(name, ""), "error")

    def submit(self) -> dict:
        """Create the job the form describes and return it (as the server sends it).

        Raises ``FormError`` when fields are wrong (each shown next to its field, nothing sent) and
        ``ServerError`` when the server refuses the request (its message shown at the field it names).
        """
        errors = self._check()
        if errors:
            self.status.value = status_html(f"Fix the {len(errors)} field(s) marked in red first.", "error")
            raise FormError(errors)
        try:
            self.job = self.api.post("/v1/fine-tuning/jobs", json=self.value)
        except ServerError as exc:
            field = (exc.param or "").split(".")[-1]
            if field in self._all_fields:
                self._show({field: exc.message})
            self.status.value = status_html(exc.message, "error")
            raise
        self.status.value = status_html(
            f"Created {self.job['id']} ({self.job['status']}). "
            f'Follow it: TrainingMonitor(server, job_id="{self.job["id"]}")',
            "ok",
        )
        return self.job

    def _on_submit(self, _button) -> None:
        try:
            self.submit()
        except (FormError, ServerError):
            pass  # already shown next to the fields and in the status line
