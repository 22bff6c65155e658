"""What a request's key may see of the served models: every model, except other keys' fine-tuned ones."""

from __future__ import annotations

from fastapi import Request

from qubrid_lab.server.auth import scope_of


def hidden_models(request: Request) -> set[str]:
    """Fine-tuned models owned by someone else than the request's key (none for an admin or an open server)."""
    scope = scope_of(request)
    if scope is None:
        return set()
    owners = request.app.state.job_manager.jobs.model_owners()
    return {model_id for model_id, owner in owners.items() if owner != scope}


def chat_backend(request: Request, model_id: str):
    return request.app.state.registry.chat_model(model_id, hidden_models(request))


def embedding_backend(request: Request, model_id: str):
    return request.app.state.registry.embedding_model(model_id, hidden_models(request))


def reads_images(backend) -> bool:
    """Whether a chat model takes ``image_url`` parts: what a loaded embedded model is, else its entry's ``vision``."""
    return bool(getattr(backend, "vision", backend.entry.vision))
