"""``qubrid-lab export triton MODEL OUT_DIR``: a Triton Inference Server model repository that serves one of
our models (a catalogue base model, or a fine-tuned one with its LoRA adapter merged into the weights) with
the tensor interface of TensorRT-LLM's ``ensemble``, through Triton's Python backend.

The repository is ``OUT_DIR/<name>/config.pbtxt`` and ``OUT_DIR/<name>/1/{model.py,weights/}``; ``model.py``
is :mod:`qubrid_lab.export.triton_python_model`, which needs torch and transformers (not qubrid_lab) where
Triton runs it. Serve it with ``tritonserver --model-repository OUT_DIR`` and point a catalogue entry with
``"backend": "triton"`` at it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from qubrid_lab.errors import InvalidRequestError, NotFoundError
from qubrid_lab.models.catalogue import Catalogue
from qubrid_lab.models.loading import weights_location
from qubrid_lab.settings import Settings

log = logging.getLogger(__name__)

# (name, Triton type, dims, optional): TensorRT-LLM's ensemble inputs this model reads
INPUTS = (
    ("text_input", "TYPE_STRING", "[ 1 ]", False),
    ("max_tokens", "TYPE_INT32", "[ 1 ]", False),
    ("temperature", "TYPE_FP32", "[ 1 ]", True),
    ("top_p", "TYPE_FP32", "[ 1 ]", True),
    ("random_seed", "TYPE_UINT64", "[ 1 ]", True),
    ("stop_words", "TYPE_STRING", "[ -1 ]", True),
    ("presence_penalty", "TYPE_FP32", "[ 1 ]", True),
    ("frequency_penalty", "TYPE_FP32", "[ 1 ]", True),
    ("stream", "TYPE_BOOL", "[ 1 ]", True),
)
OUTPUTS = (
    ("text_output", "TYPE_STRING", "[ -1 ]"),
    ("finish_reason", "TYPE_STRING", "[ 1 ]"),
    ("num_input_tokens", "TYPE_UINT32", "[ 1 ]"),
    ("num_output_tokens", "TYPE_UINT32", "[ 1 ]"),
)


def model_config(name: str, *, decoupled: bool, max_batch_size: int, gpu: bool) -> str:
    """The repository's ``config.pbtxt``."""
    inputs = ",\n".join(
        f'  {{ name: "{n}" data_type: {t} dims: {d}{" optional: true" if optional else ""} }}'
        for n, t, d, optional in INPUTS
    )
    outputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d} }}' for n, t, d in OUTPUTS)
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
        f"model_transaction_policy {{ decoupled: {'true' if decoupled else 'false'} }}\n"
        f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
        f"instance_group [ {{ count: 1 kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]\n"
    )


def _write_weights(settings: Settings, catalogue: Catalogue, model: str, target: Path) -> str:
    """Save ``model``'s weights and tokenizer into ``target``; returns what was exported, in words."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = catalogue.entries.get(model)
    adapter_dir = None
    if entry is None:
        from qubrid_lab.storage.db import Database
        from qubrid_lab.storage.jobs import JobStore

        try:
            record = (
                JobStore(Database(settings.database_path)).get_model(model)
                if settings.database_path.is_file()
                else None
            )
        except NotFoundError:
            record = None
        if record is None:
            raise InvalidRequestError(
                f"'{model}' is neither a catalogue model nor a fine-tuned model of this home ({settings.home}); "
                f"chat models: {', '.join(m for m, e in catalogue.entries.items() if e.kind == 'chat')}.",
                param="model",
            )
        entry, adapter_dir = catalogue.get(record.base_model), record.adapter_dir
    if entry.kind != "chat" or not entry.source:
        raise InvalidRequestError(
            f"'{entry.id}' cannot be exported: only chat models whose weights are on this machine (a 'source') can.",
            param="model",
        )
    location = weights_location(entry, settings.model_cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(location)
    weights = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    what = f"{entry.id}"
    if adapter_dir is not None:
        from peft import PeftModel

        weights = PeftModel.from_pretrained(weights, str(adapter_dir)).merge_and_unload()
        what = f"{model} (LoRA adapter {adapter_dir} merged into {entry.id})"
    weights.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return what


def export_triton(
    settings: Settings,
    catalogue: Catalogue,
    model: str,
    out_dir: Path,
    *,
    name: str = "ensemble",
    decoupled: bool = True,
    max_batch_size: int = 8,
    gpu: bool = False,
) -> Path:
    """Write the model repository for ``model`` into ``out_dir`` (created; an existing model of that name there
    is refused, never overwritten). Returns the model's directory."""
    model_dir = Path(out_dir) / name
    if model_dir.exists():
        raise InvalidRequestError(f"{model_dir} already exists; remove it or choose another --name.", param="name")
    partial = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "1").mkdir(parents=True)
    try:
        what = _write_weights(settings, catalogue, model, partial / "1" / "weights")
        shutil.copyfile(Path(__file__).with_name("triton_python_model.py"), partial / "1" / "model.py")
        (partial / "config.pbtxt").write_text(
            model_config(name, decoupled=decoupled, max_batch_size=max_batch_size, gpu=gpu)
        )
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(model_dir)
    log.info("exported %s to %s", what, model_dir)
    return model_dir
