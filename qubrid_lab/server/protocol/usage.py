"""``GET /v1/usage`` (extension): tokens and cost per day, model and key."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qubrid_lab.server.protocol.common import WireModel


class UsageRecord(WireModel):
    date: str = Field(description="The UTC day, YYYY-MM-DD.")
    model: str
    key_name: str = Field(description="The API key's name ('(no key)' on a server without keys).")
    requests: int = Field(description="Inference requests (jobs count 0: their tokens are training_tokens).")
    prompt_tokens: int
    completion_tokens: int
    training_tokens: int
    cost: float = Field(description="USD at the model's prices; charged to a key only when it has credits.")


class UsageList(WireModel):
    object: Literal["list"] = "list"
    data: list[UsageRecord]
