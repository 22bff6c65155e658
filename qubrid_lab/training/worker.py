"""The training worker: one fine-tuning job in its own process, reporting into the database.

    python -m qubrid_lab.training.worker --database DB --job-id ID --model-dir DIR --job-dir DIR [--device D]

The server's job manager starts it (under ``torchrun`` when several GPUs train together) and owns the job's
status; the worker only records progress (events and ``training_metrics``), a readable ``error`` when it
fails, and ``result.json`` in the job directory when training returns. A crash or an OOM kill of this
process therefore cannot take the server down: the manager sees the exit and fails the job. The command line,
the signals and the job directory's files are the contract in ``worker_contract``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import psutil

from qubrid_lab.errors import QubridError
from qubrid_lab.storage.datasets import DatasetStore
from qubrid_lab.storage.db import Database
from qubrid_lab.storage.jobs import JobStore
from qubrid_lab.training.errors import TrainingError
from qubrid_lab.training.worker_contract import GPU_SHARE_VARIABLE, PAUSE_SIGNAL, JobFiles, WorkerArguments

log = logging.getLogger("qubrid_lab.worker")

ORPHAN_CHECK_SECONDS = 1.0


def cap_gpu_memory() -> None:
    """Keep this worker's CUDA allocations within the share a managed vLLM on the same GPU leaves it."""
    share = os.environ.get(GPU_SHARE_VARIABLE)
    if not share:
        return
    import torch

    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            torch.cuda.set_per_process_memory_fraction(float(share), index)
        log.info("CUDA memory capped at %s of each GPU (the rest is held by vLLM)", share)


class StopFlag:
    """Set by SIGTERM/SIGINT, by SIGUSR1 (a pause: save a checkpoint first), or by itself once the server that
    launched this worker is gone.

    An orphaned worker must not keep a GPU busy for a job nobody watches: the server that restarts next
    resumes the job from its checkpoint.
    """

    def __init__(self, server_pid: int | None):
        self.reason: str | None = None
        self.keep_progress = False
        self.parent = os.getppid()
        self.server_pid = server_pid
        self.checked_at = 0.0

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, PAUSE_SIGNAL):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self.keep_progress = self.keep_progress or (signum == PAUSE_SIGNAL and self.reason is None)
        self.reason = self.reason or f"signal {signal.Signals(signum).name}"

    def _server_gone(self) -> bool:
        if os.getppid() != self.parent:
            return True
        if self.server_pid is None:
            return False
        try:
            return psutil.Process(self.server_pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    def is_set(self) -> bool:
        now = time.monotonic()
        if self.reason is None and now - self.checked_at >= ORPHAN_CHECK_SECONDS:
            self.checked_at = now
            if self._server_gone():
                self.reason = "the server process is gone"
        return self.reason is not None


class DatabaseProgress:
    """The runner's ``ProgressSink``: each report becomes an event, and the job's metrics follow it."""

    def __init__(self, jobs: JobStore, job_id: str, stop: StopFlag):
        self.jobs = jobs
        self.job_id = job_id
        self.stop = stop
        self.total_steps: int | None = None

    def on_start(self, total_steps: int, train_rows: int, validation_rows: int) -> None:
        self.total_steps = total_steps
        held_out = f", {validation_rows} held out for validation" if validation_rows else ""
        self.jobs.record(
            self.job_id,
            "message",
            f"Training started: {total_steps} steps on {train_rows} rows{held_out}.",
            {"total_steps": total_steps, "train_rows": train_rows, "validation_rows": validation_rows},
            total_steps=total_steps,
            while_running=True,
        )

    def on_train_step(
        self,
        step: int,
        epoch: float,
        loss: float,
        learning_rate: float,
        tokens: int,
        grad_norm: float | None = None,
        tokens_per_second: float | None = None,
    ) -> None:
        data = {
            "step": step,
            "epoch": epoch,
            "training_loss": loss,
            "learning_rate": learning_rate,
            "tokens": tokens,
            "grad_norm": grad_norm,
            "tokens_per_second": tokens_per_second,
        }
        self.jobs.record(
            self.job_id,
            "metrics",
            f"Step {step}/{self.total_steps or '?'}: training loss {loss:.4f}",
            {name: value for name, value in data.items() if value is not None},
            training_loss=loss,
            steps_completed=step,
            epochs_completed=epoch,
            while_running=True,
        )

    def on_evaluation(
        self, step: int, epoch: float, validation_loss: float, token_accuracy: float | None = None
    ) -> None:
        data = {
            "step": step,
            "epoch": epoch,
            "validation_loss": validation_loss,
            "validation_mean_token_accuracy": token_accuracy,
        }
        self.jobs.record(
            self.job_id,
            "metrics",
            f"Step {step}/{self.total_steps or '?'}: validation loss {validation_loss:.4f}",
            {name: value for name, value in data.items() if value is not None},
            validation_loss=validation_loss,
            while_running=True,
        )

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.jobs.record(
            self.job_id, "message", f"Checkpoint saved at step {step}.", {"step": step}, while_running=True
        )

    def should_stop(self) -> bool:
        return self.stop.is_set()

    def save_before_stopping(self) -> bool:
        return self.stop.keep_progress


def tracker_locations(report_to: str, files: JobFiles) -> None:
    """Where a tracker writes when the server's environment does not say: under the job's directory."""
    if report_to == "tensorboard":
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(files.tensorboard))
    elif report_to == "mlflow" and "MLFLOW_TRACKING_URI" not in os.environ:
        # a file store needs no server or database; MLflow 3 asks for this opt-in to write one
        os.environ.update(MLFLOW_TRACKING_URI=files.mlruns.resolve().as_uri(), MLFLOW_ALLOW_FILE_STORE="true")
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "qubrid_lab")


def run_job(
    database: Path, files_dir: Path, job_id: str, model_dir: str, job_dir: Path, device: str, stop: StopFlag
) -> None:
    """Train job ``job_id`` as recorded in ``database`` and write ``result.json`` into ``job_dir``."""
    from qubrid_lab.data.columns import plan_columns
    from qubrid_lab.training.hyperparameters import Hyperparameters
    from qubrid_lab.training.lora import is_main_process
    from qubrid_lab.training.runner import TrainingSpec, train

    job_dir.mkdir(parents=True, exist_ok=True)
    db = Database(database)
    jobs = JobStore(db)
    job = jobs.get(job_id)
    datasets = DatasetStore(db, files_dir)
    dataset = datasets.get(job.dataset_id)
    validation = datasets.get(job.validation_dataset_id) if job.validation_dataset_id else None
    spec = TrainingSpec(
        model_dir=model_dir,
        dataset_path=dataset.path,
        plan=plan_columns(dataset.columns, job.task_type, job.column_mapping),
        hyperparameters=Hyperparameters(**job.hyperparameters),
        output_dir=job_dir,
        device=device,
        validation_path=validation.path if validation else None,
        validation_plan=plan_columns(validation.columns, job.task_type, job.column_mapping) if validation else None,
    )
    files = JobFiles(job_dir)
    tracker_locations(spec.hyperparameters.report_to, files)
    step = files.resume_step()
    if step is not None and is_main_process():
        jobs.record(job_id, "message", f"Resumed from step {step}.", {"step": step}, while_running=True)
    result = train(spec, DatabaseProgress(jobs, job_id, stop))
    if is_main_process() and not result.stopped:
        files.metrics.write_text(jobs.metrics_csv(job_id))
    if is_main_process():
        summary = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(result).items()}
        files.result.write_text(json.dumps(summary, indent=2))


def failure_message(exc: BaseException) -> str:
    """What the job's ``error`` says: the typed errors' own words, or the exception's type and text."""
    if isinstance(exc, (QubridError, TrainingError)):
        return exc.message
    if isinstance(exc, MemoryError):
        return "the training process ran out of memory"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = WorkerArguments.parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = StopFlag(args.server_pid)
    stop.install()
    files_dir = args.files_dir or args.database.parent / "files"
    try:
        cap_gpu_memory()
        run_job(args.database, files_dir, args.job_id, args.model_dir, args.job_dir, args.device, stop)
        if stop.reason:
            log.info("job %s: training stopped early (%s)", args.job_id, stop.reason)
    except Exception as exc:  # any failure ends the job; the manager reads the reason written here
        traceback.print_exc()
        message = failure_message(exc)
        log.error("job %s failed: %s", args.job_id, message)
        JobStore(Database(args.database)).set_error(args.job_id, message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
