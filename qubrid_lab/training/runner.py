"""One LoRA fine-tuning run: CSV rows to examples, peft adapters on the base model, transformers' Trainer.

``train()`` is the function the job worker, the CLI, notebooks and the tests all call. It resumes from the
newest complete checkpoint under ``output_dir/checkpoints``, reports progress to a ``ProgressSink`` (the job
worker's sink writes job events), stops early when the sink asks, and saves only the adapter at the end.
Under torchrun / accelerate launch every rank calls ``train()``; the Trainer runs DDP and only rank 0 reports.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from qubrid_lab.data.columns import ColumnPlan
from qubrid_lab.data.formatting import IGNORE_INDEX
from qubrid_lab.data.splits import Split, split_examples, steps_per_epoch
from qubrid_lab.errors import QubridError
from qubrid_lab.models.loading import TRAINED_TEMPLATE_FILE
from qubrid_lab.training.batches import PACKED, ExampleDataset, choose_batching, collator, has_target
from qubrid_lab.training.callbacks import SinkCallback
from qubrid_lab.training.checkpoints import (
    CHECKPOINTS_DIR,
    TRAINER_STATE_FILE,
    checkpoint_step,
    latest_checkpoint,
)
from qubrid_lab.training.errors import TrainingError
from qubrid_lab.training.hyperparameters import Hyperparameters
from qubrid_lab.training.lora import (
    Placement,
    is_main_process,
    load_tokenizer,
    lora_model,
    resolve_placement,
    world_size,
)
from qubrid_lab.training.worker_contract import ADAPTER_DIR

__all__ = [
    "CHECKPOINTS_DIR",
    "ProgressSink",
    "TrainingError",
    "TrainingResult",
    "TrainingSpec",
    "checkpoint_step",
    "latest_checkpoint",
    "train",
]

log = logging.getLogger(__name__)


@dataclass
class TrainingSpec:
    """Everything one run needs: what to train, on which data, how, and where to write."""

    model_dir: str  # from_pretrained location of the float base model and its tokenizer
    dataset_path: Path  # the stored CSV
    plan: ColumnPlan  # which columns are question / answer / context / text
    hyperparameters: Hyperparameters
    output_dir: Path  # the job's directory: checkpoints/ and adapter/ are written inside
    device: str = "auto"  # auto | cpu | cuda[:N]
    validation_path: Path | None = None  # a dataset to validate on, instead of a split of the training one
    validation_plan: ColumnPlan | None = None  # its columns' roles


class ProgressSink(Protocol):
    """Receives a run's progress; ``should_stop`` is polled after every step. Called on rank 0 only."""

    def on_start(self, total_steps: int, train_rows: int, validation_rows: int) -> None: ...
    def on_train_step(
        self,
        step: int,
        epoch: float,
        loss: float,
        learning_rate: float,
        tokens: int,
        grad_norm: float | None = None,
        tokens_per_second: float | None = None,
    ) -> None: ...
    def on_evaluation(
        self, step: int, epoch: float, validation_loss: float, token_accuracy: float | None = None
    ) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def should_stop(self) -> bool: ...
    def save_before_stopping(self) -> bool: ...  # asked once should_stop() is true: a pause keeps its progress


@dataclass
class TrainingResult:
    """How a run ended. ``adapter_dir`` holds the adapter unless the run was stopped early (``stopped``)."""

    adapter_dir: Path
    steps: int  # optimizer steps completed, counting those before a resume
    epochs: float
    training_loss: float | None  # loss of the last step
    validation_loss: float | None  # loss of the last evaluation (None without a validation split)
    train_tokens: int  # non-padding tokens trained on, counting those before a resume
    seconds: float  # wall time of this call
    stopped: bool
    best_step: int | None = None  # the checkpoint with the lowest validation loss (with validation data)
    served_step: int | None = None  # the step whose weights the adapter holds: best_step with load_best_at_end
    early_stopped: bool = False  # validation loss stopped improving before the planned steps were done
    batching: str | None = None  # "packed" or "padded" (``training.batches``); None when stopped before loading


@dataclass(frozen=True)
class Schedule:
    """Step counts the Trainer is configured with; ``total_steps`` is exactly what it will run."""

    total_steps: int
    eval_steps: int
    save_steps: int


def plan_schedule(hyperparameters: Hyperparameters, train_rows: int) -> Schedule:
    """Total optimizer steps (``epochs`` passes, cut short at ``max_steps``), and evaluation / save intervals
    (about 10 evaluations and 5 checkpoints per run unless the hyperparameters set them)."""
    per_epoch = steps_per_epoch(
        train_rows, hyperparameters.batch_size, hyperparameters.gradient_accumulation_steps, world_size()
    )
    total = min(hyperparameters.epochs * per_epoch, hyperparameters.max_steps or math.inf)
    return Schedule(
        total_steps=total,
        eval_steps=hyperparameters.eval_steps or max(1, math.ceil(total / 10)),
        save_steps=hyperparameters.save_steps or max(1, math.ceil(total / 5)),
    )


def load_split(spec: TrainingSpec, tokenizer) -> Split:
    """Read the dataset, format its rows into token examples and split them (or validate on the job's validation
    dataset); an unusable dataset is an error."""
    examples = _usable_examples(spec.dataset_path, spec.plan, tokenizer, spec.hyperparameters.max_seq_length)
    if spec.validation_path is not None:
        held_out = _usable_examples(
            spec.validation_path,
            spec.validation_plan,
            tokenizer,
            spec.hyperparameters.max_seq_length,
            "validation dataset",
        )
        return Split(examples, held_out)
    try:
        return split_examples(examples, spec.hyperparameters.validation_split, spec.hyperparameters.seed)
    except ValueError as error:  # too few rows for the validation split
        raise TrainingError(str(error)) from error


def _usable_examples(path: Path, plan: ColumnPlan, tokenizer, max_seq_length: int, what: str = "dataset") -> list:
    """The examples of the dataset at ``path`` with at least one token to take the loss on."""
    from qubrid_lab.data.dataset_files import read_dataset
    from qubrid_lab.data.formatting import build_examples

    try:
        rows = read_dataset(path)
        example_set = build_examples(rows, plan, tokenizer, max_seq_length)
    except FileNotFoundError as error:
        raise TrainingError(f"the {what} file {path} is missing.") from error
    except QubridError as error:
        raise TrainingError(error.message) from error
    except ValueError as error:  # e.g. qa on a base model without a chat template
        raise TrainingError(str(error)) from error
    examples = [example for example in example_set.examples if has_target(example)]
    if not examples:
        required = {"qa": "question or answer", "not_qa": "text", "chat": "assistant message"}[plan.task_type]
        where = "" if what == "dataset" else f" in the {what}"
        raise TrainingError(
            f"no usable rows{where}: of {len(rows)} rows, {example_set.skipped_empty} have an empty {required} and "
            f"{len(rows) - example_set.skipped_empty} leave no answer token within max_seq_length {max_seq_length}."
        )
    return examples


def training_arguments(
    spec: TrainingSpec, schedule: Schedule, placement: Placement, has_validation: bool, batching: str
):
    """The Trainer's configuration: the hyperparameters, how batches are made (``batching``) and fixed choices (no
    hub, log every step)."""
    from transformers import TrainingArguments

    hyperparameters = spec.hyperparameters
    best = has_validation and (hyperparameters.load_best_at_end or hyperparameters.early_stopping_patience)
    return TrainingArguments(
        output_dir=str(spec.output_dir / CHECKPOINTS_DIR),
        max_steps=schedule.total_steps,
        learning_rate=hyperparameters.learning_rate,
        per_device_train_batch_size=hyperparameters.batch_size,
        per_device_eval_batch_size=hyperparameters.batch_size,
        gradient_accumulation_steps=hyperparameters.gradient_accumulation_steps,
        warmup_steps=hyperparameters.warmup_ratio,  # a float below 1 is a fraction of the total steps
        # The Trainer turns it on, and makes the embeddings' output require grad so LoRA gradients flow.
        activation_checkpointing=hyperparameters.gradient_checkpointing,
        bf16=placement.bf16,
        use_cpu=placement.device == "cpu",
        seed=hyperparameters.seed,
        data_seed=hyperparameters.seed,
        # padded batches take rows of similar length together, so that little padding is left to compute
        train_sampling_strategy="random" if batching == PACKED else "group_by_length",
        use_cache=False,  # with a cache, transformers would not read packed rows' boundaries from the position ids
        eval_strategy="steps" if has_validation else "no",
        eval_steps=schedule.eval_steps,
        prediction_loss_only=False,  # evaluation also measures token accuracy (on argmaxes, not logits)
        save_strategy="steps",
        # choosing the best checkpoint needs one saved at each evaluation
        save_steps=schedule.eval_steps if best else schedule.save_steps,
        # the best checkpoint is kept besides the newest ones
        save_total_limit=hyperparameters.save_total_limit + (1 if has_validation else 0),
        load_best_model_at_end=bool(has_validation and hyperparameters.load_best_at_end),
        metric_for_best_model="eval_loss" if has_validation else None,
        greater_is_better=False,
        logging_strategy="steps",
        logging_steps=1,
        include_num_input_tokens_seen="all" if batching == PACKED else "non_padding",  # packed: no padding at all
        report_to=hyperparameters.report_to,
        run_name=spec.output_dir.name,  # a job's directory is named after the job
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=placement.device == "cuda",
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every LoRA matrix takes part in every step; searching costs time
        push_to_hub=False,
    )


def predicted_tokens(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What evaluation keeps of each batch: the most likely next token at each position (not the logits)."""
    return logits.argmax(dim=-1)


def mean_token_accuracy(prediction) -> dict[str, float]:
    """The share of answer tokens (labels other than -100) the model predicts exactly, as OpenAI's
    ``valid_mean_token_accuracy``; position i predicts token i + 1. A packed batch is one row holding all its
    rows, and the first label of each is -100, so the same tokens count as in padded batches."""
    predicted = torch.as_tensor(prediction.predictions)[:, :-1]
    labels = torch.as_tensor(prediction.label_ids)[:, 1:]
    trained = labels != IGNORE_INDEX
    correct = (predicted == labels) & trained
    return {"mean_token_accuracy": float(correct.sum()) / max(int(trained.sum()), 1)}


def save_chat_template(tokenizer, folder: Path) -> None:
    """Keep the chat template the examples were rendered with beside the adapter, so serving renders prompts the
    way the model learned them even if the base model's template changes later."""
    if tokenizer.chat_template:
        (folder / TRAINED_TEMPLATE_FILE).write_text(tokenizer.chat_template)


def settle_checkpoints(checkpoints_dir: Path, keep: int, best_step: int | None) -> None:
    """After a finished run: keep the ``keep`` newest checkpoints and the best one (the Trainer kept one more, in
    case the best was among the newest), each with its adapter weights and trainer state only, to be listed and
    served; what only resuming needed (optimizer, scheduler, random states) goes."""
    newest = sorted(
        (checkpoint_step(path), path)
        for path in checkpoints_dir.glob("checkpoint-*")
        if (path / TRAINER_STATE_FILE).is_file()
    )
    for rank, (step, checkpoint) in enumerate(reversed(newest)):
        if rank >= keep and step != best_step:
            shutil.rmtree(checkpoint)
            continue
        for name in ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth"):
            (checkpoint / name).unlink(missing_ok=True)
        for rng in checkpoint.glob("rng_state_*.pth"):
            rng.unlink()


def is_memory_error(error: BaseException) -> bool:
    """True for the ways torch and Python report memory running out."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@contextmanager
def memory_errors_explained(placement: Placement, hyperparameters: Hyperparameters) -> Iterator[None]:
    """Turn running out of memory into a ``TrainingError`` that names what ran out and what to lower."""
    try:
        yield
    except Exception as error:
        if not is_memory_error(error):
            raise
        where = "GPU memory" if placement.device == "cuda" and not isinstance(error, MemoryError) else "host memory"
        hints = [
            f"batch_size (now {hyperparameters.batch_size})",
            f"max_seq_length (now {hyperparameters.max_seq_length})",
        ]
        if placement.device == "cuda" and not hyperparameters.gradient_checkpointing:
            hints.append("or turn on gradient_checkpointing")
        raise TrainingError(
            f"out of {where} while training on {placement.label}; lower " + ", ".join(hints) + "."
        ) from error


def train(spec: TrainingSpec, sink: ProgressSink) -> TrainingResult:
    """Fine-tune LoRA adapters on ``spec`` and save them to ``output_dir/adapter``.

    Resumes from the newest checkpoint under ``output_dir/checkpoints`` if there is one (steps continue from
    it). Returns with ``stopped=True`` and no adapter when ``sink.should_stop()`` turned true. Raises
    ``TrainingError`` for a reason a user can act on: no usable rows, an unusable checkpoint, out of memory.
    """
    from transformers import EarlyStoppingCallback, PrinterCallback, Trainer

    started = time.perf_counter()
    hyperparameters = spec.hyperparameters
    adapter_dir = spec.output_dir / ADAPTER_DIR

    # 1. Data: the tokenizer formats the rows; the split is fixed by the seed.
    placement = resolve_placement(spec.device)
    tokenizer = load_tokenizer(spec.model_dir)
    split = load_split(spec, tokenizer)
    schedule = plan_schedule(hyperparameters, len(split.train))
    checkpoint = latest_checkpoint(spec.output_dir / CHECKPOINTS_DIR)
    resumed_step = checkpoint_step(checkpoint) if checkpoint else 0
    if is_main_process():
        sink.on_start(schedule.total_steps, len(split.train), len(split.validation))
    if world_size() == 1 and sink.should_stop():  # under DDP the other ranks could not be told to stop here
        return TrainingResult(
            adapter_dir=adapter_dir,
            steps=resumed_step,
            epochs=0.0,
            training_loss=None,
            validation_loss=None,
            train_tokens=0,
            seconds=time.perf_counter() - started,
            stopped=True,
        )

    with memory_errors_explained(placement, hyperparameters):
        # 2. Model: frozen base weights, trainable LoRA matrices.
        model = lora_model(spec.model_dir, placement, hyperparameters)
        batching = choose_batching(model, placement.device)
        log.info("training on %s batches", batching)
        callback = SinkCallback(sink)
        callbacks = [callback]
        if split.validation and hyperparameters.early_stopping_patience:
            callbacks.append(
                EarlyStoppingCallback(hyperparameters.early_stopping_patience, hyperparameters.early_stopping_threshold)
            )
        trainer = Trainer(
            model=model,
            args=training_arguments(spec, schedule, placement, bool(split.validation), batching),
            data_collator=collator(batching, tokenizer.pad_token_id),
            train_dataset=ExampleDataset(split.train),
            eval_dataset=ExampleDataset(split.validation) if split.validation else None,
            callbacks=callbacks,
            compute_metrics=mean_token_accuracy if split.validation else None,
            preprocess_logits_for_metrics=predicted_tokens if split.validation else None,
        )
        trainer.remove_callback(PrinterCallback)  # progress goes to the sink, not stdout

        # 3. Train, from the checkpoint if there is one.
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except Exception as error:
            if checkpoint is not None and not callback.started and not is_memory_error(error):
                raise TrainingError(f"cannot resume: checkpoint {checkpoint} is unusable ({error}).") from error
            raise

    # 4. Save the adapter (the best checkpoint's weights with load_best_at_end: the Trainer loaded them back);
    #    the checkpoints keep their weights only, to be listed and served.
    state = trainer.state
    best_step = int(Path(state.best_model_checkpoint).name.split("-")[-1]) if state.best_model_checkpoint else None
    if not callback.stopped and trainer.args.should_save:
        model.save_pretrained(adapter_dir)
        settle_checkpoints(spec.output_dir / CHECKPOINTS_DIR, hyperparameters.save_total_limit, best_step)
        for folder in [adapter_dir, *(spec.output_dir / CHECKPOINTS_DIR).glob("checkpoint-*")]:
            save_chat_template(tokenizer, folder)
    return TrainingResult(
        adapter_dir=adapter_dir,
        steps=state.global_step,
        epochs=float(state.epoch or 0.0),
        training_loss=callback.last_training_loss,
        validation_loss=callback.last_validation_loss,
        train_tokens=state.num_input_tokens_seen,
        seconds=time.perf_counter() - started,
        stopped=callback.stopped,
        best_step=best_step,
        served_step=best_step if trainer.args.load_best_model_at_end and best_step else state.global_step,
        early_stopped=not callback.stopped and state.global_step < schedule.total_steps,
        batching=batching,
    )
