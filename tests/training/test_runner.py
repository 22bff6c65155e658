"""A LoRA run on the tiny model, end to end on the CPU: what the sink sees, what is written, how runs stop,
resume and repeat.

The tiny model's output head is frozen and its hidden size is 64, so its loss cannot fall far (about 5.9 to
5.6 on one repeated answer); the tests check that it falls, not by how much.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qubrid_lab.data.columns import ColumnPlan
from qubrid_lab.data.dataset_files import read_dataset
from qubrid_lab.data.formatting import build_examples
from qubrid_lab.data.splits import split_examples
from qubrid_lab.training.batches import PACKED, PADDED
from qubrid_lab.training.checkpoints import saved_checkpoints
from qubrid_lab.training.hyperparameters import Hyperparameters
from qubrid_lab.training.runner import TrainingError, TrainingSpec, train

QA = ColumnPlan("qa", question="question", answer="answer")


class RecordingSink:
    """Keeps every call; asks to stop once it has seen ``stop_after`` training steps."""

    def __init__(self, stop_after: int | None = None, keep_progress: bool = False):
        self.stop_after = stop_after
        self.keep_progress = keep_progress
        self.start: tuple[int, int, int] | None = None
        self.steps: list[dict] = []
        self.evaluations: list[dict] = []
        self.checkpoints: list[dict] = []

    def on_start(self, total_steps: int, train_rows: int, validation_rows: int) -> None:
        self.start = (total_steps, train_rows, validation_rows)

    def on_train_step(self, step, epoch, loss, learning_rate, tokens, grad_norm=None, tokens_per_second=None) -> None:
        self.steps.append(
            {
                "step": step,
                "epoch": epoch,
                "loss": loss,
                "learning_rate": learning_rate,
                "tokens": tokens,
                "grad_norm": grad_norm,
                "tokens_per_second": tokens_per_second,
            }
        )

    def on_evaluation(self, step, epoch, validation_loss, token_accuracy=None) -> None:
        self.evaluations.append(
            {"step": step, "epoch": epoch, "validation_loss": validation_loss, "token_accuracy": token_accuracy}
        )

    def on_checkpoint(self, step, path) -> None:
        self.checkpoints.append({"step": step, "path": path})

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.steps) >= self.stop_after

    def save_before_stopping(self) -> bool:
        return self.keep_progress

    @property
    def losses(self) -> list[float]:
        return [record["loss"] for record in self.steps]

    @property
    def step_numbers(self) -> list[int]:
        return [record["step"] for record in self.steps]


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("question,answer\n" + "".join(f"{question},{answer}\n" for question, answer in rows))
    return path


@pytest.fixture(scope="module")
def repeated_csv(tmp_path_factory) -> Path:
    """Eight copies of one question and answer: a dataset the tiny model can only get better at."""
    return write_csv(tmp_path_factory.mktemp("data") / "repeated.csv", [("What colour is the sky?", "It is blue.")] * 8)


@pytest.fixture(scope="module")
def facts_csv(tmp_path_factory) -> Path:
    """Twelve different short facts, so batches differ in length and content."""
    rows = [(f"What is fact number {i}?", f"Fact {i} is that {i} plus {i} is {2 * i}.") for i in range(12)]
    return write_csv(tmp_path_factory.mktemp("data") / "facts.csv", rows)


@pytest.fixture
def run(tiny_model_dir, tmp_path):
    """``run(csv, output_name, sink=None, **hyperparameters) -> (sink, result)`` on the tiny model, on the CPU."""

    def go(
        csv: Path,
        output: str = "job",
        sink: RecordingSink | None = None,
        validation_path: Path | None = None,
        validation_plan: ColumnPlan | None = None,
        **overrides,
    ):
        options = {"epochs": 50, "batch_size": 4, "learning_rate": 1e-2, "lora_rank": 8, "max_seq_length": 64}
        sink = sink or RecordingSink()
        spec = TrainingSpec(
            model_dir=str(tiny_model_dir),
            dataset_path=csv,
            plan=QA,
            hyperparameters=Hyperparameters(**{**options, **overrides}),
            output_dir=tmp_path / output,
            device="cpu",
            validation_path=validation_path,
            validation_plan=validation_plan,
        )
        return sink, train(spec, sink)

    return go


def test_loss_falls_on_a_repeated_answer_and_every_step_is_reported_in_order(run, repeated_csv, tiny_tokenizer):
    sink, result = run(repeated_csv, max_steps=10)

    assert sink.start == (10, 8, 0)
    assert sink.step_numbers == list(range(1, 11))
    assert sum(sink.losses[-3:]) / 3 < sink.losses[0] - 0.2
    assert all(record["tokens"] > 0 for record in sink.steps)
    assert sum(record["tokens"] for record in sink.steps) == result.train_tokens
    assert result.steps == 10 and result.training_loss == sink.losses[-1] and not result.stopped
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in result.adapter_dir.iterdir()}
    # the chat template the rows were rendered with is kept beside the adapter, for serving
    assert (result.adapter_dir / "chat_template.jinja").read_text() == tiny_tokenizer.chat_template
    # each step also reports its gradient norm and speed
    assert all(record["grad_norm"] > 0 and record["tokens_per_second"] > 0 for record in sink.steps)


def test_tokens_per_step_count_the_non_padding_tokens_of_the_batch(run, repeated_csv):
    sink, _ = run(repeated_csv, max_steps=2)

    # Identical rows: every step trains four copies of one example, with no padding.
    assert sink.steps[0]["tokens"] == sink.steps[1]["tokens"]
    assert sink.steps[0]["tokens"] % 4 == 0


@pytest.mark.parametrize("packs", [True, False])
def test_an_epoch_trains_every_row_once_on_packed_or_on_padded_batches(
    run, facts_csv, tiny_tokenizer, monkeypatch, packs
):
    if not packs:  # as for a model whose rows would not stay apart in one sequence (Mamba)
        monkeypatch.setattr("qubrid_lab.training.batches.keeps_packed_rows_apart", lambda model: False)
    sink, result = run(facts_csv, epochs=1, validation_split=0.25)

    assert result.batching == (PACKED if packs else PADDED)  # the tiny Llama keeps packed rows apart
    examples = build_examples(read_dataset(facts_csv), QA, tiny_tokenizer, 64).examples
    trained = split_examples(examples, 0.25, 42).train
    assert result.train_tokens == sum(len(example["input_ids"]) for example in trained)  # no padding counted
    assert [record["step"] for record in sink.steps] == [1, 2, 3]
    assert sink.evaluations and all(0 <= record["token_accuracy"] <= 1 for record in sink.evaluations)


def test_epochs_set_the_number_of_steps(run, facts_csv):
    sink, result = run(facts_csv, epochs=2)

    # 12 rows in batches of 4: 3 steps an epoch.
    assert sink.start == (6, 12, 0)
    assert sink.step_numbers == list(range(1, 7))
    assert [record["epoch"] for record in sink.steps][2::3] == pytest.approx([1.0, 2.0])
    assert result.epochs == pytest.approx(2.0)


def test_max_steps_stops_before_the_epochs_are_done(run, facts_csv):
    sink, result = run(facts_csv, epochs=3, max_steps=2)

    assert sink.step_numbers == [1, 2]
    assert result.steps == 2 and result.epochs < 1


def test_the_epochs_end_a_run_before_a_larger_max_steps(run, facts_csv):
    sink, result = run(facts_csv, epochs=1, max_steps=10)

    assert sink.start == (3, 12, 0)
    assert sink.step_numbers == [1, 2, 3]
    assert result.epochs == pytest.approx(1.0)


def test_validation_loss_is_reported_with_a_validation_split(run, facts_csv):
    sink, result = run(facts_csv, max_steps=4, validation_split=0.25, eval_steps=2)

    assert sink.start == (4, 9, 3)
    assert [record["step"] for record in sink.evaluations] == [2, 4]
    assert all(record["validation_loss"] > 0 for record in sink.evaluations)
    assert result.validation_loss == sink.evaluations[-1]["validation_loss"]


def test_a_validation_dataset_replaces_the_split(run, facts_csv, repeated_csv):
    sink, result = run(facts_csv, max_steps=2, eval_steps=1, validation_path=repeated_csv, validation_plan=QA)
    assert sink.start == (2, 12, 8)  # every training row trained, the other file's 8 validated
    assert [record["step"] for record in sink.evaluations] == [1, 2] and result.validation_loss > 0


def test_no_validation_loss_without_a_split(run, facts_csv):
    sink, result = run(facts_csv, max_steps=4, validation_split=0, eval_steps=2)

    assert sink.evaluations == []
    assert result.validation_loss is None


def test_a_tiny_split_still_holds_out_one_row(run, facts_csv):
    sink, _ = run(facts_csv, max_steps=1, validation_split=0.01)

    assert sink.start[1:] == (11, 1)


def test_should_stop_ends_the_run_after_the_step_it_saw_and_writes_no_adapter(run, facts_csv, tmp_path):
    sink, result = run(facts_csv, sink=RecordingSink(stop_after=2), max_steps=8, validation_split=0.25, eval_steps=2)

    assert sink.step_numbers == [1, 2]
    assert sink.evaluations == []  # the step-2 evaluation is skipped: the run was asked to stop
    assert result.stopped and result.steps == 2
    assert not (tmp_path / "job" / "adapter").exists()


def test_a_stopped_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(run, facts_csv):
    whole, _ = run(facts_csv, output="whole", max_steps=6, save_steps=2)
    first, stopped = run(facts_csv, output="resumed", sink=RecordingSink(stop_after=3), max_steps=6, save_steps=2)
    second, resumed = run(facts_csv, output="resumed", max_steps=6, save_steps=2)

    assert stopped.stopped and [record["step"] for record in first.checkpoints] == [2]
    # Steps continue after the checkpoint at step 2, with the losses the uninterrupted run had.
    assert second.step_numbers == [3, 4, 5, 6]
    assert second.losses == pytest.approx(whole.losses[2:], rel=1e-5)
    assert resumed.steps == 6 and not resumed.stopped
    assert resumed.adapter_dir.joinpath("adapter_model.safetensors").is_file()


def test_an_unusable_checkpoint_fails_with_that_reason(run, facts_csv, tmp_path):
    run(facts_csv, sink=RecordingSink(stop_after=3), max_steps=6, save_steps=2)
    checkpoint = tmp_path / "job" / "checkpoints" / "checkpoint-2"
    (checkpoint / "adapter_model.safetensors").write_bytes(b"not a safetensors file")

    with pytest.raises(TrainingError, match="checkpoint-2 is unusable"):
        run(facts_csv, max_steps=6, save_steps=2)


def test_a_checkpoint_cut_short_while_saving_is_passed_over(run, facts_csv, tmp_path):
    run(facts_csv, sink=RecordingSink(stop_after=3), max_steps=6, save_steps=2)
    (tmp_path / "job" / "checkpoints" / "checkpoint-4").mkdir()  # killed before its trainer state was written

    sink, result = run(facts_csv, max_steps=6, save_steps=2)

    assert sink.step_numbers == [3, 4, 5, 6] and result.steps == 6


def test_the_same_spec_and_seed_give_the_same_losses_and_another_seed_does_not(run, facts_csv):
    first, _ = run(facts_csv, output="a", max_steps=4, validation_split=0.25)
    again, _ = run(facts_csv, output="b", max_steps=4, validation_split=0.25)
    other, _ = run(facts_csv, output="c", max_steps=4, validation_split=0.25, seed=7)

    assert first.losses == again.losses
    assert first.evaluations == again.evaluations
    assert other.losses != first.losses


def test_gradient_checkpointing_recomputes_the_same_losses(run, facts_csv, monkeypatch):
    import transformers.modeling_utils

    checkpointed_calls = []
    checkpoint = transformers.modeling_utils.checkpoint
    monkeypatch.setattr(
        transformers.modeling_utils,
        "checkpoint",
        lambda *args, **kwargs: checkpointed_calls.append(1) or checkpoint(*args, **kwargs),
    )
    plain, _ = run(facts_csv, output="plain", max_steps=3)
    assert not checkpointed_calls
    checkpointed, _ = run(facts_csv, output="checkpointed", max_steps=3, gradient_checkpointing=True)

    assert checkpointed_calls  # the decoder layers ran through torch's checkpoint
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)


def test_the_adapter_loads_back_with_peft_and_changes_the_logits(run, repeated_csv, tiny_model_dir, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, result = run(repeated_csv, max_steps=4)
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}

    ids = torch.tensor([tiny_tokenizer("What colour is the sky?")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, result.adapter_dir).eval()
        after = tuned(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_a_dataset_without_usable_rows_fails_with_that_reason(run, tmp_path):
    empty_answers = write_csv(tmp_path / "empty.csv", [("A question?", ""), ("Another?", " ")])

    with pytest.raises(TrainingError, match="no usable rows: of 2 rows, 2 have an empty question or answer"):
        run(empty_answers, max_steps=1)


def test_a_validation_split_of_a_single_row_fails_with_that_reason(run, tmp_path):
    one_row = write_csv(tmp_path / "one.csv", [("A question?", "An answer.")])

    with pytest.raises(TrainingError, match="at least 2 usable rows"):
        run(one_row, max_steps=1, validation_split=0.5)


def test_an_unknown_target_module_fails_with_that_reason(run, repeated_csv):
    with pytest.raises(TrainingError, match="cannot attach LoRA adapters"):
        run(repeated_csv, max_steps=1, target_modules=["no_such_proj"])


def test_running_out_of_memory_is_reported_with_what_to_lower(run, repeated_csv, monkeypatch):
    from transformers import Trainer

    def exhausted(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train", exhausted)
    with pytest.raises(TrainingError, match=r"out of .*memory .*lower batch_size \(now 4\), max_seq_length \(now 64\)"):
        run(repeated_csv, max_steps=1)


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_checkpoints_keep_their_weights_and_metrics_and_the_best_one(run, facts_csv, tmp_path):
    sink, result = run(facts_csv, max_steps=8, validation_split=0.25, eval_steps=2, save_total_limit=2)
    kept = saved_checkpoints(tmp_path / "job" / "checkpoints")
    evaluations = {record["step"]: record for record in sink.evaluations}
    best = min(evaluations.values(), key=lambda record: record["validation_loss"])["step"]
    assert result.best_step == best and result.served_step == 8  # without load_best_at_end: the last step's
    # the two newest, plus the best when it is older (saved at every evaluation, as choosing it needs)
    assert [c.step for c in kept] == sorted({8, 6, best}, reverse=True)
    for checkpoint in kept:
        names = {p.name for p in checkpoint.path.iterdir()}
        assert "adapter_model.safetensors" in names and "optimizer.pt" not in names  # weights, not resume state
        assert checkpoint.metrics["step"] == checkpoint.step
        assert checkpoint.metrics["valid_loss"] == pytest.approx(evaluations[checkpoint.step]["validation_loss"])
        assert 0 <= checkpoint.metrics["valid_mean_token_accuracy"] <= 1
        assert checkpoint.metrics["train_loss"] > 0
    assert all(0 <= record["token_accuracy"] <= 1 for record in sink.evaluations)


def test_load_best_at_end_serves_the_best_checkpoints_weights(run, facts_csv, tmp_path):
    _, result = run(
        facts_csv, max_steps=8, validation_split=0.25, eval_steps=2, load_best_at_end=True, learning_rate=5e-2
    )
    assert result.served_step == result.best_step
    best = adapter_weights(tmp_path / "job" / "checkpoints" / f"checkpoint-{result.best_step}")
    served = adapter_weights(result.adapter_dir)
    assert set(best) == set(served) and all(torch.equal(best[name], served[name]) for name in best)


def test_early_stopping_ends_the_run_once_validation_loss_stops_improving(run, facts_csv):
    # no evaluation can beat the best by this threshold, so every one after the first counts against patience
    sink, result = run(
        facts_csv,
        max_steps=40,
        validation_split=0.25,
        eval_steps=2,
        early_stopping_patience=2,
        early_stopping_threshold=100.0,
    )
    assert result.early_stopped and not result.stopped
    assert result.steps < 40 and len(sink.evaluations) <= 3
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_a_run_reports_every_steps_loss_to_tensorboard(run, repeated_csv, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tensorboard"))
    sink, _ = run(repeated_csv, max_steps=4, report_to="tensorboard")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == sink.step_numbers
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(sink.losses, rel=1e-5)


def test_a_run_reports_to_a_local_mlflow_store(run, repeated_csv, tmp_path, monkeypatch):
    import mlflow

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "qubrid-tests")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    sink, _ = run(repeated_csv, max_steps=4, report_to="mlflow", learning_rate=3e-3)
    client = mlflow.MlflowClient(tracking_uri=store)
    [logged] = client.search_runs([client.get_experiment_by_name("qubrid-tests").experiment_id])
    history = sorted(client.get_metric_history(logged.info.run_id, "loss"), key=lambda metric: metric.step)
    assert [metric.step for metric in history] == sink.step_numbers
    assert [metric.value for metric in history] == pytest.approx(sink.losses, rel=1e-5)
    assert float(logged.data.params["learning_rate"]) == 3e-3 and logged.info.run_name == "job"
