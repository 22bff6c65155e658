"""The bridge from the Trainer's events to a ``ProgressSink``, and the sink's stop request back into the Trainer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback

if TYPE_CHECKING:
    from qubrid_lab.training.runner import ProgressSink


class SinkCallback(TrainerCallback):
    """Forwards losses, evaluations and checkpoints to the sink, and stops training when the sink asks.

    With ``logging_steps=1`` the Trainer logs every optimizer step, so the stop request is checked right after
    each step's loss is reported (and between the micro-batches of an accumulated step): the last step the sink
    saw is the last one trained.

    Only the world's process zero talks to the sink; under DDP it broadcasts its stop decision so every rank
    leaves the loop at the same step (a rank that went on alone would wait forever in the next all-reduce).
    ``tokens`` of a step are the non-padding tokens all ranks trained on in it, from the Trainer's own count.
    """

    def __init__(self, sink: ProgressSink):
        self.sink = sink
        self.stopped = False
        self.started = False
        self.last_training_loss: float | None = None
        self.last_validation_loss: float | None = None
        self._tokens_seen = 0
        self._logged_at = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = True
        self._tokens_seen = state.num_input_tokens_seen  # not 0 when resuming from a checkpoint
        self._logged_at = time.perf_counter()

    def on_substep_end(self, args, state, control, **kwargs):
        self._check_stop(args, state, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in logs:  # the end-of-training summary has train_loss instead
            return
        tokens, self._tokens_seen = state.num_input_tokens_seen - self._tokens_seen, state.num_input_tokens_seen
        now, started = time.perf_counter(), self._logged_at
        self._logged_at = now
        self.last_training_loss = logs["loss"]
        if state.is_world_process_zero:
            self.sink.on_train_step(
                step=state.global_step,
                epoch=state.epoch,
                loss=logs["loss"],
                learning_rate=logs["learning_rate"],
                tokens=tokens,
                grad_norm=logs.get("grad_norm"),
                tokens_per_second=tokens / (now - started) if now > started else None,
            )
        self._check_stop(args, state, control)  # after the step is reported, before its evaluation and save

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.last_validation_loss = metrics["eval_loss"]
        if state.is_world_process_zero:
            self.sink.on_evaluation(
                step=state.global_step,
                epoch=state.epoch,
                validation_loss=metrics["eval_loss"],
                token_accuracy=metrics.get("eval_mean_token_accuracy"),
            )

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.sink.on_checkpoint(
                step=state.global_step, path=Path(args.output_dir) / f"checkpoint-{state.global_step}"
            )

    def _check_stop(self, args, state, control) -> None:
        stop = state.is_world_process_zero and self.sink.should_stop()
        keep = stop and self.sink.save_before_stopping()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flags = torch.tensor([int(stop), int(keep)], device=args.device)
            torch.distributed.broadcast(flags, src=0)
            stop, keep = bool(flags[0].item()), bool(flags[1].item())
        if stop:
            self.stopped = True
            control.should_training_stop = True
            # Leave at once: no evaluation; a checkpoint only for a pause, which resumes from it.
            control.should_evaluate = False
            control.should_save = keep
