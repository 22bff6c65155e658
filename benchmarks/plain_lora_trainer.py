"""The reference for ``finetune_throughput.py``: LoRA with peft on transformers' Trainer, as a user writes it.

No qubrid_lab training code runs here. The rows are formatted into examples by ``qubrid_lab.data`` only so
that both runs train on the same token ids; batching uses transformers' own ``DataCollatorForSeq2Seq``.
The Trainer's own non-padding token count (``include_num_input_tokens_seen``) gives the tokens trained.

    python benchmarks/plain_lora_trainer.py --model-dir DIR --data FILE.csv --steps 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()

import torch  # noqa: E402 - the start time above includes the imports, as a job's does
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from qubrid_lab.data.columns import plan_columns  # noqa: E402
from qubrid_lab.data.csv_ingest import read_rows  # noqa: E402
from qubrid_lab.data.formatting import build_examples  # noqa: E402


class StepClock(TrainerCallback):
    """When each optimizer step ended, the tokens trained by then, and the logged losses."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float, int]] = []
        self.losses: dict[int, float] = {}
        self.first_loss_s: float | None = None
        self.ended: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.losses[state.global_step] = logs["loss"]
            if self.first_loss_s is None:
                self.first_loss_s = time.perf_counter() - STARTED

    def on_train_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ended = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--data", type=Path, required=True, help="a CSV with question/answer columns")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--target-modules", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, required=True, help="where to write what was measured")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = read_rows(args.data)
    plan = plan_columns(list(rows[0]), "qa")
    examples = build_examples(rows, plan, tokenizer, args.max_seq_length).examples

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    set_seed(args.seed)
    model = get_peft_model(
        model,
        LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=args.target_modules,
        ),
    )
    clock = StepClock()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=output_dir,
                max_steps=args.steps,
                learning_rate=args.learning_rate,
                per_device_train_batch_size=args.batch_size,
                bf16=bf16,
                use_cpu=not cuda,
                seed=args.seed,
                data_seed=args.seed,
                logging_steps=1,  # as a job logs, so the two loss curves compare step by step
                save_strategy="no",
                report_to="none",
                disable_tqdm=True,
                include_num_input_tokens_seen="non_padding",
                remove_unused_columns=False,
                ddp_find_unused_parameters=False,
            ),
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
            train_dataset=examples,
            callbacks=[clock],
        )
        trainer.train()

    (_, first_end, first_tokens), (_, _, last_tokens) = clock.steps[0], clock.steps[-1]
    args.json.write_text(
        json.dumps(
            {
                "steps": len(clock.steps),
                "tokens": last_tokens,
                "tokens_per_s": (last_tokens - first_tokens) / (clock.ended - first_end),
                "first_loss_s": clock.first_loss_s,
                "losses": clock.losses,
                "peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / 1024**3 if cuda else None,
            }
        )
    )


if __name__ == "__main__":
    main()
