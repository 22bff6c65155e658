"""Pieces shared by the generation endpoints: stop sequences, usage, sampling fields."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

if TYPE_CHECKING:
    from qubrid_lab.engine.sampling import SamplingParams


TokenIds = list[Annotated[int, Field(ge=0)]]  # a prompt or input given as token ids (OpenAI accepts both)


def one_per_input(value: str | list) -> list[str | list[int]]:
    """A ``prompt`` or ``input`` field (a text, texts, token ids, or lists of them) as one entry per input."""
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        return [value]
    return list(value)


MAX_STOP_LENGTH = 1024  # streaming holds back as many characters as the longest stop sequence has
StopString = Annotated[str, StringConstraints(max_length=MAX_STOP_LENGTH)]


class WireModel(BaseModel):
    """Unknown fields are ignored, as OpenAI-compatible servers do, so newer SDKs keep working."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(WireModel):
    include_usage: bool = False


class SamplingFields(WireModel):
    """The sampling fields chat and text completions share. ``null`` means the default."""

    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, ge=0, le=1)
    n: int | None = Field(1, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    stream: bool | None = False
    stop: StopString | list[StopString] | None = None
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, description="Extension (OpenAI): makes sampling reproducible.")
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed, got {len(value)}")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream set to true")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None = None, echo_logprobs: bool = False
    ) -> SamplingParams:
        # imported here: the engine loads torch, which the notebook widgets that read these fields' ranges do without
        from qubrid_lab.engine.sampling import SamplingParams

        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_tokens=max_tokens,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed,
            stop=self.stop_list(),
            logprobs=logprobs,
            echo_logprobs=echo_logprobs,
        )

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class PromptTokensDetails(WireModel):
    cached_tokens: int = Field(
        description="Leading prompt tokens whose keys/values the server had cached from an earlier prompt (a "
        "conversation's history, a repeated request): not computed again, billed as any prompt token."
    )


class Usage(WireModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class Metrics(WireModel):
    """``x_metrics``: measured on the server for this request."""

    ttft_seconds: float
    tps: float
    total_time_seconds: float
