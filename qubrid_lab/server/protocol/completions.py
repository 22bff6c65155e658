"""``POST /v1/completions`` (legacy text completions): request, response and stream chunk."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from qubrid_lab.server.protocol.common import Metrics, SamplingFields, Usage, WireModel


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str]
    echo: bool | None = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must be a string or a non-empty array of strings")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class CompletionChoice(WireModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: str | None = None


class Completion(WireModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    x_metrics: Metrics | None = None
