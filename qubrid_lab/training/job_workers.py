"""Worker processes of the job manager: starting one for a job, stopping it gracefully, and reading why it ended.

A worker runs in its own process group (so the ranks ``torchrun`` starts are signalled together), writing its
output to the job's ``worker.log``; its command line and the job directory's files are ``worker_contract``'s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from qubrid_lab.models.catalogue import Catalogue
from qubrid_lab.settings import Settings
from qubrid_lab.storage.jobs import JobRecord
from qubrid_lab.training.gpu_share import TrainingGpus, gpu_count
from qubrid_lab.training.worker_contract import GPU_SHARE_VARIABLE, PAUSE_SIGNAL, JobFiles, WorkerArguments

STOP_GRACE_SECONDS = 10.0  # a worker asked to stop that is still alive after this is killed (a pause: 3 times)


@dataclass
class WorkerProcess:
    """A running worker process and its open log."""

    job_id: str
    process: subprocess.Popen
    log: IO[bytes]
    kill_at: float | None = None  # monotonic time after which a worker asked to stop is killed

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

    def overdue(self) -> bool:
        """Asked to stop, and still alive past its grace period."""
        return self.kill_at is not None and time.monotonic() > self.kill_at


class WorkerLauncher:
    """Starts jobs' workers: on the base model's weights (a GGUF or hub model is converted once, here), with
    the server's database and dataset files, on the training device (torchrun over every GPU when several)."""

    def __init__(self, settings: Settings, catalogue: Catalogue, database: Path, files_dir: Path, gpus: TrainingGpus):
        self.settings = settings
        self.catalogue = catalogue
        self.database = database
        self.files_dir = files_dir
        self.gpus = gpus

    def launch(self, job: JobRecord, files: JobFiles) -> WorkerProcess:
        """Start ``job``'s worker, appending to its log; raises if the model or the process cannot be had."""
        from qubrid_lab.models.loading import weights_location

        model_dir = weights_location(self.catalogue.get(job.base_model), self.settings.model_cache_dir)
        files.path.mkdir(parents=True, exist_ok=True)
        files.result.unlink(missing_ok=True)
        log = files.log.open("ab")
        try:
            command, environment = self.command(job, model_dir, files)
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=environment,
            )
        except BaseException:
            log.close()
            raise
        return WorkerProcess(job.id, process, log)

    def command(self, job: JobRecord, model_dir: str, files: JobFiles) -> tuple[list[str], dict[str, str]]:
        """The worker's command line and environment: torchrun over every GPU when the device is 'auto' or
        'cuda' and there are several; ``cuda:N`` trains on GPU N alone (made the worker's only visible GPU)."""
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        device = self.gpus.visible(environment)
        worker = WorkerArguments(
            database=self.database,
            job_id=job.id,
            model_dir=model_dir,
            job_dir=files.path,
            device=device,
            files_dir=self.files_dir,
            server_pid=os.getpid(),
        ).command_line()
        share = self.gpus.share()
        if share is not None:  # train in what a managed vLLM leaves (its share is fixed when it starts)
            environment[GPU_SHARE_VARIABLE] = f"{share:.3f}"
        gpus = gpu_count() if device in ("auto", "cuda") else 0
        if gpus > 1:
            return [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={gpus}",
                *worker,
            ], environment
        return [sys.executable, *worker], environment


def exit_reason(returncode: int, files: JobFiles) -> str:
    """Why a worker that left no reason of its own ended: its signal, or its exit status and last log line."""
    if returncode < 0:
        number = -returncode
        name = signal.Signals(number).name if number in signal.valid_signals() else "unknown"
        hint = "; out of memory?" if number == signal.SIGKILL else ""
        return f"the training process was killed by signal {number} ({name}{hint})"
    if returncode == 0:
        return "the training process ended without saving an adapter"
    lines = (
        [line for line in files.log.read_text(errors="replace").splitlines() if line.strip()]
        if files.log.is_file()
        else []
    )
    return f"the training process exited with status {returncode}" + (f": {lines[-1].strip()}" if lines else "")
