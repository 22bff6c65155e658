"""The job manager: validates new jobs, queues them, trains each in a worker process, and registers results.

Statuses move queued -> running -> completed | failed | cancelled. At most ``settings.max_running_jobs``
workers train at once (one by default: a job takes the whole training device, every GPU of it through
``torchrun`` when there are several). One scheduler thread launches and reaps workers; requests only touch
the database and signal workers, so the server stays responsive whatever training does.

Fine-tuned model ids follow OpenAI's form ``ft:{base_model}:{suffix}:{job_id}``; without a suffix the field
stays empty (``ft:{base_model}::{job_id}``), so the id always splits into the same four parts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from qubrid_lab.errors import ConflictError
from qubrid_lab.models.catalogue import Catalogue
from qubrid_lab.settings import Settings
from qubrid_lab.storage.datasets import DatasetStore
from qubrid_lab.storage.jobs import ACTIVE_STATUSES, FineTunedModelRecord, JobRecord, JobStore
from qubrid_lab.training.checkpoints import (
    CHECKPOINTS_DIR,
    Checkpoint,
    checkpoint_model_id,
    fine_tuned_model_id,
    parse_checkpoint_model,
    saved_checkpoints,
)
from qubrid_lab.training.gpu_share import GpuReservations, TrainingGpus, gpu_count
from qubrid_lab.training.job_requests import check_job_request
from qubrid_lab.training.worker import GPU_SHARE_VARIABLE, LOG_FILE, PAUSE_SIGNAL, RESULT_FILE, resume_step

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 10.0  # a worker asked to stop that is still alive after this is killed
POLL_SECONDS = 0.5

ModelReady = Callable[[str, str, Path, int], None]  # (model_id, base_model, adapter_dir, created)
ModelRemoved = Callable[[str], None]  # (model_id)


def completion_message(model_id: str, result: dict) -> str:
    """What the completed job says: its model, and which checkpoint that model holds when validation chose one."""
    parts = [f"Job completed; fine-tuned model {model_id} is ready"]
    if result.get("early_stopped"):
        parts.append(f"training stopped early at step {result['steps']}: validation loss had stopped improving")
    best, served = result.get("best_step"), result.get("served_step")
    if best is not None:
        parts.append(f"it holds the best checkpoint's weights (step {best})" if served == best
                     else f"it holds step {served}'s weights; the best checkpoint by validation loss is step {best}")
    return "; ".join(parts) + "."


def exit_reason(returncode: int, log_path: Path) -> str:
    """Why a worker that left no reason of its own ended: its signal, or its exit status and last log line."""
    if returncode < 0:
        number = -returncode
        name = signal.Signals(number).name if number in signal.valid_signals() else "unknown"
        hint = "; out of memory?" if number == signal.SIGKILL else ""
        return f"the training process was killed by signal {number} ({name}{hint})"
    if returncode == 0:
        return "the training process ended without saving an adapter"
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()] \
        if log_path.is_file() else []
    return f"the training process exited with status {returncode}" + (f": {lines[-1].strip()}" if lines else "")


@dataclass
class _Worker:
    """A running worker process (its own process group, so torchrun's ranks are signalled together)."""

    job_id: str
    process: subprocess.Popen
    log: IO[bytes]
    kill_at: float | None = None

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, sig: int | None = None) -> None:
        """Ask for a graceful stop now (SIGTERM; ``PAUSE_SIGNAL``: after saving a checkpoint); the scheduler
        kills the worker if it is still alive after the grace period."""
        sig = sig or signal.SIGTERM
        if self.kill_at is None:
            self.kill_at = time.monotonic() + STOP_GRACE_SECONDS * (3 if sig == PAUSE_SIGNAL else 1)
            self.signal(sig)


class JobManager:
    """Fine-tuning jobs of one server: ``start()`` at startup, ``stop()`` at shutdown.

    ``on_model_ready(model_id, base_model, adapter_dir, created)`` is called for every stored fine-tuned model
    by ``start()``, then (from the scheduler thread) for each one a job completes; ``on_model_removed(model_id)``
    is called (from the request's thread) before a deleted model's files go. An exception from either is
    logged (and, for a new model, recorded as a warning event of its job); it never fails the job.
    ``on_trained(job, tokens)`` is told the tokens a job trained on when it ends (for the usage ledger).

    ``scope`` arguments are owner ids (a key's id: its own objects only) or None (everyone's).
    """

    def __init__(self, settings: Settings, catalogue: Catalogue, datasets: DatasetStore, jobs: JobStore, *,
                 on_model_ready: ModelReady | None = None, on_model_removed: ModelRemoved | None = None,
                 gpu_reservations: GpuReservations | None = None,
                 on_trained: Callable[[JobRecord, int], None] | None = None):
        self.settings = settings
        self.on_trained = on_trained
        self.gpus = TrainingGpus(settings.training_device, gpu_reservations)
        self.catalogue = catalogue
        self.datasets = datasets
        self.jobs = jobs
        self.on_model_ready = on_model_ready
        self.on_model_removed = on_model_removed
        self._workers: dict[str, _Worker] = {}
        self._waiting_reported: dict[str, str] = {}
        self._lock = threading.Lock()
        self._serving = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Migrate the database, re-queue jobs a dead server left running, serve stored models, start the queue."""
        self.jobs.db.migrate()
        self.datasets.clear_incoming()
        self._recover()
        for model in reversed(self.jobs.models()):
            self._announce(model)
        self._stopping = False
        self._thread = threading.Thread(target=self._schedule, name="qubrid-lab:jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the queue and every worker; their jobs stay ``running`` and resume at the next start."""
        self._stopping = True
        self._wake.set()
        if self._thread:
            self._thread.join()
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            if self.jobs.get(worker.job_id).status == "running":
                self.jobs.record(worker.job_id, "message", "The server is stopping; training stops here and "
                                 "resumes from the last checkpoint when the server starts again.")
            worker.stop()
        for worker in workers:
            try:
                worker.process.wait(timeout=max(0.0, worker.kill_at - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.signal(signal.SIGKILL)
                worker.process.wait()
            worker.log.close()

    def _recover(self) -> None:
        for job in self.jobs.with_status("running"):
            job_dir = self.job_dir(job.id)
            if not job_dir.is_dir():
                reason = f"the server stopped while this job was running and its directory {job_dir} is gone, " \
                         "so it cannot resume"
                self._fail(job.id, reason)
                continue
            step = resume_step(job_dir)
            where = f"its checkpoint at step {step}" if step is not None else "the start (no checkpoint was saved)"
            self.jobs.transition(job.id, ("running",), "queued",
                                 message=f"The server stopped while this job was running; it is queued again and "
                                         f"resumes from {where}.")

    # --- requests -----------------------------------------------------------------------------------

    def create(self, *, base_model: str, dataset_id: str, task_type: str, hyperparameters: dict | None = None,
               suffix: str | None = None, column_mapping: dict[str, str] | None = None,
               owner: str | None = None, scope: str | None = None,
               validation_dataset_id: str | None = None) -> JobRecord:
        """Check a job request (:func:`~qubrid_lab.training.job_requests.check_job_request`: every problem in one
        400) and queue the job for ``owner``. With ``validation_dataset_id`` the job validates on that dataset
        instead of a split of its training data."""
        resolved = check_job_request(
            self.catalogue, self.datasets, self.settings.model_cache_dir, base_model=base_model, dataset_id=dataset_id,
            task_type=task_type, hyperparameters=hyperparameters, suffix=suffix, column_mapping=column_mapping,
            scope=scope, validation_dataset_id=validation_dataset_id)
        job = self.jobs.create(base_model=base_model, dataset_id=dataset_id, task_type=task_type,
                               hyperparameters=resolved.model_dump(), column_mapping=column_mapping,
                               suffix=suffix or None, owner=owner, validation_dataset_id=validation_dataset_id)
        self._wake.set()
        return job

    def cancel(self, job_id: str, scope: str | None = None) -> JobRecord:
        """Cancel a queued job at once, or stop a running one's worker (it is killed if it lingers)."""
        job = self.jobs.get(job_id, scope)
        moved = job.status in ACTIVE_STATUSES and self.jobs.transition(
            job_id, ACTIVE_STATUSES, "cancelled", completed_at=time.time(), message="Job cancelled.")
        if not moved:
            status = self.jobs.get(job_id).status
            raise ConflictError(f"Job {job_id} is already {status}; only queued or running jobs can be cancelled.",
                                param="job_id")
        with self._lock:
            worker = self._workers.get(job_id)
            if worker:
                worker.stop()
        self._wake.set()
        return self.jobs.get(job_id)

    def pause(self, job_id: str, scope: str | None = None) -> JobRecord:
        """Pause a queued or running job; a running one saves a checkpoint first, and resumes from it."""
        job = self.jobs.get(job_id, scope)
        if not self.jobs.transition(job_id, ("queued", "running"), "paused",
                                    message="Job paused; resume it to queue it again."):
            raise ConflictError(f"Job {job_id} is {self.jobs.get(job_id).status}; only queued or running jobs can "
                                "be paused.", param="job_id")
        if job.status == "running":
            with self._lock:
                worker = self._workers.get(job_id)
                if worker:
                    worker.stop(PAUSE_SIGNAL)
        self._wake.set()
        return self.jobs.get(job_id)

    def resume(self, job_id: str, scope: str | None = None) -> JobRecord:
        """Queue a paused job again; it continues from its newest checkpoint."""
        self.jobs.get(job_id, scope)
        with self._lock:
            still_stopping = job_id in self._workers
        step = resume_step(self.job_dir(job_id))
        where = f"its checkpoint at step {step}" if step is not None else "the start (no checkpoint was saved)"
        if still_stopping or not self.jobs.transition(job_id, ("paused",), "queued",
                                                      message=f"Job resumed; it is queued and continues from {where}."):
            status = self.jobs.get(job_id).status
            raise ConflictError(f"Job {job_id} is {status}" + (" and its worker is still saving; try again in a "
                                "moment" if still_stopping else "; only paused jobs can be resumed") + ".",
                                param="job_id")
        self._wake.set()
        return self.jobs.get(job_id)

    def delete_model(self, model_id: str, scope: str | None = None) -> None:
        """Stop serving a fine-tuned model and its checkpoints, forget it and delete their files."""
        model = self.jobs.get_model(model_id, scope)
        if self.on_model_removed:
            try:
                self.on_model_removed(model_id)
            except Exception:  # not being served (say, its base is not loaded) is no reason to keep it
                log.warning("could not unload %s; deleting it anyway", model_id, exc_info=True)
            for checkpoint in saved_checkpoints(self.job_dir(model.job_id) / CHECKPOINTS_DIR):
                self.on_model_removed(checkpoint_model_id(model_id, checkpoint.step))  # a no-op unless served
        self.jobs.delete_model(model_id)
        shutil.rmtree(model.adapter_dir, ignore_errors=True)
        shutil.rmtree(self.job_dir(model.job_id) / CHECKPOINTS_DIR, ignore_errors=True)

    def checkpoints(self, job_id: str, scope: str | None = None) -> tuple[JobRecord, list[Checkpoint]]:
        """The job (if ``scope`` may see it) and its saved checkpoints, newest first."""
        job = self.jobs.get(job_id, scope)
        return job, saved_checkpoints(self.job_dir(job.id) / CHECKPOINTS_DIR)

    def serve_checkpoint(self, model_id: str, scope: str | None = None) -> bool:
        """Start serving the checkpoint model ``model_id`` (``<fine-tuned model id>:ckpt-step-N``) if it names a
        saved checkpoint of a job ``scope`` may see; False when it names none."""
        parsed = parse_checkpoint_model(model_id)
        if parsed is None or self.on_model_ready is None:
            return False
        fine_tuned, job_id, step = parsed
        job = self.jobs.find(job_id, scope)
        path = self.job_dir(job_id) / CHECKPOINTS_DIR / f"checkpoint-{step}"
        if job is None or fine_tuned_model_id(job.base_model, job.suffix, job.id) != fine_tuned \
                or not (path / "adapter_config.json").is_file():
            return False
        with self._serving:  # two first requests for one checkpoint load it once
            self.on_model_ready(model_id, job.base_model, path, int(path.stat().st_mtime))
        return True

    def job_dir(self, job_id: str) -> Path:
        return self.settings.jobs_dir / job_id

    def worker_pid(self, job_id: str) -> int | None:
        """The process id of a running job's worker (torchrun's, under several GPUs)."""
        with self._lock:
            worker = self._workers.get(job_id)
        return worker.process.pid if worker else None

    # --- the scheduler thread -----------------------------------------------------------------------

    def _schedule(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                self._reap()
                self._launch()
            except Exception:  # the queue must outlive any one job's trouble
                log.exception("job scheduler error")
            self._wake.wait(POLL_SECONDS)

    def _reap(self) -> None:
        with self._lock:
            ended = {job_id: w for job_id, w in self._workers.items() if w.process.poll() is not None}
            for job_id, worker in self._workers.items():
                if job_id not in ended and worker.kill_at is not None and time.monotonic() > worker.kill_at:
                    worker.signal(signal.SIGKILL)
            for job_id in ended:
                del self._workers[job_id]
        for job_id, worker in ended.items():
            worker.log.close()
            self._settle(self.jobs.get(job_id), worker.process.returncode)

    def _launch(self) -> None:
        while not self._stopping and len(self._workers) < self.settings.max_running_jobs:
            queued = [job for job in self.jobs.with_status("queued") if job.id not in self._workers]
            if not queued:
                return
            job = queued[0]
            waiting = self.gpus.wait_reason()
            if waiting:
                if self._waiting_reported.get(job.id) != waiting:
                    self._waiting_reported[job.id] = waiting
                    self.jobs.record(job.id, "message", f"Waiting: {waiting}", level="warning")
                return
            self._waiting_reported.pop(job.id, None)
            if self.jobs.transition(job.id, ("queued",), "running", started_at=job.started_at or time.time(),
                                    message="Job started."):
                self._start_worker(job)

    def _start_worker(self, job: JobRecord) -> None:
        from qubrid_lab.models.loading import weights_location

        job_dir, log_file = self.job_dir(job.id), None
        try:
            entry = self.catalogue.get(job.base_model)
            model_dir = weights_location(entry, self.settings.model_cache_dir)
            job_dir.mkdir(parents=True, exist_ok=True)
            (job_dir / RESULT_FILE).unlink(missing_ok=True)
            log_file = (job_dir / LOG_FILE).open("ab")
            command, environment = self._command(job, model_dir)
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                       start_new_session=True, env=environment)
        except Exception as exc:  # a model that cannot be found or converted fails this job, not the queue
            if log_file:
                log_file.close()
            self._fail(job.id, f"the training process could not start: {getattr(exc, 'message', exc)}")
            return
        worker = _Worker(job.id, process, log_file)
        with self._lock:
            self._workers[job.id] = worker
            if self.jobs.get(job.id).status != "running":  # cancelled while it was being launched
                worker.stop()
        log.info("job %s: training in process %d", job.id, process.pid)

    def _command(self, job: JobRecord, model_dir: str) -> tuple[list[str], dict[str, str]]:
        """The worker's command line and environment: torchrun over every GPU when the device is 'auto' or
        'cuda' and there are several; ``cuda:N`` trains on GPU N alone (made the worker's only visible GPU)."""
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        device = self.gpus.visible(environment)
        worker = ["-m", "qubrid_lab.training.worker", "--database", str(self.jobs.db.path),
                  "--files-dir", str(self.datasets.files_dir), "--job-id", job.id, "--model-dir", model_dir,
                  "--job-dir", str(self.job_dir(job.id)), "--device", device, "--server-pid", str(os.getpid())]
        share = self.gpus.share()
        if share is not None:  # train in what a managed vLLM leaves (its share is fixed when it starts)
            environment[GPU_SHARE_VARIABLE] = f"{share:.3f}"
        gpus = gpu_count() if device in ("auto", "cuda") else 0
        if gpus > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                    *worker], environment
        return [sys.executable, *worker], environment

    # --- outcomes -----------------------------------------------------------------------------------

    def _settle(self, job: JobRecord, returncode: int) -> None:
        """Turn a finished worker into the job's final status (unless the job was cancelled meanwhile)."""
        if job.status != "running":
            return
        job_dir = self.job_dir(job.id)
        result_file, adapter_dir = job_dir / RESULT_FILE, job_dir / "adapter"
        result = json.loads(result_file.read_text()) if returncode == 0 and result_file.is_file() else None
        if result and result.get("train_tokens") and self.on_trained:
            try:
                self.on_trained(job, int(result["train_tokens"]))
            except Exception:  # the ledger failing is no reason to lose the model
                log.warning("could not record the training tokens of job %s", job.id, exc_info=True)
        if result and not result.get("stopped") and (adapter_dir / "adapter_config.json").is_file():
            model = FineTunedModelRecord(
                id=fine_tuned_model_id(job.base_model, job.suffix, job.id), base_model=job.base_model, job_id=job.id,
                status="available", adapter_dir=adapter_dir, created_at=time.time())
            metrics = {"steps_completed": result.get("steps", job.steps_completed),
                       "epochs_completed": result.get("epochs", job.epochs_completed),
                       "training_loss": result.get("training_loss", job.training_loss),
                       "validation_loss": result.get("validation_loss", job.validation_loss)}
            # Served first, so that a client that sees the job completed can use its model at once.
            self._announce(model, report=True)
            if not self.jobs.complete(job.id, model, completion_message(model.id, result),
                                      **metrics) and self.on_model_removed:  # cancelled meanwhile
                try:
                    self.on_model_removed(model.id)
                except Exception:
                    log.warning("could not stop serving %s of cancelled job %s", model.id, job.id, exc_info=True)
            return
        if result and result.get("stopped"):
            reason = "training stopped before it finished"
        else:
            reason = job.error or exit_reason(returncode, job_dir / LOG_FILE)
        self._fail(job.id, reason)

    def _fail(self, job_id: str, reason: str) -> None:
        log.warning("job %s failed: %s", job_id, reason)
        self.jobs.transition(job_id, ACTIVE_STATUSES, "failed", error=reason, completed_at=time.time(),
                             message=f"Job failed: {reason}", level="error")

    def _announce(self, model: FineTunedModelRecord, report: bool = False) -> None:
        if not self.on_model_ready:
            return
        try:
            self.on_model_ready(model.id, model.base_model, model.adapter_dir, int(model.created_at))
        except Exception as exc:
            log.warning("fine-tuned model %s cannot be served: %s", model.id, exc, exc_info=True)
            if report:
                reason = getattr(exc, "message", None) or str(exc)
                self.jobs.record(model.job_id, "message", f"The fine-tuned model could not be loaded for serving: "
                                 f"{reason}", level="warning")
