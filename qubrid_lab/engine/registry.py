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

    # ``hidden``: models the caller may not see (another key's fine-tuned ones): absent here and in the lists.

    def get(self, model_id: str, hidden: set[str] = frozenset()) -> ChatBackend | EmbeddingBackend:
        models = self.all()
        if model_id not in models or model_id in hidden:
            raise ModelNotFoundError(model_id, sorted(set(models) - hidden))
        return models[model_id]

    def chat_model(self, model_id: str, hidden: set[str] = frozenset()) -> ChatBackend:
        return self._of_kind(
            model_id,
            self.chat,
            self.embedding,
            hidden,
            "is an embedding model; it cannot generate text. Use it with /v1/embeddings.",
        )

    def embedding_model(self, model_id: str, hidden: set[str] = frozenset()) -> EmbeddingBackend:
        return self._of_kind(
            model_id, self.embedding, self.chat, hidden, "is a text-generation model, not an embedding model."
        )

    @staticmethod
    def _of_kind(model_id: str, wanted: dict, other: dict, hidden: set[str], mismatch: str):
        """The backend from ``wanted``; a model of the other kind gets a 404 saying what it is."""
        known = sorted(set(wanted) - hidden)
        if model_id in other and model_id not in hidden:
            raise ModelNotFoundError(model_id, known, reason=f"'{model_id}' {mismatch}")
        if model_id not in wanted or model_id in hidden:
            raise ModelNotFoundError(model_id, known)
        return wanted[model_id]

    def add_adapter(self, model_id: str, base_model: str, adapter_dir: Path, created: int) -> None:
        """Serve a fine-tuned model: ``base_model`` (loaded here) with the LoRA adapter in ``adapter_dir``.

        The base's backend makes the view (``fine_tuned``): the embedded engine decodes with the adapter in its
        own batch, a managed vLLM loads it at runtime."""
        base = self.chat.get(base_model)
        if base is None or not hasattr(base, "fine_tuned"):
            raise ModelNotFoundError(
                base_model,
                sorted(self.chat),
                reason=(
                    f"The fine-tuned model '{model_id}' needs its base model '{base_model}' loaded on this server "
                    "by the local engine or a managed vLLM; add it to QUBRID_LAB_MODELS (or --model) and restart."
                ),
            )
        self.remove_adapter(model_id)
        self.chat[model_id] = base.fine_tuned(model_id, Path(adapter_dir), created)

    def gpu_reservations(self) -> dict[str, tuple[float, str]]:
        """GPU memory that managed vLLM children hold: CUDA device -> (fraction of it, model id)."""
        held: dict[str, tuple[float, str]] = {}
        for backend in self.chat.values():
            share = getattr(backend, "gpu_share", None)
            if share is not None and not hasattr(backend, "base"):
                for device, fraction in share().items():
                    previous = held.get(device, (0.0, ""))
                    held[device] = (previous[0] + fraction, ", ".join(filter(None, (previous[1], backend.model_id))))
        return held

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
    """Load every model named in ``settings.models`` with its entry's backend. A model that fails to load
    stops the start, after the ones already loaded (child processes included) are closed."""
    registry = ModelRegistry(thread=ModelThread("qubrid-lab:models"))
    try:
        for spec in settings.models:
            entry: ModelEntry = catalogue.resolve(spec)
            backends = registry.embedding if entry.kind == "embedding" else registry.chat
            backends[entry.id] = _load_backend(entry, settings, registry.thread)
    except BaseException:
        registry.close()
        raise
    return registry


def _load_backend(entry: ModelEntry, settings: Settings, thread: ModelThread) -> ChatBackend | EmbeddingBackend:
    if entry.backend == "openai":
        from qubrid_lab.engine.openai_upstream import OpenAIUpstreamChat, OpenAIUpstreamEmbedding

        log.info(
            "serving %s (%s) from the OpenAI-compatible upstream %s as '%s'",
            entry.id,
            entry.kind,
            entry.base_url,
            entry.upstream_model,
        )
        backend = OpenAIUpstreamEmbedding if entry.kind == "embedding" else OpenAIUpstreamChat
        return backend(entry, cache_dir=settings.model_cache_dir)
    if entry.backend == "vllm":
        from qubrid_lab.engine.vllm_managed import VLLMChat, VLLMProcess

        log.info("starting vLLM for %s (%s)", entry.id, entry.source)
        return VLLMChat(entry, VLLMProcess(entry, settings.model_cache_dir, settings.home / "logs"))
    if entry.backend == "triton":
        from qubrid_lab.engine.triton_backend import TritonChat

        log.info(
            "serving %s from Triton at %s (%s, %s interface, model '%s')",
            entry.id,
            entry.url,
            entry.protocol,
            entry.interface,
            entry.triton_model,
        )
        return TritonChat(entry, settings.model_cache_dir)
    from qubrid_lab.engine.local import LocalChatEngine, LocalEmbeddingEngine

    log.info("loading %s (%s, %s)", entry.id, entry.kind, entry.source)
    if entry.kind == "embedding":
        return LocalEmbeddingEngine(entry, settings.model_cache_dir, settings.device, thread=thread)
    return LocalChatEngine(
        entry,
        settings.model_cache_dir,
        settings.device,
        settings.dtype,
        settings.max_batch_size,
        settings.max_tokens_cap,
        thread=thread,
        prompt_cache_bytes=settings.prompt_cache_mib * 1024 * 1024,
    )
