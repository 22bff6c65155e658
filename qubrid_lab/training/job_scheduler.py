"""The job queue's one thread: it starts queued jobs' workers, reaps the ones that ended and kills the ones that
linger after being asked to stop.

At most ``settings.max_running_jobs`` workers train at once (one by default: a job takes the whole training
device), and none starts while a managed vLLM leaves too little of a GPU. Requests never wait for this thread:
they change a job's status in the database, signal its worker through ``stop_worker`` and ``wake`` the queue.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from qubrid_lab.storage.jobs import JobStore
from qubrid_lab.training.gpu_share import TrainingGpus
from qubrid_lab.training.job_outcomes import JobOutcomes
from qubrid_lab.training.job_workers import WorkerLauncher, WorkerProcess
from qubrid_lab.training.worker_contract import JobFiles

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


class JobScheduler:
    """Runs queued jobs in worker processes, ``max_running`` at a time; ``files(job_id)`` is a job's directory."""

    def __init__(
        self,
        jobs: JobStore,
        max_running: int,
        gpus: TrainingGpus,
        launcher: WorkerLauncher,
        outcomes: JobOutcomes,
        files: Callable[[str], JobFiles],
    ):
        self.jobs = jobs
        self.max_running = max_running
        self.gpus = gpus
        self.launcher = launcher
        self.outcomes = outcomes
        self.files = files
        self._workers: dict[str, WorkerProcess] = {}
        self._waiting_reported: dict[str, str] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="qubrid-lab:jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and every worker (killing those that outlive their grace); their jobs stay
        ``running``, to resume at the next start."""
        self._stopping = True
        self._wake.set()
        if self._thread:
            self._thread.join()
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            if self.jobs.get(worker.job_id).status == "running":
                self.jobs.record(
                    worker.job_id,
                    "message",
                    "The server is stopping; training stops here and "
                    "resumes from the last checkpoint when the server starts again.",
                )
            worker.stop()
        for worker in workers:
            try:
                worker.process.wait(timeout=max(0.0, worker.kill_at - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.signal(signal.SIGKILL)
                worker.process.wait()
            worker.log.close()

    def wake(self) -> None:
        """Look at the queue now rather than at the next poll."""
        self._wake.set()

    def stop_worker(self, job_id: str, sig: int | None = None) -> None:
        """Ask a job's worker, if it has one, to stop (see ``WorkerProcess.stop``)."""
        with self._lock:
            worker = self._workers.get(job_id)
            if worker:
                worker.stop(sig)

    def worker_pid(self, job_id: str) -> int | None:
        """The process id of a running job's worker (torchrun's, under several GPUs)."""
        with self._lock:
            worker = self._workers.get(job_id)
        return worker.process.pid if worker else None

    def _run(self) -> None:
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
                if job_id not in ended and worker.overdue():
                    worker.signal(signal.SIGKILL)
            for job_id in ended:
                del self._workers[job_id]
        for job_id, worker in ended.items():
            worker.log.close()
            self.outcomes.settle(self.jobs.get(job_id), worker.process.returncode, self.files(job_id))

    def _launch(self) -> None:
        while not self._stopping and len(self._workers) < self.max_running:
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
            if not self.jobs.transition(
                job.id, ("queued",), "running", started_at=job.started_at or time.time(), message="Job started."
            ):
                continue
            try:
                worker = self.launcher.launch(job, self.files(job.id))
            except Exception as exc:  # a model that cannot be found or converted fails this job, not the queue
                self.outcomes.fail(job.id, f"the training process could not start: {getattr(exc, 'message', exc)}")
                continue
            with self._lock:
                self._workers[job.id] = worker
                if self.jobs.get(job.id).status != "running":  # cancelled while it was being launched
                    worker.stop()
            log.info("job %s: training in process %d", job.id, worker.process.pid)
