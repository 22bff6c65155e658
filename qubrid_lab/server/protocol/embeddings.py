"""``POST /v1/embeddings``: request and response."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from qubrid_lab.server.protocol.common import TokenIds, WireModel, one_per_input

MAX_INPUTS = 2048


class EmbeddingRequest(WireModel):
    model: str
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] | None = "float"
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _no_empty_input(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("input must be a string, a non-empty array of strings, or arrays of token ids")
        inputs = one_per_input(value)
        if len(inputs) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request, got {len(inputs)}")
        empty = [i for i, item in enumerate(inputs) if not item]
        if empty:
            raise ValueError(
                f"input contains empty inputs (at positions {empty[:10]}); each input must have text or token ids"
            )
        return value

    def inputs(self) -> list[str | list[int]]:
        """One entry per input: its text, or its token ids."""
        return one_per_input(self.input)


class EmbeddingObject(WireModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingUsage(WireModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(WireModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: EmbeddingUsage
