"""Function calling on the wire: ``tools``, ``tool_choice``, and the calls an assistant message carries."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from qubrid_lab.engine.sampling import SamplingParams
from qubrid_lab.engine.tool_calls import NO_PARAMETERS
from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.server.protocol.common import WireModel
from qubrid_lab.server.protocol.response_format import ResponseFormat


def check_tool_choice(choice: str | None, named: str | None, declared: set[str]) -> None:
    """Refuse a ``tool_choice`` that needs tools when none are declared, or names one that is not."""
    if (choice == "required" or named is not None) and not declared:
        raise ValueError("tool_choice needs tools: declare the functions the model may call")
    if named is not None and named not in declared:
        raise ValueError(f"tool_choice names function '{named}', which is not among the tools")


def format_and_tools(
    params: SamplingParams,
    response_format: ResponseFormat | None,
    tools: list[dict] | None,
    tool_choice: str | dict,
    parallel_tool_calls: bool,
) -> dict:
    """The output format and function tools as a ``GenerationRequest`` takes them, alike for chat and the
    Responses API: a structured format becomes ``params``' decoding grammar; one beside callable tools is a 400
    (a tool call is JSON of its own shape)."""
    structured = response_format is not None and response_format.type != "text"
    if structured and tools and tool_choice != "none":
        raise InvalidRequestError(
            "response_format and tools cannot be combined: a tool call is JSON of its "
            "own shape; drop one, or set tool_choice to 'none'.",
            param="response_format",
        )
    if structured:
        params.grammar = response_format.grammar()
    return {
        "response_format": response_format.wire() if structured else None,
        "tools": tools or None,
        "tool_choice": tool_choice,
        "parallel_tool_calls": parallel_tool_calls,
    }


class FunctionDefinition(WireModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict | None = Field(None, description="A JSON Schema for the arguments object.")
    strict: bool | None = False

    @field_validator("parameters")
    @classmethod
    def _usable(cls, value: dict | None) -> dict | None:
        from qubrid_lab.server.protocol.response_format import json_grammar

        if value is not None:
            json_grammar(value, strict=False)  # a schema that cannot be compiled is refused before any work
        return value

    def wire(self) -> dict:
        return {
            "name": self.name,
            "description": self.description or "",
            "parameters": self.parameters or NO_PARAMETERS,
            **({"strict": True} if self.strict else {}),
        }


class Tool(WireModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(WireModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON object, in a string.")


class ToolCall(WireModel):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction
