"""A client for any qubrid_lab server's platform API, with no widgets and no torch: ``Client(base_url, api_key)``.

from qubrid_lab import Client

lab = Client("http://127.0.0.1:8000", api_key="qbt_…")
dataset = lab.datasets.upload("train.csv")
job = lab.jobs.create("HuggingFaceTB/SmolLM2-135M-Instruct", dataset["id"], "qa", {"epochs": 3})
for progress in lab.jobs.follow(job["id"]):
    print(progress.steps_done, progress.total_steps, progress.eta_seconds)
"""

from qubrid_lab.client.api_client import Client
from qubrid_lab.client.api_errors import (
    AuthenticationError,
    ConflictError,
    InsufficientCreditsError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    QubridLabError,
    RateLimitError,
    ServerUnavailableError,
)
from qubrid_lab.client.job_progress import FINISHED_STATUSES, JobProgress

__all__ = [
    "FINISHED_STATUSES",
    "AuthenticationError",
    "Client",
    "ConflictError",
    "InsufficientCreditsError",
    "InvalidRequestError",
    "JobProgress",
    "NotFoundError",
    "PermissionDeniedError",
    "QubridLabError",
    "RateLimitError",
    "ServerUnavailableError",
]
