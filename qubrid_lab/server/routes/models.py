"""``GET /v1/models`` and ``GET /v1/models/{model_id}`` (ids may contain slashes)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from qubrid_lab.server.access import hidden_models, reads_images
from qubrid_lab.server.protocol.models import Model, ModelList

router = APIRouter()


def _describe(backend) -> Model:
    entry = backend.entry
    return Model(
        id=backend.model_id,
        created=backend.created,
        owned_by=entry.owned_by,
        kind=entry.kind,
        vision=reads_images(backend),
    )


@router.get("/models")
async def list_models(request: Request) -> ModelList:
    hidden = hidden_models(request)
    return ModelList(
        data=[_describe(b) for model_id, b in request.app.state.registry.all().items() if model_id not in hidden]
    )


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> Model:
    return _describe(request.app.state.registry.get(model_id, hidden_models(request)))
