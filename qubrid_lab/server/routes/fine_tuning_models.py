"""``/fine-tuning/models``: list and delete the models completed jobs produced (ids contain slashes)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from qubrid_lab.server.auth import scope_of
from qubrid_lab.server.protocol.fine_tuning import FineTunedModel, FineTunedModelList

router = APIRouter(prefix="/fine-tuning/models", tags=["Fine-Tuned Models"])


@router.get("")
def list_fine_tuned_models(request: Request) -> FineTunedModelList:
    return FineTunedModelList(
        data=[FineTunedModel.of(m) for m in request.app.state.job_manager.jobs.models(scope_of(request))]
    )


@router.delete("/{model_id:path}", status_code=204)
def delete_fine_tuned_model(model_id: str, request: Request) -> Response:
    """Stop serving the model and delete its adapter; it is gone from every list afterwards."""
    request.app.state.job_manager.delete_model(model_id, scope_of(request))
    return Response(status_code=204)
