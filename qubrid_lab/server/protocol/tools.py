"""Function calling on the wire: ``tools``, ``tool_choice``, and the calls an assistant message carries."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from qubrid_lab.server.protocol.common import WireModel

NO_PARAMETERS = {"type": "object", "properties": {}}


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
        return {"name": self.name, "description": self.description or "",
                "parameters": self.parameters or NO_PARAMETERS, **({"strict": True} if self.strict else {})}


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
