"""Catalogue entries for the vllm and triton backends: their keys, types and defaults, from JSON and TOML."""

from __future__ import annotations

import json

import pytest

from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.models.catalogue import MAX_LORA_RANK, Catalogue


def load(tmp_path, entries, suffix=".json", text=None):
    path = tmp_path / f"catalogue{suffix}"
    path.write_text(text if text is not None else json.dumps(entries))
    catalogue = Catalogue()
    catalogue.load_file(path)
    return catalogue


def test_a_vllm_entry_takes_its_settings_and_defaults_the_lora_cap(tmp_path):
    entry = load(
        tmp_path,
        [
            {
                "id": "m",
                "kind": "chat",
                "backend": "vllm",
                "source": "dir:/models/m",
                "args": ["--enforce-eager"],
                "gpu_memory_utilization": 0.5,
                "tensor_parallel_size": 2,
            }
        ],
    ).get("m")
    assert (entry.args, entry.gpu_memory_utilization, entry.tensor_parallel_size) == (("--enforce-eager",), 0.5, 2)
    assert entry.max_lora_rank == MAX_LORA_RANK and entry.trainable and not entry.remote


def test_a_triton_entry_defaults_its_model_by_interface(tmp_path):
    catalogue = load(
        tmp_path,
        [
            {"id": "a", "kind": "chat", "backend": "triton", "url": "10.0.0.5:8001", "tokenizer": "org/tok"},
            {
                "id": "b",
                "kind": "chat",
                "backend": "triton",
                "url": "10.0.0.5:8000",
                "protocol": "http",
                "interface": "vllm",
                "tokenizer": "org/tok",
            },
        ],
    )
    assert (catalogue.get("a").triton_model, catalogue.get("a").owned_by) == ("ensemble", "10.0.0.5")
    assert (catalogue.get("b").triton_model, catalogue.get("b").protocol) == ("vllm_model", "http")
    assert catalogue.get("a").remote and not catalogue.get("a").trainable


@pytest.mark.parametrize(
    "item, words",
    [
        ({"backend": "vllm", "source": "dir:/m", "gpu_memory_utilization": 1.5}, "'gpu_memory_utilization' must be"),
        ({"backend": "vllm", "source": "dir:/m", "args": "--enforce-eager"}, "'args' must be a list of strings"),
        ({"backend": "vllm", "source": "dir:/m", "max_lora_rank": 1024}, "'max_lora_rank' must be a whole number"),
        ({"backend": "vllm"}, "key 'source' is required"),
        ({"backend": "triton", "url": "h:1"}, "key 'tokenizer' is required"),
        ({"backend": "triton", "url": "h:1", "tokenizer": "t", "protocol": "udp"}, "protocol 'udp'"),
        ({"backend": "triton", "url": "h:1", "tokenizer": "t", "interface": "onnx"}, "interface 'onnx'"),
        ({"backend": "triton", "url": "h:1", "tokenizer": "t", "base_url": "x"}, "unknown key 'base_url'"),
        ({"backend": "triton", "url": "h:1", "tokenizer": "t", "vision": True}, "take text only"),
        ({"backend": "openai", "base_url": "http://h/v1", "vision": "yes"}, "'vision' must be true or false"),
    ],
)
def test_a_bad_entry_is_refused_naming_the_entry_and_key(tmp_path, item, words):
    with pytest.raises(InvalidRequestError) as refused:
        load(tmp_path, [{"id": "team/bad", "kind": "chat", **item}])
    assert "team/bad" in refused.value.message and words in refused.value.message


def test_a_toml_catalogue_reads_like_the_json_one(tmp_path):
    catalogue = load(
        tmp_path,
        None,
        ".toml",
        text="""
[[models]]
id = "team/llama"
kind = "chat"
backend = "openai"
base_url = "http://vllm.internal:8000/v1"
upstream_model = "meta-llama/Llama-3.3-70B-Instruct"
""",
    )
    assert catalogue.get("team/llama").upstream_model == "meta-llama/Llama-3.3-70B-Instruct"
    with pytest.raises(InvalidRequestError, match=r"\[\[models\]\]"):
        load(tmp_path, None, ".toml", text='title = "no models here"\n')


@pytest.mark.parametrize(
    "backend, keys", [("vllm", {"source": "dir:/m"}), ("triton", {"url": "h:1", "tokenizer": "t"})]
)
def test_an_embedding_entry_on_a_chat_only_backend_is_refused_when_read(tmp_path, backend, keys):
    with pytest.raises(InvalidRequestError, match="serves chat models") as refused:
        load(tmp_path, [{"id": "team/embed", "kind": "embedding", "backend": backend, **keys}])
    assert "team/embed" in refused.value.message
