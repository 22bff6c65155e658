"""``POST /v1/completions`` (legacy text completions): request, response and stream chunk."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from qubrid_lab.server.protocol.common import Metrics, SamplingFields, TokenIds, Usage, WireModel, one_per_input
from qubrid_lab.server.protocol.logprobs import CompletionLogprobs

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound for the legacy endpoint


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="Text, texts, token ids, or lists of token ids (one prompt each)."
    )
    echo: bool | None = False
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_COMPLETION_LOGPROBS,
        description=(
            "Return each token's log probability and this many most likely tokens at each position (with echo: "
            "the prompt's tokens too)."
        ),
    )

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("prompt must be a string, a non-empty array of strings, or non-empty arrays of token ids")
        return value

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: its text, or its token ids."""
        return one_per_input(self.prompt)


class CompletionChoice(WireModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(WireModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    x_metrics: Metrics | None = None
