"""What a request's key may see of the served models: every model, except other keys' fine-tuned ones."""

from __future__ import annotations

from fastapi import Request

from qubrid_lab.server.auth import scope_of
from qubrid_lab.training.checkpoints import parse_checkpoint_model


def hidden_models(request: Request) -> set[str]:
    """Fine-tuned models and served checkpoints owned by someone else than the request's key (none for an admin
    or an open server)."""
    scope = scope_of(request)
    if scope is None:
        return set()
    jobs = request.app.state.job_manager.jobs
    hidden = {model_id for model_id, owner in jobs.model_owners().items() if owner != scope}
    for model_id in request.app.state.registry.chat:
        parsed = parse_checkpoint_model(model_id)
        if parsed is not None and jobs.find(parsed[1], scope) is None:
            hidden.add(model_id)
    return hidden


def chat_backend(request: Request, model_id: str):
    """The chat model ``model_id``; a job's checkpoint (``...:ckpt-step-N``) is loaded on its first request."""
    registry = request.app.state.registry
    if model_id not in registry.chat:
        request.app.state.job_manager.serve_checkpoint(model_id, scope_of(request))
    return registry.chat_model(model_id, hidden_models(request))


def embedding_backend(request: Request, model_id: str):
    return request.app.state.registry.embedding_model(model_id, hidden_models(request))


def reads_images(backend) -> bool:
    """Whether a chat model takes ``image_url`` parts: what a loaded embedded model is, else its entry's ``vision``."""
    return bool(getattr(backend, "vision", backend.entry.vision))
