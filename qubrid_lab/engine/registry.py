"""The loaded models of one server, looked up by id and kind."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from qubrid_lab.engine.base import ChatBackend, EmbeddingBackend
from qubrid_lab.engine.thread import ModelThread
from qubrid_lab.errors import ModelNotFoundError
from qubrid_lab.models.catalogue import Catalogue, ModelEntry
from qubrid_lab.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ModelRegistry:
    """Chat and embedding backends by model id; routes ask it for the right kind of model."""

    chat: dict[str, ChatBackend] = field(default_factory=dict)
    embedding: dict[str, EmbeddingBackend] = field(default_factory=dict)
    thread: ModelThread | None = None  # the local models' shared model thread

    def all(self) -> dict[str, ChatBackend | EmbeddingBackend]:
        return {**self.chat, **self.embedding}

    def get(self, model_id: str) -> ChatBackend | EmbeddingBackend:
        try:
            return self.all()[model_id]
        except KeyError:
            raise ModelNotFoundError(model_id, sorted(self.all())) from None

    def chat_model(self, model_id: str) -> ChatBackend:
        return self._of_kind(model_id, self.chat, self.embedding,
                             "is an embedding model; it cannot generate text. Use it with /v1/embeddings.")

    def embedding_model(self, model_id: str) -> EmbeddingBackend:
        return self._of_kind(model_id, self.embedding, self.chat, "is a text-generation model, not an embedding model.")

    @staticmethod
    def _of_kind(model_id: str, wanted: dict, other: dict, mismatch: str):
        """The backend from ``wanted``; a model of the other kind gets a 404 saying what it is."""
        if model_id in other:
            raise ModelNotFoundError(model_id, sorted(wanted), reason=f"'{model_id}' {mismatch}")
        if model_id not in wanted:
            raise ModelNotFoundError(model_id, sorted(wanted))
        return wanted[model_id]

    def add_adapter(self, model_id: str, base_model: str, adapter_dir: Path, created: int) -> None:
        """Serve a fine-tuned model: ``base_model`` (loaded here) with the LoRA adapter in ``adapter_dir``."""
        from qubrid_lab.engine.local import FineTunedChat

        base = self.chat.get(base_model)
        if base is None or not hasattr(base, "add_adapter"):
            raise ModelNotFoundError(base_model, sorted(self.chat), reason=(
                f"The fine-tuned model '{model_id}' needs its base model '{base_model}' loaded on this server "
                "by the local engine; add it to QUBRID_LAB_MODELS (or --model) and restart."))
        self.remove_adapter(model_id)
        self.chat[model_id] = FineTunedChat(model_id, base, Path(adapter_dir), created)

    def remove_adapter(self, model_id: str) -> None:
        """Stop serving a fine-tuned model; requests still running on it fail, saying it was deleted."""
        backend = self.chat.get(model_id)
        if backend is not None and hasattr(backend, "base"):
            del self.chat[model_id]
            backend.close()

    def close(self) -> None:
        # fine-tuned views first: they unload their adapters from base models that are still running
        for backend in sorted(self.all().values(), key=lambda b: not hasattr(b, "base")):
            backend.close()
        if self.thread:
            self.thread.stop()


def load_registry(settings: Settings, catalogue: Catalogue) -> ModelRegistry:
    """Load every model named in ``settings.models``: local entries with the embedded engine, ``openai`` ones
    as clients of their upstream."""
    from qubrid_lab.engine.local import LocalChatEngine, LocalEmbeddingEngine
    from qubrid_lab.engine.openai_upstream import OpenAIUpstreamChat, OpenAIUpstreamEmbedding

    registry = ModelRegistry(thread=ModelThread("qubrid-lab:models"))
    for spec in settings.models:
        entry: ModelEntry = catalogue.resolve(spec)
        if entry.backend == "openai":
            log.info("serving %s (%s) from the OpenAI-compatible upstream %s as '%s'", entry.id, entry.kind,
                     entry.base_url, entry.upstream_model)
            if entry.kind == "embedding":
                registry.embedding[entry.id] = OpenAIUpstreamEmbedding(entry)
            else:
                registry.chat[entry.id] = OpenAIUpstreamChat(entry)
            continue
        log.info("loading %s (%s, %s)", entry.id, entry.kind, entry.source)
        if entry.kind == "embedding":
            registry.embedding[entry.id] = LocalEmbeddingEngine(entry, settings.model_cache_dir, settings.device,
                                                                thread=registry.thread)
        else:
            registry.chat[entry.id] = LocalChatEngine(
                entry, settings.model_cache_dir, settings.device, settings.dtype,
                settings.max_batch_size, settings.max_tokens_cap, thread=registry.thread)
    return registry
