"""``response_format``: free text, any JSON object, or JSON valid against a schema (structured outputs).

A schema is checked here, before any work, by compiling it to an llguidance grammar: llguidance is the
constrained-decoding library the embedded engine decodes with (vLLM uses it too), so what it accepts here is
exactly what the engine enforces. ``strict: true`` refuses a schema with keywords the grammar cannot enforce;
otherwise they are ignored (llguidance's lenient mode), as OpenAI's non-strict mode does not promise them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from qubrid_lab.engine.structured import ANY_OBJECT, json_grammar
from qubrid_lab.server.protocol.common import WireModel


class JsonSchemaFormat(WireModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema", description="A JSON Schema whose root is an object schema.")
    strict: bool | None = False

    @field_validator("schema_")
    @classmethod
    def _usable(cls, value: dict | None) -> dict | None:
        if value is not None:
            json_grammar(value, strict=False)  # strict is checked with the whole format, once it is known
        return value


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _given_for_json_schema(cls, value: JsonSchemaFormat | None, info: ValidationInfo):
        if info.data.get("type") == "json_schema":
            if value is None:
                raise ValueError("type 'json_schema' needs json_schema, with its name and schema")
            if value.strict:
                json_grammar(value.schema_ or ANY_OBJECT, strict=True)
        return value

    def grammar(self) -> str | None:
        """The llguidance grammar the output must match; None for free text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return json_grammar(ANY_OBJECT, strict=False)
        return json_grammar(self.json_schema.schema_ or ANY_OBJECT, strict=bool(self.json_schema.strict))

    def wire(self) -> dict:
        """As the client sent it, for backends that enforce it themselves."""
        return self.model_dump(by_alias=True, exclude_none=True)
