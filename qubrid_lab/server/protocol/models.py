"""``GET /v1/models`` and ``GET /v1/models/{model_id}``."""

from __future__ import annotations

from typing import Literal

from qubrid_lab.server.protocol.common import WireModel


class Model(WireModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(WireModel):
    object: Literal["list"] = "list"
    data: list[Model]
