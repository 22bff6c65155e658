"""How a fine-tuning job ends: a finished worker's result turned into the job's final status, its fine-tuned model
registered and served, or the reason it failed.

Fine-tuned model ids follow OpenAI's form ``ft:{base_model}:{suffix}:{job_id}``; without a suffix the field
stays empty (``ft:{base_model}::{job_id}``), so the id always splits into the same four parts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from qubrid_lab.storage.jobs import ACTIVE_STATUSES, FineTunedModelRecord, JobRecord, JobStore
from qubrid_lab.training.checkpoints import fine_tuned_model_id
from qubrid_lab.training.job_workers import exit_reason
from qubrid_lab.training.worker_contract import JobFiles

log = logging.getLogger(__name__)

ModelReady = Callable[[str, str, Path, int], None]  # (model_id, base_model, adapter_dir, created)
ModelRemoved = Callable[[str], None]  # (model_id)
Trained = Callable[[JobRecord, int], None]  # (job, tokens trained on)


def completion_message(model_id: str, result: dict) -> str:
    """What the completed job says: its model, and which checkpoint that model holds when validation chose one."""
    parts = [f"Job completed; fine-tuned model {model_id} is ready"]
    if result.get("early_stopped"):
        parts.append(f"training stopped early at step {result['steps']}: validation loss had stopped improving")
    best, served = result.get("best_step"), result.get("served_step")
    if best is not None:
        parts.append(
            f"it holds the best checkpoint's weights (step {best})"
            if served == best
            else f"it holds step {served}'s weights; the best checkpoint by validation loss is step {best}"
        )
    return "; ".join(parts) + "."


class JobOutcomes:
    """Final statuses and fine-tuned models, with the server told of each model (see ``JobManager``)."""

    def __init__(
        self,
        jobs: JobStore,
        on_model_ready: ModelReady | None,
        on_model_removed: ModelRemoved | None,
        on_trained: Trained | None,
    ):
        self.jobs = jobs
        self.on_model_ready = on_model_ready
        self.on_model_removed = on_model_removed
        self.on_trained = on_trained

    def settle(self, job: JobRecord, returncode: int, files: JobFiles) -> None:
        """Turn a finished worker into the job's final status (unless the job was cancelled meanwhile)."""
        if job.status != "running":
            return
        result = json.loads(files.result.read_text()) if returncode == 0 and files.result.is_file() else None
        if result and result.get("train_tokens") and self.on_trained:
            try:
                self.on_trained(job, int(result["train_tokens"]))
            except Exception:  # the ledger failing is no reason to lose the model
                log.warning("could not record the training tokens of job %s", job.id, exc_info=True)
        if result and not result.get("stopped") and (files.adapter / "adapter_config.json").is_file():
            self._complete(job, result, files)
            return
        if result and result.get("stopped"):
            reason = "training stopped before it finished"
        else:
            reason = job.error or exit_reason(returncode, files)
        self.fail(job.id, reason)

    def _complete(self, job: JobRecord, result: dict, files: JobFiles) -> None:
        model = FineTunedModelRecord(
            id=fine_tuned_model_id(job.base_model, job.suffix, job.id),
            base_model=job.base_model,
            job_id=job.id,
            status="available",
            adapter_dir=files.adapter,
            created_at=time.time(),
        )
        metrics = {
            "steps_completed": result.get("steps", job.steps_completed),
            "epochs_completed": result.get("epochs", job.epochs_completed),
            "training_loss": result.get("training_loss", job.training_loss),
            "validation_loss": result.get("validation_loss", job.validation_loss),
        }
        # Served first, so that a client that sees the job completed can use its model at once.
        self.announce(model, report=True)
        if (
            not self.jobs.complete(job.id, model, completion_message(model.id, result), **metrics)
            and self.on_model_removed
        ):  # cancelled meanwhile
            try:
                self.on_model_removed(model.id)
            except Exception:
                log.warning("could not stop serving %s of cancelled job %s", model.id, job.id, exc_info=True)

    def fail(self, job_id: str, reason: str) -> None:
        log.warning("job %s failed: %s", job_id, reason)
        self.jobs.transition(
            job_id,
            ACTIVE_STATUSES,
            "failed",
            error=reason,
            completed_at=time.time(),
            message=f"Job failed: {reason}",
            level="error",
        )

    def announce(self, model: FineTunedModelRecord, report: bool = False) -> None:
        """Serve a fine-tuned model; a failure is logged (and with ``report``, told in its job's events)."""
        if not self.on_model_ready:
            return
        try:
            self.on_model_ready(model.id, model.base_model, model.adapter_dir, int(model.created_at))
        except Exception as exc:
            log.warning("fine-tuned model %s cannot be served: %s", model.id, exc, exc_info=True)
            if report:
                reason = getattr(exc, "message", None) or str(exc)
                self.jobs.record(
                    model.job_id,
                    "message",
                    f"The fine-tuned model could not be loaded for serving: {reason}",
                    level="warning",
                )
