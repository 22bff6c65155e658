"""``POST /v1/responses`` (OpenAI's Responses API, stateless): the request and its translation to a chat request.

Text and function calling: ``input`` as a string or message items (with ``function_call`` and
``function_call_output`` items for a tool round trip), ``instructions``, ``max_output_tokens``, sampling
fields, function ``tools``, and ``text.format`` for structured output. Nothing is stored: ``store`` is
accepted and ignored (this server keeps no responses), and ``previous_response_id`` is refused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from qubrid_lab.engine.base import GenerationRequest
from qubrid_lab.engine.sampling import SamplingParams
from qubrid_lab.engine.structured import json_grammar
from qubrid_lab.server.protocol.common import WireModel
from qubrid_lab.server.protocol.response_format import ResponseFormat
from qubrid_lab.server.protocol.tools import FunctionDefinition, check_tool_choice, format_and_tools


class InputText(WireModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(WireModel):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionCallItem(WireModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(WireModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem


class FunctionTool(FunctionDefinition):
    type: Literal["function"]


class NamedFunctionChoice(WireModel):
    type: Literal["function"]
    name: str


class TextFormat(WireModel):
    """``text.format``: the Responses API spells a json_schema format flat (name, schema, strict)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = False

    @field_validator("schema_")
    @classmethod
    def _usable(cls, value: dict | None) -> dict | None:
        if value is not None:
            json_grammar(value, strict=False)
        return value

    @field_validator("strict")
    @classmethod
    def _enforceable(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value and info.data.get("schema_") is not None:
            json_grammar(info.data["schema_"], strict=True)
        return value

    def response_format(self) -> ResponseFormat:
        if self.type != "json_schema":
            return ResponseFormat(type=self.type)
        return ResponseFormat(
            type="json_schema",
            json_schema={"name": self.name or "output", "schema": self.schema_, "strict": self.strict},
        )


class TextOptions(WireModel):
    format: TextFormat = Field(default_factory=TextFormat)


class ResponseRequest(WireModel):
    model: str
    input: str | list[InputItem] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, ge=0, le=1)
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = "auto"
    parallel_tool_calls: bool | None = True
    text: TextOptions | None = None
    stream: bool | None = False
    store: bool | None = Field(None, description="Accepted; this server stores no responses.")
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    @field_validator("previous_response_id")
    @classmethod
    def _stateless(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError(
                "this server keeps no responses, so it cannot continue one: send the whole "
                "conversation in input (the earlier output items included) instead"
            )
        return value

    @field_validator("tool_choice")
    @classmethod
    def _names_a_tool(cls, value, info: ValidationInfo):
        check_tool_choice(
            value,
            value.name if isinstance(value, NamedFunctionChoice) else None,
            {tool.name for tool in info.data.get("tools") or []},
        )
        return value

    def messages(self) -> list[dict]:
        """``instructions`` and ``input`` as chat messages; consecutive function calls share one assistant turn."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                    messages[-1]["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "content": item.output, "tool_call_id": item.call_id})
        return messages

    def generation_request(self) -> GenerationRequest:
        params = SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_tokens=self.max_output_tokens,
        )
        choice = self.tool_choice or "auto"
        return GenerationRequest(
            params,
            1,
            messages=self.messages(),
            **format_and_tools(
                params,
                self.text.format.response_format() if self.text else None,
                [{"type": "function", "function": tool.wire()} for tool in self.tools or []],
                {"type": "function", "function": {"name": choice.name}}
                if isinstance(choice, NamedFunctionChoice)
                else choice,
                self.parallel_tool_calls is not False,
            ),
        )

    def echoed(self) -> dict:
        """The request's settings as a response object repeats them."""
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "tools": [{"type": "function", **tool.wire()} for tool in self.tools or []],
            "tool_choice": self.tool_choice.model_dump()
            if isinstance(self.tool_choice, NamedFunctionChoice)
            else (self.tool_choice or "auto"),
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "text": {"format": self.text.format.model_dump(by_alias=True, exclude_none=True)}
            if self.text
            else {"format": {"type": "text"}},
            "store": False,
            "previous_response_id": None,
            "metadata": self.metadata or {},
        }
