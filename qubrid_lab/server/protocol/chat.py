"""``POST /v1/chat/completions``: request, response and stream chunk."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from qubrid_lab.engine.base import GenerationRequest
from qubrid_lab.engine.logprobs import MAX_TOP_LOGPROBS
from qubrid_lab.server.protocol.common import Metrics, SamplingFields, Usage, WireModel
from qubrid_lab.server.protocol.logprobs import ChatLogprobs
from qubrid_lab.server.protocol.response_format import ResponseFormat


class ImageURL(WireModel):
    url: str


class ContentPart(WireModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(WireModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def has_image(self) -> bool:
        return isinstance(self.content, list) and any(part.type == "image_url" for part in self.content)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    logprobs: bool | None = Field(False, description="Return each output token's log probability.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="With logprobs: this many most likely tokens at each position.")

    response_format: ResponseFormat | None = Field(
        None, description="text, json_object, or json_schema (structured outputs, enforced while decoding).")

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return value

    @property
    def logprobs_wanted(self) -> int | None:
        """How many rivals per token to return, or None for no log probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def generation_request(self) -> GenerationRequest:
        """The request as every chat backend receives it."""
        params = self.sampling_params(self.token_limit, self.logprobs_wanted)
        structured = self.response_format is not None and self.response_format.type != "text"
        if structured:
            params.grammar = self.response_format.grammar()
        return GenerationRequest(params, self.choices_per_prompt, messages=self.template_messages(),
                                 response_format=self.response_format.wire() if structured else None)

    def template_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class AssistantMessage(WireModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(WireModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


class ChatCompletion(WireModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    x_metrics: Metrics
