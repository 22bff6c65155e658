"""Runtime settings, read from ``QUBRID_LAB_*`` environment variables and CLI flags.

One home directory (``QUBRID_LAB_HOME``, default ``~/.qubrid_lab``) holds everything the tool writes:
the converted-model cache, the SQLite database, uploaded files, fine-tuning job directories (checkpoints,
adapters, worker logs) and the API key file.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_CHAT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class Settings(BaseSettings):
    """Everything the server and the workbench can be configured with."""

    model_config = SettingsConfigDict(env_prefix="QUBRID_LAB_", extra="ignore")

    home: Path = Field(Path.home() / ".qubrid_lab", description="Directory for caches, database and files.")
    host: str = Field("127.0.0.1", description="Address the server binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port the server listens on (0 picks a free one).")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL],
        description="Catalogue ids to load at start (comma-separated in the environment).",
    )
    catalogue_file: Path | None = Field(None, description="Extra catalogue entries (JSON list) to register.")
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu' or 'cuda[:N]'.")
    dtype: str = Field(
        "auto",
        description="'auto' (the fastest precision that passes the accuracy bar, measured once per machine and "
        "model), 'float32', 'bfloat16', 'float16', and on a CPU 'w8a16' (int8 weights, bf16 activations), "
        "'w4a16' / 'w4a32' (int4 weights in groups of 32, the model in bf16 / float32) or 'int8' (dynamic int8 "
        "linear layers).",
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="Most sequences decoded together on one model.")
    prompt_cache_mib: int = Field(
        32,
        ge=0,
        description="MiB per chat model for the keys/values of recent prompts, so that a prompt beginning like "
        "one seen before (a conversation's next turn, a repeated request) prefills only the rest (0: off).",
    )
    max_tokens_cap: int | None = Field(
        None, ge=1, description="Server-side cap on generated tokens when a request sets no max_tokens."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Accepted bearer keys (comma-separated in the environment)."
    )
    api_key_file: Path | None = Field(None, description="File with one accepted key per line ('#' comments).")
    default_price_input_per_mtok: float = Field(
        0.10,
        ge=0,
        description="USD per million prompt and training tokens charged to keys with credits, for "
        "models whose catalogue entry sets no price_input_per_mtok.",
    )
    default_price_output_per_mtok: float = Field(
        0.20, ge=0, description="USD per million completion tokens, for entries without price_output_per_mtok."
    )
    max_waiting_requests: int = Field(
        256,
        ge=0,
        description="Requests that may wait for a free decoding slot per model; past that a request "
        "gets 503 server_overloaded with Retry-After.",
    )
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest JSON body accepted.")
    max_dataset_bytes: int = Field(
        100 * 1024 * 1024, ge=1, description="Largest CSV accepted by POST /fine-tuning/datasets (streamed to disk)."
    )
    training_device: str = Field(
        "auto",
        description="Where fine-tuning jobs train: 'auto' (every CUDA GPU when present, through torchrun when "
        "there are several; else the CPU), 'cpu', 'cuda' or 'cuda:N'.",
    )
    max_running_jobs: int = Field(
        1, ge=0, le=64, description="Fine-tuning jobs that train at once; the rest wait queued (0 pauses the queue)."
    )
    max_images_per_request: int = Field(8, ge=0, le=64, description="Most image_url parts one chat request may hold.")
    max_image_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="Largest image, decoded from a data URL or fetched from an http(s) URL."
    )
    max_image_pixels: int = Field(25_000_000, ge=1, description="Largest image area (width x height) accepted.")
    image_fetch_timeout: float = Field(10.0, gt=0, le=300, description="Seconds an http(s) image may take to fetch.")
    image_url_hosts: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="Hosts whose http(s) image URLs the server fetches (comma-separated in the environment; "
        "'*': any public host; a listed host may be private). Unset: any public host when the server is bound to "
        "loopback, none otherwise. Data URLs are always accepted.",
    )
    log_level: str = Field("info", description="Uvicorn and qubrid_lab log level.")

    @field_validator("models", "api_keys", "image_url_hosts", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def loopback_only(self) -> bool:
        """Whether the server is bound to a loopback address, so only this machine reaches it."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def model_cache_dir(self) -> Path:
        return self.home / "models"

    @property
    def database_path(self) -> Path:
        return self.home / "qubrid_lab.sqlite3"

    @property
    def files_dir(self) -> Path:
        return self.home / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    def default_key_file(self) -> Path:
        return self.home / "api_keys.txt"

    def load_api_keys(self) -> set[str]:
        """Keys from the environment plus those in the key file (explicit or the home default)."""
        keys = set(self.api_keys)
        key_file = self.api_key_file or self.default_key_file()
        if key_file.is_file():
            for line in key_file.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    keys.add(line)
        return keys
