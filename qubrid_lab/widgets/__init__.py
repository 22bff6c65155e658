"""Notebook views over qubrid_lab (ipywidgets 8): profile a CSV, fill a job request, watch training, chat.

Each widget only shows things and calls the plain functions or the server's HTTP API: ``profile_csv`` for
the profile, ``qubrid_lab.Client`` (``/v1/fine-tuning/...``) for datasets and jobs, ``/v1/chat/completions``
for answers. They take the ``LabServer`` that ``qubrid_lab.start_server()`` returns, or ``base_url=`` and
``api_key=`` of a server started elsewhere. ipywidgets and plotly are imported here only, never by the rest of
the package.
"""

from qubrid_lab.widgets._client import ServerError
from qubrid_lab.widgets.form import FormError, HyperparameterForm
from qubrid_lab.widgets.monitor import TrainingMonitor
from qubrid_lab.widgets.playground import ChatPlayground
from qubrid_lab.widgets.profiler import DatasetProfiler

__all__ = ["ChatPlayground", "DatasetProfiler", "FormError", "HyperparameterForm", "ServerError", "TrainingMonitor"]
