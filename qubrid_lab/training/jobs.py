"""The job manager: validates new jobs, queues them, trains each in a worker process, and registers results.

Statuses move queued -> running -> completed | failed | cancelled, and queued or running -> paused -> queued.
The manager answers requests (create, cancel, pause, resume, delete a model, serve a checkpoint) by changing
the database and signalling workers, so the server stays responsive whatever training does. The rest is in
modules of their own: the queue's thread (``job_scheduler``), worker processes (``job_workers``), what a job's
end means (``job_outcomes``), and what the manager and the worker agree on (``worker_contract``).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from qubrid_lab.errors import ConflictError
from qubrid_lab.models.catalogue import Catalogue
from qubrid_lab.settings import Settings
from qubrid_lab.storage.datasets import DatasetStore
from qubrid_lab.storage.jobs import ACTIVE_STATUSES, JobRecord, JobStore
from qubrid_lab.training.checkpoints import (
    Checkpoint,
    checkpoint_model_id,
    fine_tuned_model_id,
    parse_checkpoint_model,
    saved_checkpoints,
)
from qubrid_lab.training.gpu_share import GpuReservations, TrainingGpus
from qubrid_lab.training.job_outcomes import JobOutcomes, ModelReady, ModelRemoved, Trained
from qubrid_lab.training.job_requests import check_job_request
from qubrid_lab.training.job_scheduler import JobScheduler
from qubrid_lab.training.job_workers import WorkerLauncher
from qubrid_lab.training.worker_contract import PAUSE_SIGNAL, JobFiles

log = logging.getLogger(__name__)


class JobManager:
    """Fine-tuning jobs of one server: ``start()`` at startup, ``stop()`` at shutdown.

    ``on_model_ready(model_id, base_model, adapter_dir, created)`` is called for every stored fine-tuned model
    by ``start()``, then (from the scheduler thread) for each one a job completes; ``on_model_removed(model_id)``
    is called (from the request's thread) before a deleted model's files go. An exception from either is
    logged (and, for a new model, recorded as a warning event of its job); it never fails the job.
    ``on_trained(job, tokens)`` is told the tokens a job trained on when it ends (for the usage ledger).

    ``scope`` arguments are owner ids (a key's id: its own objects only) or None (everyone's).
    """

    def __init__(
        self,
        settings: Settings,
        catalogue: Catalogue,
        datasets: DatasetStore,
        jobs: JobStore,
        *,
        on_model_ready: ModelReady | None = None,
        on_model_removed: ModelRemoved | None = None,
        gpu_reservations: GpuReservations | None = None,
        on_trained: Trained | None = None,
    ):
        self.settings = settings
        self.catalogue = catalogue
        self.datasets = datasets
        self.jobs = jobs
        self.on_model_ready = on_model_ready
        self.on_model_removed = on_model_removed
        self.outcomes = JobOutcomes(jobs, on_model_ready, on_model_removed, on_trained)
        gpus = TrainingGpus(settings.training_device, gpu_reservations)
        launcher = WorkerLauncher(settings, catalogue, jobs.db.path, datasets.files_dir, gpus)
        self.scheduler = JobScheduler(jobs, settings.max_running_jobs, gpus, launcher, self.outcomes, self.files)
        self._serving = threading.Lock()

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Migrate the database, re-queue jobs a dead server left running, serve stored models, start the queue."""
        self.jobs.db.migrate()
        self.datasets.clear_incoming()
        self._recover()
        for model in reversed(self.jobs.models()):
            self.outcomes.announce(model)
        self.scheduler.start()

    def stop(self) -> None:
        """Stop the queue and every worker; their jobs stay ``running`` and resume at the next start."""
        self.scheduler.stop()

    def _recover(self) -> None:
        for job in self.jobs.with_status("running"):
            files = self.files(job.id)
            if not files.path.is_dir():
                reason = (
                    f"the server stopped while this job was running and its directory {files.path} is gone, "
                    "so it cannot resume"
                )
                self.outcomes.fail(job.id, reason)
                continue
            self.jobs.transition(
                job.id,
                ("running",),
                "queued",
                message=f"The server stopped while this job was running; it is queued again and "
                f"resumes from {_resume_point(files)}.",
            )

    # --- requests -----------------------------------------------------------------------------------

    def create(
        self,
        *,
        base_model: str,
        dataset_id: str,
        task_type: str,
        hyperparameters: dict | None = None,
        suffix: str | None = None,
        column_mapping: dict[str, str] | None = None,
        owner: str | None = None,
        scope: str | None = None,
        validation_dataset_id: str | None = None,
    ) -> JobRecord:
        """Check a job request (:func:`~qubrid_lab.training.job_requests.check_job_request`: every problem in one
        400) and queue the job for ``owner``. With ``validation_dataset_id`` the job validates on that dataset
        instead of a split of its training data."""
        resolved = check_job_request(
            self.catalogue,
            self.datasets,
            self.settings.model_cache_dir,
            base_model=base_model,
            dataset_id=dataset_id,
            task_type=task_type,
            hyperparameters=hyperparameters,
            suffix=suffix,
            column_mapping=column_mapping,
            scope=scope,
            validation_dataset_id=validation_dataset_id,
        )
        job = self.jobs.create(
            base_model=base_model,
            dataset_id=dataset_id,
            task_type=task_type,
            hyperparameters=resolved.model_dump(),
            column_mapping=column_mapping,
            suffix=suffix or None,
            owner=owner,
            validation_dataset_id=validation_dataset_id,
        )
        self.scheduler.wake()
        return job

    def cancel(self, job_id: str, scope: str | None = None) -> JobRecord:
        """Cancel a queued job at once, or stop a running one's worker (it is killed if it lingers)."""
        job = self.jobs.get(job_id, scope)
        moved = job.status in ACTIVE_STATUSES and self.jobs.transition(
            job_id, ACTIVE_STATUSES, "cancelled", completed_at=time.time(), message="Job cancelled."
        )
        if not moved:
            status = self.jobs.get(job_id).status
            raise ConflictError(
                f"Job {job_id} is already {status}; only queued or running jobs can be cancelled.", param="job_id"
            )
        self.scheduler.stop_worker(job_id)
        self.scheduler.wake()
        return self.jobs.get(job_id)

    def pause(self, job_id: str, scope: str | None = None) -> JobRecord:
        """Pause a queued or running job; a running one saves a checkpoint first, and resumes from it."""
        job = self.jobs.get(job_id, scope)
        if not self.jobs.transition(
            job_id, ("queued", "running"), "paused", message="Job paused; resume it to queue it again."
        ):
            raise ConflictError(
                f"Job {job_id} is {self.jobs.get(job_id).status}; only queued or running jobs can be paused.",
                param="job_id",
            )
        if job.status == "running":
            self.scheduler.stop_worker(job_id, PAUSE_SIGNAL)
        self.scheduler.wake()
        return self.jobs.get(job_id)

    def resume(self, job_id: str, scope: str | None = None) -> JobRecord:
        """Queue a paused job again; it continues from its newest checkpoint."""
        self.jobs.get(job_id, scope)
        still_stopping = self.scheduler.worker_pid(job_id) is not None
        where = _resume_point(self.files(job_id))
        if still_stopping or not self.jobs.transition(
            job_id, ("paused",), "queued", message=f"Job resumed; it is queued and continues from {where}."
        ):
            status = self.jobs.get(job_id).status
            raise ConflictError(
                f"Job {job_id} is {status}"
                + (
                    " and its worker is still saving; try again in a moment"
                    if still_stopping
                    else "; only paused jobs can be resumed"
                )
                + ".",
                param="job_id",
            )
        self.scheduler.wake()
        return self.jobs.get(job_id)

    def delete_model(self, model_id: str, scope: str | None = None) -> None:
        """Stop serving a fine-tuned model and its checkpoints, forget it and delete their files."""
        model = self.jobs.get_model(model_id, scope)
        if self.on_model_removed:
            try:
                self.on_model_removed(model_id)
            except Exception:  # not being served (say, its base is not loaded) is no reason to keep it
                log.warning("could not unload %s; deleting it anyway", model_id, exc_info=True)
            for checkpoint in saved_checkpoints(self.files(model.job_id).checkpoints):
                self.on_model_removed(checkpoint_model_id(model_id, checkpoint.step))  # a no-op unless served
        self.jobs.delete_model(model_id)
        shutil.rmtree(model.adapter_dir, ignore_errors=True)
        shutil.rmtree(self.files(model.job_id).checkpoints, ignore_errors=True)

    def checkpoints(self, job_id: str, scope: str | None = None) -> tuple[JobRecord, list[Checkpoint]]:
        """The job (if ``scope`` may see it) and its saved checkpoints, newest first."""
        job = self.jobs.get(job_id, scope)
        return job, saved_checkpoints(self.files(job.id).checkpoints)

    def serve_checkpoint(self, model_id: str, scope: str | None = None) -> bool:
        """Start serving the checkpoint model ``model_id`` (``<fine-tuned model id>:ckpt-step-N``) if it names a
        saved checkpoint of a job ``scope`` may see; False when it names none."""
        parsed = parse_checkpoint_model(model_id)
        if parsed is None or self.on_model_ready is None:
            return False
        fine_tuned, job_id, step = parsed
        job = self.jobs.find(job_id, scope)
        path = self.files(job_id).checkpoint(step)
        if (
            job is None
            or fine_tuned_model_id(job.base_model, job.suffix, job.id) != fine_tuned
            or not (path / "adapter_config.json").is_file()
        ):
            return False
        with self._serving:  # two first requests for one checkpoint load it once
            self.on_model_ready(model_id, job.base_model, path, int(path.stat().st_mtime))
        return True

    def job_dir(self, job_id: str) -> Path:
        return self.settings.jobs_dir / job_id

    def files(self, job_id: str) -> JobFiles:
        """The files of a job's directory (``worker_contract``)."""
        return JobFiles(self.job_dir(job_id))

    def worker_pid(self, job_id: str) -> int | None:
        """The process id of a running job's worker (torchrun's, under several GPUs)."""
        return self.scheduler.worker_pid(job_id)


def _resume_point(files: JobFiles) -> str:
    """Where a job's run continues from, in words."""
    step = files.resume_step()
    return f"its checkpoint at step {step}" if step is not None else "the start (no checkpoint was saved)"
