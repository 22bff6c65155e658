"""``GET /v1/models`` and ``GET /v1/models/{model_id}``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qubrid_lab.server.protocol.common import WireModel


class Model(WireModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # extensions: what the model does, so clients need not probe it
    kind: Literal["chat", "embedding"] = Field(description="Extension: 'chat' (text generation) or 'embedding'.")
    vision: bool = Field(False, description="Extension: whether chat messages may carry image_url parts.")


class ModelList(WireModel):
    object: Literal["list"] = "list"
    data: list[Model]
