"""``POST /v1/embeddings``: request and response."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from qubrid_lab.server.protocol.common import WireModel


class EmbeddingRequest(WireModel):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] | None = "float"
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _no_empty_text(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("input must be a string or a non-empty array of strings")
        if len(texts) > 2048:
            raise ValueError(f"at most 2048 inputs per request, got {len(texts)}")
        empty = [i for i, text in enumerate(texts) if not text]
        if empty:
            raise ValueError(f"input contains empty strings (at positions {empty[:10]}); each input must have text")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


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
