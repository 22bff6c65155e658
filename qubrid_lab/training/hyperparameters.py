"""A fine-tuning job's hyperparameters: the spec's four fields plus LoRA and batching extensions.

Every field has a default, so ``{}`` is a valid, sensible configuration for a small chat model. Validation
reports every bad field at once (pydantic collects them), each naming its allowed range.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


class Hyperparameters(BaseModel):
    """How a LoRA fine-tuning job trains. Fields after ``validation_split`` are qubrid_lab extensions."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(3, ge=1, le=100, description="Full passes over the training rows.")
    max_steps: int | None = Field(
        None, ge=1, le=1_000_000, description="Stop after this many optimizer steps if the epochs have not ended first."
    )
    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate of the AdamW optimizer.")
    validation_split: float = Field(
        0.0, ge=0, lt=1, description="Fraction of rows held out to measure validation loss (0 = none)."
    )
    # Extensions
    lora_rank: int = Field(16, ge=1, le=512, description="Rank r of the LoRA update matrices.")
    lora_alpha: float = Field(32, gt=0, le=4096, description="LoRA scaling numerator: the update is scaled by alpha/r.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    target_modules: list[str] | str = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        description="Linear layers that get LoRA adapters: a list of module names, or 'all-linear'.",
    )
    batch_size: int = Field(8, ge=1, le=1024, description="Training rows per optimizer step (per device).")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Micro-batches summed per optimizer step.")
    max_seq_length: int = Field(512, ge=16, le=131072, description="Rows longer than this many tokens are cut.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps with a linearly rising learning rate.")
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate the validation split every this many steps (default: about 10 times per run)."
    )
    save_steps: int | None = Field(
        None, ge=1, description="Save a resumable checkpoint every this many steps (default: about 5 times per run)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save GPU memory.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for the split, shuffling, LoRA init and dropout.")
    save_total_limit: int = Field(
        3, ge=1, le=100, description="Checkpoints kept on disk (the newest ones, plus the best by validation loss)."
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Stop when validation loss has not improved for this many evaluations (needs validation data).",
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0, description="How much validation loss must drop to count as an improvement."
    )
    load_best_at_end: bool = Field(
        False,
        description="Serve the checkpoint with the lowest validation loss, not the last one (needs validation data).",
    )
    report_to: str = Field(
        "none",
        description="Experiment tracker the run reports to: none, tensorboard, mlflow, "
        "trackio or wandb (installed separately).",
    )

    @field_validator("target_modules")
    @classmethod
    def _known_targets(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str):
            if value != "all-linear":
                raise ValueError("must be a list of module names or the string 'all-linear'")
            return value
        if not value or any(not name.strip() for name in value):
            raise ValueError("must name at least one module, with no empty names")
        return value


# report_to value -> the package its transformers integration needs
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "trackio": "trackio", "wandb": "wandb"}


def validation_needs(hyperparameters: Hyperparameters, validation_dataset: bool = False) -> list[tuple[str, str]]:
    """(field, problem) for each setting that needs validation data when there is none (no split, no validation
    dataset)."""
    if hyperparameters.validation_split > 0 or validation_dataset:
        return []
    fix = "it needs validation data: hold some rows out with hyperparameters.validation_split (e.g. 0.1)"
    return [
        (f"hyperparameters.{name}", fix)
        for name in ("early_stopping_patience", "load_best_at_end")
        if getattr(hyperparameters, name)
    ]


def tracker_problems(report_to: str) -> list[tuple[str, str]]:
    """(field, problem) when ``report_to`` names no tracker, or one whose package is not installed here."""
    import importlib.util

    if report_to == "none":
        return []
    if report_to not in TRACKERS:
        return [("hyperparameters.report_to", f"must be none, {', '.join(TRACKERS)} (got {report_to!r})")]
    package = TRACKERS[report_to]
    if importlib.util.find_spec(package) is None:
        return [("hyperparameters.report_to", f"{report_to} is not installed on the server: pip install {package}")]
    return []
