"""``TrainingMonitor``: follow a fine-tuning job live, from this notebook or started anywhere else.

A background thread follows the job with ``qubrid_lab.Client.jobs.follow`` (each poll reads the job and only
the events that are new, and measures the pace and the time left), so the kernel stays free for other cells;
it stops when the job ends or the widget is closed.

When the job ends, the monitor's cell also gets the final loss curves as a PNG, an output of its own
(``loss_image``), which a saved notebook keeps where the widget shows nothing (GitHub, nbviewer, no kernel); a
monitor displayed for a job that has already ended shows it at once. The polling thread cannot ``display()`` it:
ipykernel sends a thread's output to the cell running at the time (or the last one that ran). So displaying the
monitor also makes an empty display with an id in its own cell, which the thread replaces by that id
(``update_display_data``); JupyterLab, Notebook 7 and nbclient apply that to the cell holding the display.

The loss plot is a plotly ``FigureWidget``. It updates in place in JupyterLab 4 (since plotly 6 it is an
anywidget, so no lab extension has to be built or enabled), new points are sent as one message per poll
(``batch_update``), and the reader gets hover values per step, zoom and a PNG download for free. ipympl was
not chosen because every update re-renders the whole matplotlib figure in the kernel and ships an image,
and it adds a widget extension to the install; bqplot also updates in place, but it is another extension to
install and its figures have no values on hover or image export out of the box.
"""

from __future__ import annotations

import base64
import copy
import html
import threading
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go
from IPython.display import DisplayHandle, display

from qubrid_lab.client.job_progress import JobProgress, ProgressTracker
from qubrid_lab.widgets._client import FINISHED_STATUSES, ServerError, connect
from qubrid_lab.widgets._fields import status_html
from qubrid_lab.widgets.loss_image import CURVES, loss_png

TRAINING, VALIDATION = 0, 1  # trace indexes in the figure


# numbers besides the losses that step and evaluation events carry, shown as they come (name -> how)
LIVE_METRICS = {
    "learning_rate": "lr {:.1e}",
    "grad_norm": "grad norm {:.2f}",
    "tokens_per_second": "{:,.0f} tokens/s",
    "validation_mean_token_accuracy": "validation token accuracy {:.1%}",
}


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def loss_figure() -> go.FigureWidget:
    """An empty training/validation loss plot: step on x, loss on y, both named in the legend."""
    figure = go.FigureWidget(
        data=[
            go.Scatter(
                x=[], y=[], name=CURVES["training"][0], mode="lines+markers", line={"color": CURVES["training"][1]}
            ),
            go.Scatter(
                x=[],
                y=[],
                name=CURVES["validation"][0],
                mode="lines+markers",
                line={"color": CURVES["validation"][1], "dash": "dash"},
                marker={"symbol": "diamond", "size": 8},
            ),
        ],
        layout=go.Layout(
            title={"text": "Loss", "x": 0.02},
            height=340,
            margin={"l": 60, "r": 20, "t": 50, "b": 50},
            template="plotly_white",
            hovermode="x unified",
            xaxis={"title": {"text": "step"}, "rangemode": "tozero"},
            yaxis={"title": {"text": "loss"}, "rangemode": "tozero"},
            legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "right", "x": 1},
        ),
    )
    return figure


class TrainingMonitor(widgets.VBox):
    """Launch a job (``job=`` a ``POST /v1/fine-tuning/jobs`` body) or attach to one (``job_id=``) and watch it.

    Shows a live loss plot (``figure``), a progress bar with the time left, the latest event, a Cancel button
    and, once the job ends, its final metrics and, below the widget, the loss curves as a PNG that stays in the
    saved notebook. ``wait()`` blocks until the job ends and returns it; ``job`` is the latest copy read from the
    server; ``points`` holds ``{"training": {step: loss}, "validation": {...}}``; ``png`` the image once the job
    has ended (None before, or when no loss was logged).
    """

    def __init__(
        self,
        server: Any = None,
        job_id: str | None = None,
        job: dict | None = None,
        *,
        poll_seconds: float = 1.0,
        base_url: str | None = None,
        api_key: str | None = None,
    ):
        self._stop = threading.Event()  # first: close() (also run when a half-built widget is collected) sets it
        if (job_id is None) == (job is None):
            raise ValueError("pass job_id= to follow an existing job, or job= (a job request body) to launch one")
        self.api = connect(server, base_url, api_key)
        self.poll_seconds = poll_seconds
        self.job: dict | None = None
        self.error: str | None = None
        self.points: dict[str, dict[int, float]] = {"training": {}, "validation": {}}
        self.latest: dict[str, float] = {}  # the newest of each number the metrics events carry
        self.png: bytes | None = None
        self._total_steps: int | None = None
        self._ended = threading.Event()
        self._lock = threading.Lock()
        self._image_displays: list[DisplayHandle] = []  # the cells' displays awaiting the final image

        self.figure = loss_figure()
        self.title = widgets.HTML()
        self.progress = widgets.IntProgress(
            value=0, min=0, max=1, description="steps", layout=widgets.Layout(width="420px")
        )
        self.eta = widgets.Label()
        self.status = widgets.HTML()
        self.cancel_button = widgets.Button(description="Cancel", icon="stop", button_style="danger")
        self.metrics = widgets.HTML()
        self.cancel_button.on_click(lambda _: self._on_cancel())
        super().__init__(
            [
                self.title,
                self.figure,
                widgets.HBox([self.progress, self.eta]),
                widgets.HBox([self.cancel_button, self.status]),
                self.metrics,
            ]
        )

        jobs = self.api.api_client.jobs
        try:
            self.job = jobs.create(**job) if job is not None else jobs.get(job_id)
        except ServerError as exc:
            self._end(exc.message)
            return
        self._show_job(ProgressTracker().update(self.job, []))
        if self.job["status"] in FINISHED_STATUSES:
            self._follow()  # one poll reads it whole, so the cell shows the ended job and its image at once
            return
        self._thread = threading.Thread(target=self._follow, name=f"TrainingMonitor:{self.job['id']}", daemon=True)
        self._thread.start()

    # --- public -------------------------------------------------------------------------------------------

    @property
    def polling(self) -> bool:
        """Whether the monitor still follows the job."""
        return not self._ended.is_set()

    def wait(self, timeout: float | None = None) -> dict:
        """Block until the job ends; return it. ``TimeoutError`` after ``timeout`` seconds; ``RuntimeError`` when
        the monitor stopped without seeing the end (job missing, server gone, widget closed)."""
        if not self._ended.wait(timeout):
            raise TimeoutError(f"job {self.job['id']} is still {self.job['status']} after {timeout} s")
        if self.error:
            raise RuntimeError(self.error)
        return self.job

    def cancel(self) -> dict:
        """Ask the server to cancel the job; returns the job as the server sends it back."""
        job = self.api.api_client.jobs.cancel(self.job["id"])
        with self._lock:
            self.status.value = status_html("Cancelling…")
        return job

    def close(self) -> None:
        self._stop.set()
        super().close()

    def _ipython_display_(self) -> None:
        """Display the widget, then the final loss image (or, while the job runs, the empty display it will fill)."""
        display(self._repr_mimebundle_(), raw=True)
        with self._lock:
            handle = display(self._image_bundle(), raw=True, display_id=True)
            if handle is not None and not self._ended.is_set():
                self._image_displays.append(handle)

    # --- the polling thread -------------------------------------------------------------------------------

    def _follow(self) -> None:
        try:
            for progress in self.api.api_client.jobs.follow(
                self.job["id"], poll_seconds=self.poll_seconds, stop=self._stop
            ):
                self._apply(progress)
                if progress.finished:
                    self._end()
                    return
        except ServerError as exc:  # the job is gone, or the server stayed unreachable
            self._end(exc.message)
            return
        self._end(f"the monitor was closed while job {self.job['id']} was {self.job['status']}")

    def _apply(self, progress: JobProgress) -> None:
        """Take in one poll's news: record each event's losses, then redraw everything that changed."""
        for event in progress.events:
            data = event["data"]
            if event["type"] != "metrics":
                continue
            for key in ("training", "validation"):
                if f"{key}_loss" in data:
                    self.points[key][data["step"]] = data[f"{key}_loss"]
        last_message = progress.events[-1]["message"] if progress.events else None
        with self._lock:
            self.job = progress.job
            self.latest = progress.metrics
            self._total_steps = progress.total_steps
            if progress.events:
                self._redraw(progress.total_steps)
            self._show_job(progress, last_message)

    def _redraw(self, total_steps: int | None) -> None:
        with self.figure.batch_update():
            for index, key in ((TRAINING, "training"), (VALIDATION, "validation")):
                steps = sorted(self.points[key])
                self.figure.data[index].x = steps
                self.figure.data[index].y = [self.points[key][step] for step in steps]
            if total_steps:
                self.figure.layout.xaxis.range = [0, total_steps + 0.5]
                # plotly ticks a short run at 0.5 steps; there are no half steps
                self.figure.layout.xaxis.dtick = 1 if total_steps <= 10 else None
        # plotly sends changes to the views open now as messages, and syncs the figure itself only when it is
        # displayed: a view opened later (a reloaded page, Notebook 7 on this kernel) would draw the empty plot
        # of that moment. Syncing it as plotly's own display does keeps those views whole.
        with self.figure.hold_sync():
            self.figure._widget_data = copy.deepcopy(self.figure._data)
            self.figure._widget_layout = copy.deepcopy(self.figure._layout_obj._props)

    # --- what the widgets show ----------------------------------------------------------------------------

    def _show_job(self, progress: JobProgress, message: str | None = None) -> None:
        job, total = progress.job, progress.total_steps
        self.title.value = (
            f"<b>{html.escape(job['id'])}</b> · {html.escape(job['base_model'])} · "
            f"dataset {html.escape(job['dataset_id'])}"
        )
        if total:
            self.progress.max = total
            self.progress.value = min(progress.steps_done, total)
        self.progress.bar_style = {"completed": "success", "failed": "danger", "cancelled": "warning"}.get(
            job["status"], "info"
        )
        self.eta.value = self._eta_text(progress)
        if job["status"] == "failed":
            self.status.value = status_html(f"failed: {job.get('error') or message or 'no reason given'}", "error")
        elif progress.retrying:
            self.status.value = status_html(progress.retrying, "error")
        elif message or job["status"] in FINISHED_STATUSES:
            self.status.value = f"<b>{job['status']}</b> · " + status_html(message or "")
        else:
            self.status.value = f"<b>{job['status']}</b>"
        self.cancel_button.disabled = job["status"] in FINISHED_STATUSES
        if job["status"] in FINISHED_STATUSES:
            self.metrics.value = self._final_metrics(job)

    def _eta_text(self, progress: JobProgress) -> str:
        done, total = progress.steps_done, progress.total_steps
        if progress.finished and progress.elapsed_seconds is not None:
            return f"{done}/{total or done} steps in {_duration(progress.elapsed_seconds)}"
        if not total:
            return "waiting for training to start" if progress.status in {"queued", "running"} else ""
        if progress.seconds_per_step is None or progress.eta_seconds is None:
            return f"{done}/{total} steps"
        shown = " · ".join(
            template.format(self.latest[name]) for name, template in LIVE_METRICS.items() if name in self.latest
        )
        return (
            f"{done}/{total} steps · {progress.seconds_per_step:.2f} s/step · about "
            f"{_duration(progress.eta_seconds)} left" + (f" · {shown}" if shown else "")
        )

    def _final_metrics(self, job: dict) -> str:
        metrics = job["training_metrics"]
        rows = [
            ("status", job["status"]),
            ("training loss", metrics["training_loss"]),
            ("validation loss", metrics["validation_loss"]),
            ("validation token accuracy", self.latest.get("validation_mean_token_accuracy")),
            ("steps", metrics["steps_completed"]),
            ("epochs", metrics["epochs_completed"]),
            ("fine-tuned model", job.get("fine_tuned_model")),
            ("error", job.get("error")),
        ]
        cells = "".join(
            f"<tr><th style='text-align:left;padding-right:1em'>{name}</th>"
            f"<td>{html.escape(f'{value:.4f}' if isinstance(value, float) else str(value))}</td></tr>"
            for name, value in rows
            if value is not None
        )
        return f"<table>{cells}</table>"

    def _end(self, error: str | None = None) -> None:
        """Stop following; ``error`` says why when the job's end was not seen. At the job's end, draw its image
        into the displays waiting for it, before ``wait()`` returns: nbclient only takes in a display update
        while some cell runs."""
        with self._lock:
            if self._ended.is_set():
                return
            self.error = error
            try:
                if error:
                    self.status.value = status_html(error, "error")
                    self.cancel_button.disabled = True
                else:
                    title = f"Loss · {self.job['id']} · {self.job['status']}\n{self.job['base_model']}"
                    self.png = loss_png(self.points, title, self._total_steps)
                    for handle in self._image_displays:
                        handle.update(self._image_bundle(), raw=True)
            finally:
                self._image_displays.clear()
                self._ended.set()

    def _image_bundle(self) -> dict:
        """The final image as a display's content; an empty text while there is none."""
        if self.png is None:
            return {"text/plain": ""}
        return {
            "image/png": base64.b64encode(self.png).decode("ascii"),
            "text/plain": f"loss curves of {self.job['id']} ({self.job['base_model']})",
        }

    def _on_cancel(self) -> None:
        try:
            self.cancel()
        except ServerError as exc:  # e.g. 409: the job ended meanwhile
            with self._lock:
                self.status.value = status_html(exc.message, "error")
