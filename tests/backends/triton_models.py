"""A real Triton Inference Server (PyTriton's ``tritonserver``) serving one causal LM under both tensor
interfaces the ``triton`` backend speaks. Run with the interpreter of the PyTriton environment:

    python tests/backends/triton_models.py MODEL_REPOSITORY HTTP_PORT GRPC_PORT METRICS_PORT

``MODEL_REPOSITORY`` is one written by ``qubrid-lab export triton``: its ``model.py`` (the decoding loop) and
weights serve these models, all on loopback:

* ``ensemble``: TensorRT-LLM's ensemble tensors, decoupled (streams over gRPC);
* ``ensemble_sync``: the same tensors answered whole (for HTTP), without the extra count outputs, so the
  backend's own token counting is exercised;
* ``vllm_model``: Triton's vLLM backend tensors (``sampling_parameters`` JSON, ``finish_reason``, per-response
  ``num_output_tokens``), decoupled, unbatched like the real vLLM backend.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

repository, http_port, grpc_port, metrics_port = Path(sys.argv[1]), *map(int, sys.argv[2:5])
spec = importlib.util.spec_from_file_location("exported_model", repository / "ensemble" / "1" / "model.py")
exported = importlib.util.module_from_spec(spec)
spec.loader.exec_module(exported)
generator = exported.Generator(repository / "ensemble" / "1" / "weights")

TRTLLM_INPUTS = [
    Tensor(name="text_input", dtype=bytes, shape=(1,)),
    Tensor(name="max_tokens", dtype=np.int32, shape=(1,)),
    Tensor(name="temperature", dtype=np.float32, shape=(1,), optional=True),
    Tensor(name="top_p", dtype=np.float32, shape=(1,), optional=True),
    Tensor(name="random_seed", dtype=np.uint64, shape=(1,), optional=True),
    Tensor(name="stop_words", dtype=bytes, shape=(-1,), optional=True),
    Tensor(name="presence_penalty", dtype=np.float32, shape=(1,), optional=True),
    Tensor(name="frequency_penalty", dtype=np.float32, shape=(1,), optional=True),
    Tensor(name="stream", dtype=np.bool_, shape=(1,), optional=True),
]


def _trtllm_stream(requests):
    (request,) = requests
    for piece in generator.stream(**exported.read_request(dict(request.items()).get)):
        yield [exported.outputs("", piece) if isinstance(piece, tuple) else exported.outputs(piece)]


def _trtllm_whole(requests):
    answers = []
    for request in requests:
        pieces = list(generator.stream(**exported.read_request(dict(request.items()).get)))
        answers.append({"text_output": np.array([["".join(pieces[:-1]).encode()]], dtype=object)})
    return answers


def _vllm_stream(requests):
    (request,) = requests
    request = dict(request.items())
    sampling = (
        json.loads(bytes(np.asarray(request["sampling_parameters"]).reshape(-1)[0]).decode())
        if request.get("sampling_parameters") is not None
        else {}
    )
    prompt = bytes(np.asarray(request["text_input"]).reshape(-1)[0]).decode()
    settings = {
        "prompt": prompt,
        "max_tokens": int(sampling.get("max_tokens", 16)),
        "temperature": float(sampling.get("temperature", 1.0)),
        "top_p": float(sampling.get("top_p", 1.0)),
        "seed": sampling.get("seed"),
        "stop_words": list(sampling.get("stop", [])),
        "presence_penalty": float(sampling.get("presence_penalty", 0.0)),
        "frequency_penalty": float(sampling.get("frequency_penalty", 0.0)),
    }
    sent = 0  # tokens reported so far: each response reports its own new ones, as the vLLM backend does
    for piece in generator.stream(**settings):
        if isinstance(piece, tuple):
            reason, prompt_tokens, completion_tokens = piece
            yield [
                {
                    "text_output": np.array([b""], dtype=object),
                    "finish_reason": np.array([reason.encode()], dtype=object),
                    "num_input_tokens": np.array([prompt_tokens], dtype=np.uint32),
                    "num_output_tokens": np.array([max(completion_tokens - sent, 0)], dtype=np.uint32),
                }
            ]
        else:
            new_tokens = len(generator.tokenizer(piece, add_special_tokens=False)["input_ids"])
            sent += new_tokens
            yield [
                {
                    "text_output": np.array([piece.encode()], dtype=object),
                    "num_output_tokens": np.array([new_tokens], dtype=np.uint32),
                }
            ]


with Triton(
    config=TritonConfig(
        http_address="127.0.0.1",
        http_port=http_port,
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        allow_metrics=False,
    )
) as triton:
    triton.bind(
        model_name="ensemble",
        infer_func=_trtllm_stream,
        inputs=TRTLLM_INPUTS,
        outputs=[
            Tensor(name="text_output", dtype=bytes, shape=(-1,)),
            Tensor(name="finish_reason", dtype=bytes, shape=(1,)),
            Tensor(name="num_input_tokens", dtype=np.uint32, shape=(1,)),
            Tensor(name="num_output_tokens", dtype=np.uint32, shape=(1,)),
        ],
        config=ModelConfig(max_batch_size=1, decoupled=True),
    )
    triton.bind(
        model_name="ensemble_sync",
        infer_func=_trtllm_whole,
        inputs=TRTLLM_INPUTS,
        outputs=[Tensor(name="text_output", dtype=bytes, shape=(-1,))],
        config=ModelConfig(max_batch_size=1),
    )
    triton.bind(
        model_name="vllm_model",
        infer_func=_vllm_stream,
        inputs=[
            Tensor(name="text_input", dtype=bytes, shape=(1,)),
            Tensor(name="stream", dtype=np.bool_, shape=(1,), optional=True),
            Tensor(name="sampling_parameters", dtype=bytes, shape=(1,), optional=True),
            Tensor(name="exclude_input_in_output", dtype=np.bool_, shape=(1,), optional=True),
            Tensor(name="return_finish_reason", dtype=np.bool_, shape=(1,), optional=True),
            Tensor(name="return_num_input_tokens", dtype=np.bool_, shape=(1,), optional=True),
            Tensor(name="return_num_output_tokens", dtype=np.bool_, shape=(1,), optional=True),
        ],
        outputs=[
            Tensor(name="text_output", dtype=bytes, shape=(-1,)),
            Tensor(name="finish_reason", dtype=bytes, shape=(-1,)),
            Tensor(name="num_input_tokens", dtype=np.uint32, shape=(-1,)),
            Tensor(name="num_output_tokens", dtype=np.uint32, shape=(-1,)),
        ],
        config=ModelConfig(batching=False, decoupled=True),
    )
    print("TRITON READY", flush=True)
    triton.serve()
