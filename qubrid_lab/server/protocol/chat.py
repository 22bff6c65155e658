"""``POST /v1/chat/completions``: request, response and stream chunk."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from qubrid_lab.engine.base import GenerationRequest
from qubrid_lab.engine.logprobs import MAX_TOP_LOGPROBS
from qubrid_lab.server.protocol.common import Metrics, SamplingFields, Usage, WireModel
from qubrid_lab.server.protocol.logprobs import ChatLogprobs
from qubrid_lab.server.protocol.response_format import ResponseFormat
from qubrid_lab.server.protocol.tools import (
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolChoice,
    check_tool_choice,
    format_and_tools,
)


class ImageURL(WireModel):
    url: str = Field(description="An http(s) URL or a data URL (data:image/png;base64,...).")
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(WireModel):
    type: Literal["text", "image_url"]
    text: str | None = Field(None, validate_default=True)
    image_url: ImageURL | None = Field(None, validate_default=True)

    @field_validator("text", "image_url", mode="after")
    @classmethod
    def _has_its_field(cls, value, info: ValidationInfo):
        if value is None and info.data.get("type") == info.field_name:
            raise ValueError(f"a content part of type '{info.field_name}' needs its '{info.field_name}' field")
        return value

    def backend_part(self) -> dict:
        if self.type == "text":
            return {"type": "text", "text": self.text}
        return {"type": "image_url", "image_url": self.image_url.model_dump(exclude_none=True)}


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant message's calls.")
    tool_call_id: str | None = Field(None, validate_default=True, description="A tool message: the call it answers.")
    content: str | list[ContentPart] | None = Field(None, validate_default=True)
    name: str | None = None

    @field_validator("tool_call_id", mode="after")
    @classmethod
    def _answers_a_call(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "tool" and not value:
            raise ValueError("a message with role 'tool' needs tool_call_id, the id of the call it answers")
        return value

    @field_validator("content", mode="after")
    @classmethod
    def _present(cls, value, info: ValidationInfo):
        if value is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError(f"a message with role '{info.data.get('role', '?')}' needs content")
        return value

    def has_image(self) -> bool:
        return isinstance(self.content, list) and any(part.type == "image_url" for part in self.content)

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or "" for part in self.content if part.type == "text")

    def template_message(self) -> dict:
        """The message as backends receive it: its content (text, or OpenAI's parts when it holds an image), and
        its tool calls or the call it answers."""
        content = [part.backend_part() for part in self.content] if self.has_image() else self.text()
        message = {"role": self.role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    logprobs: bool | None = Field(False, description="Return each output token's log probability.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="With logprobs: this many most likely tokens at each position."
    )

    response_format: ResponseFormat | None = Field(
        None, description="text, json_object, or json_schema (structured outputs, enforced while decoding)."
    )
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = True

    @field_validator("tool_choice")
    @classmethod
    def _names_a_tool(cls, value, info: ValidationInfo):
        check_tool_choice(
            value,
            value.function.name if isinstance(value, NamedToolChoice) else None,
            {tool.function.name for tool in info.data.get("tools") or []},
        )
        return value

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
        choice = self.tool_choice or "auto"
        return GenerationRequest(
            params,
            self.choices_per_prompt,
            messages=self.template_messages(),
            **format_and_tools(
                params,
                self.response_format,
                [tool.model_dump() for tool in self.tools or []],
                choice.model_dump() if isinstance(choice, NamedToolChoice) else choice,
                self.parallel_tool_calls is not False,
            ),
        )

    def template_messages(self) -> list[dict]:
        return [m.template_message() for m in self.messages]

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class AssistantMessage(WireModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


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
