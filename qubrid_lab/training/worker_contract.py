"""What the job manager and the worker process it starts agree on: the worker's command line, what the manager
tells a running worker (signals, environment), and the files of a job's directory.

A job's directory, ``<home>/jobs/<job id>``, is the training run's ``output_dir``:

    worker.log        the worker's output (the manager opens it; its last line explains a crash)
    result.json       the run's ``TrainingResult``, written by the worker when training returns
    step_metrics.csv  the job's metrics, OpenAI's result file, written when training ends
    adapter/          the trained LoRA adapter: the fine-tuned model
    checkpoints/      the Trainer's ``checkpoint-N`` folders; the newest complete one is resumed from
    tensorboard/, mlruns/   where a tracker writes, unless the server's environment says otherwise

Both sides import these names from here, so neither can rename a file or a flag the other one reads.
"""

from __future__ import annotations

import argparse
import signal
from dataclasses import dataclass
from pathlib import Path

from qubrid_lab.training.checkpoints import CHECKPOINTS_DIR, checkpoint_step, latest_checkpoint
from qubrid_lab.training.errors import TrainingError

WORKER_MODULE = "qubrid_lab.training.worker"  # run as ``python -m``
LOG_FILE = "worker.log"
RESULT_FILE = "result.json"
METRICS_FILE = "step_metrics.csv"
ADAPTER_DIR = "adapter"
GPU_SHARE_VARIABLE = "QUBRID_LAB_GPU_MEMORY_FRACTION"  # set by the manager beside a managed vLLM
PAUSE_SIGNAL = signal.SIGUSR1  # "save a checkpoint, then stop"; SIGTERM stops without saving


@dataclass(frozen=True)
class JobFiles:
    """The paths inside one job's directory."""

    path: Path

    @property
    def log(self) -> Path:
        return self.path / LOG_FILE

    @property
    def result(self) -> Path:
        return self.path / RESULT_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"checkpoint-{step}"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def mlruns(self) -> Path:
        return self.path / "mlruns"

    def resume_step(self) -> int | None:
        """The step the run resumes from: that of the newest complete checkpoint, if there is one."""
        checkpoint = latest_checkpoint(self.checkpoints)
        try:
            return checkpoint_step(checkpoint) if checkpoint else None
        except TrainingError:
            return None


@dataclass(frozen=True)
class WorkerArguments:
    """The worker's command line as values (``build_parser`` says what each is): ``command_line()`` writes it,
    ``parse()`` reads it back."""

    database: Path
    job_id: str
    model_dir: str
    job_dir: Path
    device: str = "auto"
    files_dir: Path | None = None
    server_pid: int | None = None

    def command_line(self) -> list[str]:
        """The arguments after the Python executable (or after ``torchrun``'s own)."""
        arguments = [
            "-m",
            WORKER_MODULE,
            "--database",
            str(self.database),
            "--job-id",
            self.job_id,
            "--model-dir",
            self.model_dir,
            "--job-dir",
            str(self.job_dir),
            "--device",
            self.device,
        ]
        if self.files_dir is not None:
            arguments += ["--files-dir", str(self.files_dir)]
        if self.server_pid is not None:
            arguments += ["--server-pid", str(self.server_pid)]
        return arguments

    @classmethod
    def parse(cls, argv: list[str] | None = None) -> WorkerArguments:
        return cls(**vars(build_parser().parse_args(argv)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {WORKER_MODULE}",
        description="Train one fine-tuning job, reporting into the server's database.",
    )
    parser.add_argument("--database", type=Path, required=True, help="the server's SQLite file")
    parser.add_argument("--job-id", required=True, help="the job to train (ftjob-...)")
    parser.add_argument("--model-dir", required=True, help="from_pretrained location of the base model")
    parser.add_argument("--job-dir", type=Path, required=True, help="where checkpoints/ and adapter/ are written")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--files-dir", type=Path, help="where datasets are stored (default: <database dir>/files)")
    parser.add_argument("--server-pid", type=int, help="stop training if this process goes away (default: parent)")
    return parser
