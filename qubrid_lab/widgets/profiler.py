"""``DatasetProfiler``: pick or upload a CSV, see what a fine-tuning job would make of it, send it to the server.

The report is the profile's own notebook view (``DatasetProfile._repr_html_``: summary, column roles and
sizes, the token-length histogram with the ``max_seq_length`` cut-off, warnings with row numbers), so the
widget and ``profile_csv(...)`` in a cell always show the same thing. The inputs are the settings the
profile depends on; changing one profiles the file again.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ipywidgets as widgets
from pydantic import ValidationError

from qubrid_lab.errors import QubridError
from qubrid_lab.settings import DEFAULT_CHAT_MODEL
from qubrid_lab.training.dataset_profile import DatasetProfile, profile_csv
from qubrid_lab.training.hyperparameters import Hyperparameters
from qubrid_lab.widgets._client import ServerError, connect, error_text
from qubrid_lab.widgets._fields import range_text, status_html

LABEL_STYLE = {"description_width": "120px"}
SETTINGS = ("max_seq_length", "batch_size", "validation_split")  # Hyperparameters fields the profile uses


def _validation_text(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors())


class DatasetProfiler(widgets.VBox):
    """Profile a CSV (uploaded in the browser, or a path on the kernel's machine) and upload it as a dataset.

    ``profile`` is the latest ``DatasetProfile`` (None until a file is profiled); ``dataset`` the server's
    dataset object once "Upload to server" succeeded. ``model`` (a catalogue id or model directory) or
    ``tokenizer`` decides how rows are counted in tokens; without a ``server`` the upload button stays off.
    """

    def __init__(
        self,
        server: Any = None,
        model: str = DEFAULT_CHAT_MODEL,
        path: str | Path | None = None,
        *,
        task_type: str | None = None,
        tokenizer=None,
        base_url: str | None = None,
        api_key: str | None = None,
    ):
        self.api = connect(server, base_url, api_key) if server is not None or base_url else None
        self.model = model
        self.tokenizer = tokenizer
        self.profile: DatasetProfile | None = None
        self.dataset: dict | None = None
        self._source: tuple[str, bytes] | Path | None = None
        self._folder = tempfile.TemporaryDirectory(prefix="qubrid-lab-profiler-")

        self.upload = widgets.FileUpload(accept=".csv", multiple=False, description="Upload CSV")
        self.path = widgets.Text(
            value=str(path or ""),
            description="or a path",
            placeholder="data/train.csv",
            style=LABEL_STYLE,
            layout=widgets.Layout(width="420px"),
        )
        self.profile_button = widgets.Button(description="Profile", icon="search")
        self.task_type = widgets.Dropdown(
            options=[("detect", None), ("qa", "qa"), ("not_qa", "not_qa")],
            value=task_type,
            description="task_type",
            style=LABEL_STYLE,
        )
        self.settings = {name: self._setting(name) for name in SETTINGS}
        self.dataset_name = widgets.Text(
            description="dataset name",
            placeholder="default: the file's name",
            style=LABEL_STYLE,
            layout=widgets.Layout(width="420px"),
        )
        self.upload_button = widgets.Button(
            description="Upload to server", icon="cloud-upload", button_style="primary", disabled=True
        )
        self.status = widgets.HTML()
        self.report = widgets.HTML()

        self.upload.observe(self._on_file, "value")
        self.profile_button.on_click(lambda _: self._on_path())
        for widget in (self.task_type, *self.settings.values()):
            widget.observe(lambda _: self._profile_again(), "value")
        self.upload_button.on_click(lambda _: self._on_upload())
        super().__init__(
            [
                widgets.HBox([self.upload, self.path, self.profile_button]),
                widgets.HBox([self.task_type, self.settings["max_seq_length"]]),
                widgets.HBox([self.settings["batch_size"], self.settings["validation_split"]]),
                self.report,
                widgets.HBox([self.dataset_name, self.upload_button]),
                self.status,
            ]
        )
        if path:
            self._on_path()

    @staticmethod
    def _setting(name: str) -> widgets.ValueWidget:
        info = Hyperparameters.model_fields[name]
        kind = widgets.IntText if info.annotation is int else widgets.FloatText
        return kind(
            value=info.default,
            description=name,
            style=LABEL_STYLE,
            tooltip=f"{info.description} ({range_text(Hyperparameters, name)})",
        )

    # --- profiling ----------------------------------------------------------------------------------------

    def run(self, source: str | Path | None = None) -> DatasetProfile | None:
        """Profile ``source`` (a CSV path; default: the file chosen last) with the current settings.

        The profile is shown and returned; a file that cannot be profiled shows why and returns None.
        """
        if source is not None:
            self._source = Path(source).expanduser()
            self.dataset = None
        if self._source is None:
            self.status.value = status_html("Upload a CSV or type its path first.", "error")
            return None
        path = self._source if isinstance(self._source, Path) else self._written(*self._source)
        self.profile, self.report.value = None, ""
        self.upload_button.disabled = self.api is None  # the server has the last word on a file, so always allowed
        try:
            self.profile = profile_csv(
                path,
                self.model,
                self.task_type.value,
                tokenizer=self.tokenizer,
                **{name: widget.value for name, widget in self.settings.items()},
            )
        except ValidationError as exc:
            self.status.value = status_html(_validation_text(exc), "error")
        except (QubridError, OSError) as exc:
            self.status.value = status_html(error_text(exc), "error")
        else:
            self.report.value = self.profile._repr_html_()
            self.status.value = status_html(f"Profiled {self.source_name} with the tokenizer of {self.profile.model}.")
        return self.profile

    @property
    def source_name(self) -> str | None:
        """The chosen file's name."""
        if self._source is None:
            return None
        return self._source.name if isinstance(self._source, Path) else self._source[0]

    def _written(self, name: str, content: bytes) -> Path:
        """An uploaded file's bytes as a file on disk, for the CSV reader."""
        path = Path(self._folder.name) / Path(name).name
        path.write_bytes(content)
        return path

    def _on_file(self, change: dict) -> None:
        if not change["new"]:
            return
        uploaded = change["new"][0]
        self._source = (uploaded["name"], bytes(uploaded["content"]))
        self.dataset = None
        self.run()

    def _on_path(self) -> None:
        if not self.path.value.strip():
            self.status.value = status_html("Type the path of a CSV file on this machine.", "error")
            return
        self.run(self.path.value.strip())

    def _profile_again(self) -> None:
        if self._source is not None:
            self.run()

    # --- uploading ----------------------------------------------------------------------------------------

    def send(self, name: str | None = None) -> dict:
        """Upload the profiled file as a dataset (``POST /v1/fine-tuning/datasets``) and return the server's object.

        ``name`` (default: the name box, else the file name) is the dataset's display name. Raises
        ``ServerError`` (also shown in the status line) when the server refuses the file.
        """
        if self.api is None or self._source is None:
            raise ValueError("nothing to upload: " + ("no server given" if self.api is None else "no file chosen"))
        if name is not None:
            self.dataset_name.value = name
        content = self._source.read_bytes() if isinstance(self._source, Path) else self._source[1]
        try:
            self.dataset = self.api.api_client.datasets.upload(
                content, self.dataset_name.value.strip() or None, filename=self.source_name
            )
        except ServerError as exc:
            self.status.value = status_html(f"Upload refused: {exc.message}", "error")
            raise
        self.status.value = status_html(
            f"Uploaded as {self.dataset['id']} ('{self.dataset['name']}', {self.dataset['row_count']} rows). "
            f'Next: HyperparameterForm(server, dataset_id="{self.dataset["id"]}")',
            "ok",
        )
        return self.dataset

    def _on_upload(self) -> None:
        try:
            self.send()
        except ServerError:
            pass  # shown in the status line
