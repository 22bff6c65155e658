"""Where training runs, and the base model with LoRA adapters attached.

Single process: CUDA when present (bf16 where the GPU has it, fp32 otherwise), else the CPU in fp32. Under a
distributed launcher (torchrun / accelerate, ``WORLD_SIZE`` > 1) the Trainer places each rank on its own GPU;
nothing here picks a device then.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from qubrid_lab.training.errors import TrainingError
from qubrid_lab.training.hyperparameters import Hyperparameters


@dataclass(frozen=True)
class Placement:
    """The device class training uses and the precision of the frozen base weights."""

    device: str  # "cpu" or "cuda"
    dtype: torch.dtype
    distributed: bool

    @property
    def bf16(self) -> bool:
        """Whether the Trainer should run the forward pass under bf16 autocast."""
        return self.dtype == torch.bfloat16

    @property
    def label(self) -> str:
        """Where training runs, in words, for error messages."""
        if self.device == "cpu":
            return "the CPU"
        return "the GPUs" if self.distributed else f"GPU {torch.cuda.get_device_name(0)}"


def world_size() -> int:
    """Processes in this training run (set by torchrun / accelerate launch; 1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in the process that reports progress and writes files: rank 0, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def resolve_placement(setting: str) -> Placement:
    """Turn ``auto | cpu | cuda[:N]`` into a placement.

    In a single process the Trainer trains on the first visible GPU, so ``cuda:N`` with N > 0 cannot be honoured
    from inside the process: the launcher sets ``CUDA_VISIBLE_DEVICES=N`` instead.
    """
    distributed = world_size() > 1
    if setting == "cpu":
        return Placement("cpu", torch.float32, distributed)
    if setting not in ("auto", "cuda") and not setting.startswith("cuda:"):
        raise TrainingError(f"device '{setting}' is not a training device; use auto, cpu or cuda[:N].")
    if not torch.cuda.is_available():
        if setting == "auto":
            return Placement("cpu", torch.float32, distributed)
        raise TrainingError(f"device '{setting}' was asked for but this machine has no usable CUDA GPU.")
    index = setting.partition(":")[2]
    if index and not distributed and index != "0":
        raise TrainingError(
            f"device '{setting}': a training process uses the first GPU it can see; "
            f"start it with CUDA_VISIBLE_DEVICES={index} and device 'cuda'."
        )
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return Placement("cuda", dtype, distributed)


def load_tokenizer(model_dir: str):
    """The base model's tokenizer, with a pad token (its own, else end-of-sequence) for batching."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise TrainingError(f"cannot load the tokenizer of '{model_dir}': {error}") from error
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise TrainingError(f"the tokenizer of '{model_dir}' has neither a pad nor an end-of-sequence token.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_model(model_dir: str, placement: Placement, hyperparameters: Hyperparameters):
    """The base model, frozen, with trainable LoRA adapters on ``target_modules`` (a peft ``PeftModel``).

    The LoRA matrices are initialised from the seed, so two runs of one spec start from the same weights.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=placement.dtype)
    except (OSError, ValueError) as error:
        raise TrainingError(f"cannot load the base model from '{model_dir}': {error}") from error
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=hyperparameters.lora_rank,
        lora_alpha=hyperparameters.lora_alpha,
        lora_dropout=hyperparameters.lora_dropout,
        target_modules=hyperparameters.target_modules,
    )
    set_seed(hyperparameters.seed)
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # e.g. a target module the model does not have
        raise TrainingError(f"cannot attach LoRA adapters: {error}") from error
