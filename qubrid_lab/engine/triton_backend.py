"""The ``triton`` backend: chat models served by a Triton Inference Server, reached through ``tritonclient``.

Two tensor interfaces, chosen per entry (``interface``), with names overridable (``tensor_names``):

* ``tensorrt_llm``: TensorRT-LLM's ``ensemble`` (``text_input``, ``max_tokens``, ``temperature``, ``top_p``,
  ``random_seed``, ``stop_words``, ``presence_penalty``, ``frequency_penalty``, ``stream`` -> ``text_output``);
* ``vllm``: Triton's vLLM backend (``text_input``, ``stream``, JSON ``sampling_parameters`` -> ``text_output``,
  ``finish_reason``, ``num_output_tokens``).

The chat template is applied here with the entry's ``tokenizer``, as the hosted platform does; Triton gets
prompt text. Over gRPC a decoupled model streams (each response carries new text); over HTTP a request is
answered whole. Each choice of ``n`` is one Triton request (with seed + i when a seed is set). Token counts
come from the model's ``num_input_tokens``/``num_output_tokens`` outputs when it has them, else from the
tokenizer. A request field the model declares no input for is refused with a 400 naming field and backend.
Stop strings are also enforced here (text that may start one is held back), so no part of a stop string and
nothing after it reaches the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import numpy as np

from qubrid_lab.engine.base import Delta, Event, Failure, Finish, GenerationRequest, RemoteRun, drain, run_metrics
from qubrid_lab.engine.detokenize import StopFilter
from qubrid_lab.errors import InvalidRequestError, UpstreamError
from qubrid_lab.models.catalogue import ModelEntry

log = logging.getLogger(__name__)

TENSOR_NAMES = {  # our name -> the model's, per interface (entries override with tensor_names)
    "tensorrt_llm": {
        name: name
        for name in (
            "text_input",
            "max_tokens",
            "temperature",
            "top_p",
            "random_seed",
            "stop_words",
            "presence_penalty",
            "frequency_penalty",
            "stream",
            "text_output",
            "finish_reason",
            "num_input_tokens",
            "num_output_tokens",
        )
    },
    "vllm": {
        name: name
        for name in (
            "text_input",
            "stream",
            "sampling_parameters",
            "exclude_input_in_output",
            "return_finish_reason",
            "return_num_input_tokens",
            "return_num_output_tokens",
            "text_output",
            "finish_reason",
            "num_input_tokens",
            "num_output_tokens",
        )
    },
}
TRTLLM_INPUT_OF = {"seed": "random_seed"}  # request fields whose TensorRT-LLM input has another name
DEFAULT_MAX_TOKENS = 256  # TensorRT-LLM requires max_tokens; what a request without one gets (capped by context)
TIMEOUT_SECONDS = 300.0


def triton_status(entry: ModelEntry) -> str:
    """A one-line health from Triton's own endpoints: server live and ready, model ready."""
    try:
        client = _client_of(entry)
        if not client.is_server_live():
            return "not live"
        if not client.is_server_ready():
            return "live, not ready"
        return (
            "ready" if client.is_model_ready(entry.triton_model) else f"ready, but model '{entry.triton_model}' is not"
        )
    except Exception as exc:  # tritonclient raises its own exception types for every transport failure
        return f"unreachable: {exc}"


def _client_of(entry: ModelEntry, asynchronous: bool = False):
    """A tritonclient client for the entry's protocol (the asyncio one with ``asynchronous``)."""
    import importlib

    module = importlib.import_module(f"tritonclient.{entry.protocol}" + (".aio" if asynchronous else ""))
    return module.InferenceServerClient(entry.url.split("://")[-1])


class TritonChat:
    """A chat model served by Triton: the request's prompts become ``text_input``s, one request per choice."""

    def __init__(self, entry: ModelEntry, cache_dir=None):
        from transformers import AutoTokenizer

        from qubrid_lab.models.loading import tokenizer_location

        self.entry = entry
        self.model_id = entry.id
        self.names = {**TENSOR_NAMES[entry.interface], **entry.tensor_names}
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_location(entry, cache_dir))
        self.context_length = int(getattr(self.tokenizer, "model_max_length", 0) or 0)
        self.created = int(time.time())
        self.healthy = True
        self._clients: dict[asyncio.AbstractEventLoop, object] = {}
        self._declared: dict[str, dict] | None = None  # model input name -> metadata, read once
        self._batched = self._decoupled = False  # from the model's config, with the inputs
        self._runs: set[TritonRun] = set()

    @property
    def active_sequences(self) -> int:
        return sum(run.open_choices for run in self._runs)  # choices whose Triton request is still running

    def failure(self, what: str) -> UpstreamError:
        self.healthy = False  # until Triton next finishes a request (/metrics: qubrid_lab_backend_up)
        return UpstreamError(
            f"Triton serving model '{self.model_id}' (backend 'triton', {self.entry.protocol} "
            f"{self.entry.url}, model '{self.entry.triton_model}') {what}"
        )

    def _client(self):
        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            self._clients[loop] = _client_of(self.entry, asynchronous=True)
        return self._clients[loop]

    async def _inputs_declared(self) -> dict[str, dict]:
        if self._declared is None:
            client = self._client()
            try:
                metadata = await client.get_model_metadata(self.entry.triton_model, **self._as_json())
                config = await client.get_model_config(self.entry.triton_model, **self._as_json())
            except Exception as exc:
                raise self.failure(f"cannot be reached or does not serve the model: {exc}") from exc
            config = config.get("config", config)
            self._batched = int(config.get("max_batch_size", 0) or 0) > 0
            self._decoupled = bool((config.get("model_transaction_policy") or {}).get("decoupled"))
            self._declared = {item["name"]: item for item in metadata.get("inputs", [])}
        return self._declared

    def _as_json(self) -> dict:
        return {"as_json": True} if self.entry.protocol == "grpc" else {}

    def _prompts(self, request: GenerationRequest) -> list[str]:
        if request.messages is not None:
            return [self.tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)]
        return list(request.prompts)

    def _refuse_unsupported(self, request: GenerationRequest, declared: dict) -> None:
        params, interface = request.params, self.entry.interface
        refused = [
            (field, why)
            for field, why, asked in (
                (
                    "prompt",
                    "whose models take prompt text; send the prompt as text, not token ids",
                    any(not isinstance(prompt, str) for prompt in request.prompts or []),
                ),
                (
                    "tools",
                    "which cannot call tools; leave tools unset (or tool_choice 'none') for this model",
                    request.tools and request.tool_choice != "none",
                ),
                (
                    "response_format",
                    "which cannot constrain its output to a format; leave response_format unset (or "
                    "'text') for this model",
                    request.response_format is not None,
                ),
                (
                    "logprobs",
                    "whose tensor interfaces return no log probabilities; leave logprobs unset for this model",
                    params.logprobs is not None,
                ),
            )
            if asked
        ]
        if refused:
            field, why = refused[0]
            raise InvalidRequestError(f"Model '{self.model_id}' is served by the 'triton' backend, {why}.", param=field)
        used = [
            field
            for field, is_set in (
                ("temperature", params.temperature != 1.0),
                ("top_p", params.top_p != 1.0),
                ("seed", params.seed is not None),
                ("presence_penalty", params.presence_penalty != 0.0),
                ("frequency_penalty", params.frequency_penalty != 0.0),
            )
            if is_set
        ]
        if interface == "vllm":  # every sampling field travels in the one JSON tensor
            if params.max_tokens:
                used.append("max_tokens")
            missing = used if self.names["sampling_parameters"] not in declared else []
        else:
            missing = [field for field in used if self.names[TRTLLM_INPUT_OF.get(field, field)] not in declared]
        if missing:
            field = missing[0]
            raise InvalidRequestError(
                f"Model '{self.model_id}' is served by the 'triton' backend ({interface} interface, Triton model "
                f"'{self.entry.triton_model}'), which declares no input for '{field}'; leave {field} unset for "
                "this model, or serve it with a model that takes it.",
                param=field,
            )

    def _streaming(self) -> bool:
        return self.entry.protocol == "grpc" and self._decoupled

    def _tensor(self, name: str, value, datatype: str):
        if self.entry.protocol == "grpc":
            from tritonclient.grpc import InferInput
        else:
            from tritonclient.http import InferInput
        array = np.array([value] if np.ndim(value) == 0 else value, dtype=object if datatype == "BYTES" else None)
        if datatype != "BYTES":
            array = array.astype({"INT32": np.int32, "UINT64": np.uint64, "FP32": np.float32, "BOOL": bool}[datatype])
        if self._batched:
            array = array[None, ...]
        tensor = InferInput(self.names.get(name, name), list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        return tensor

    def _inputs(self, prompt: str, request: GenerationRequest, seed: int | None, declared: dict) -> list:
        params = request.params
        max_tokens = params.max_tokens or DEFAULT_MAX_TOKENS
        stream = self._streaming()
        tensors = [self._tensor("text_input", prompt.encode(), "BYTES")]
        if self.entry.interface == "vllm":
            sampling = {
                "temperature": params.temperature,
                "top_p": params.top_p,
                "max_tokens": max_tokens,
                "presence_penalty": params.presence_penalty,
                "frequency_penalty": params.frequency_penalty,
            }
            if seed is not None:
                sampling["seed"] = seed
            if params.stop:
                sampling["stop"] = params.stop
            optional = {
                "sampling_parameters": (json.dumps(sampling).encode(), "BYTES"),
                "stream": (stream, "BOOL"),
                "exclude_input_in_output": (True, "BOOL"),
                "return_finish_reason": (True, "BOOL"),
                "return_num_input_tokens": (True, "BOOL"),
                "return_num_output_tokens": (True, "BOOL"),
            }
        else:
            optional = {
                "max_tokens": (max_tokens, "INT32"),
                "temperature": (params.temperature, "FP32"),
                "top_p": (params.top_p, "FP32"),
                "presence_penalty": (params.presence_penalty, "FP32"),
                "frequency_penalty": (params.frequency_penalty, "FP32"),
                "stream": (stream, "BOOL"),
            }
            if seed is not None:
                optional["random_seed"] = (seed, "UINT64")
            if params.stop:
                optional["stop_words"] = ([s.encode() for s in params.stop], "BYTES")
        for name, (value, datatype) in optional.items():
            if self.names.get(name, name) in declared:
                tensors.append(self._tensor(name, value, datatype))
        return tensors

    async def start(self, request: GenerationRequest) -> TritonRun:
        declared = await self._inputs_declared()
        self._refuse_unsupported(request, declared)
        submitted_at = time.perf_counter()
        prompts = self._prompts(request)
        jobs = []
        for p, prompt in enumerate(prompts):
            for i in range(request.n):
                seed = None if request.params.seed is None else request.params.seed + i
                jobs.append((p * request.n + i, prompt, self._inputs(prompt, request, seed, declared)))
        run = TritonRun(self, jobs, request, submitted_at)
        run.begin()
        return run

    def close(self) -> None:
        """Clients close with the process."""


class TritonRun(RemoteRun):
    """The Triton requests of one API request (one per choice), their events on one queue."""

    def __init__(self, chat: TritonChat, jobs: list, request: GenerationRequest, submitted_at: float):
        self.chat, self.jobs, self.request = chat, jobs, request
        self.submitted_at = submitted_at
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = len(jobs)
        self.prompt_tokens = 0
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._tasks: list[asyncio.Task] = []
        self._prompt_counted: set[int] = set()

    @property
    def open_choices(self) -> int:
        return sum(not task.done() for task in self._tasks)

    def begin(self) -> None:
        self.chat._runs.add(self)
        self._tasks = [
            asyncio.get_running_loop().create_task(self._choice(index, prompt, inputs))
            for index, prompt, inputs in self.jobs
        ]

    async def _responses(self, inputs: list) -> AsyncIterator[dict[str, np.ndarray]]:
        """The outputs of each response to one Triton request, as they arrive."""
        from tritonclient.grpc import InferResult

        chat, client = self.chat, self.chat._client()
        model = chat.entry.triton_model
        if chat._streaming():
            stream = _final_flagged_stream(client, model, inputs)
            try:
                async for response in stream:
                    if response.error_message:
                        raise chat.failure(f"failed: {response.error_message}")
                    result = InferResult(response.infer_response)
                    yield {o.name: result.as_numpy(o.name) for o in response.infer_response.outputs}
                    final = response.infer_response.parameters.get("triton_final_response")
                    if final is not None and final.bool_param:
                        return
            finally:
                stream.cancel()
        else:
            result = await client.infer(model, inputs)
            response = result.get_response()
            names = (
                [o.name for o in response.outputs]
                if hasattr(response, "outputs")
                else [o["name"] for o in response.get("outputs", [])]
            )
            yield {name: result.as_numpy(name) for name in names}

    async def _choice(self, index: int, prompt: str, inputs: list) -> None:
        chat, names = self.chat, self.chat.names
        text = StopFilter(self.request.params.stop)
        reason, prompt_tokens, completion_tokens, streamed = None, None, 0, chat._streaming()
        try:
            async for outputs in self._responses(inputs):
                piece = _text(outputs.get(names["text_output"]))
                if names["finish_reason"] in outputs:
                    reason = _text(outputs[names["finish_reason"]]) or reason
                if names["num_input_tokens"] in outputs:
                    prompt_tokens = int(np.asarray(outputs[names["num_input_tokens"]]).reshape(-1)[0])
                if names["num_output_tokens"] in outputs:
                    count = int(np.asarray(outputs[names["num_output_tokens"]]).reshape(-1)[0])
                    # the vLLM backend reports each response's new tokens; ours the total in the final one
                    completion_tokens = completion_tokens + count if chat.entry.interface == "vllm" else count
                if not piece:
                    continue
                if not streamed and piece.startswith(prompt):  # a model that echoes its input
                    piece = piece[len(prompt) :]
                delta = text.push_text(piece)
                self.first_token_at = self.first_token_at or time.perf_counter()
                if delta:
                    await self.queue.put(Delta(index, delta))
                if text.stopped:
                    reason = "stop"
                    break
        except asyncio.CancelledError:
            raise
        except UpstreamError as exc:
            await self.queue.put(Failure(exc.message, exc))
            return
        except Exception as exc:  # tritonclient and grpc raise their own types for every transport failure
            error = chat.failure(f"failed: {type(exc).__name__}: {exc}")
            await self.queue.put(Failure(error.message, error))
            return
        rest = text.flush()  # text held back as a possible stop string's start, which it was not
        if rest:
            await self.queue.put(Delta(index, rest))
        if not completion_tokens:  # the model reports no count: ours, of the text it sent
            completion_tokens = len(chat.tokenizer(text.text, add_special_tokens=False)["input_ids"])
        if reason not in ("stop", "length"):
            limit = self.request.params.max_tokens or DEFAULT_MAX_TOKENS
            reason = "length" if completion_tokens >= limit else "stop"
        prompt_index = index // self.request.n  # n choices share one prompt: counted once
        if prompt_index not in self._prompt_counted:
            self._prompt_counted.add(prompt_index)
            self.prompt_tokens += (
                prompt_tokens
                if prompt_tokens is not None
                else len(chat.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            )
        self.finished_at = time.perf_counter()
        chat.healthy = True
        await self.queue.put(Finish(index, reason, "", completion_tokens))

    async def events(self) -> AsyncIterator[Event]:
        try:
            async for event in drain(self.queue, self.choices):
                yield event
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Cancel the Triton requests still running (the client went away or the request is over)."""
        self.chat._runs.discard(self)
        for task in self._tasks:
            if not task.done():
                task.cancel()

    def metrics(self, completion_tokens: int) -> dict:
        return run_metrics(self.submitted_at, self.first_token_at, self.finished_at, completion_tokens)


def _final_flagged_stream(client, model: str, inputs: list):
    """A gRPC stream of one request whose last response is flagged final (``triton_final_response``), even
    when the model sends its last text without the flag. tritonclient's asyncio ``stream_infer`` refuses that
    reserved request parameter, so the request is built with its helper and sent on its stub (the same call
    ``stream_infer`` makes)."""
    from tritonclient.grpc._utils import _get_inference_request

    request = _get_inference_request(
        model_name=model,
        inputs=inputs,
        model_version="",
        request_id="",
        outputs=None,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=None,
    )
    request.parameters["triton_enable_empty_final_response"].bool_param = True

    async def one_request():
        yield request

    return client._client_stub.ModelStreamInfer(
        one_request(), metadata=client._get_metadata(None), timeout=TIMEOUT_SECONDS
    )


def _text(array) -> str:
    if array is None:
        return ""
    flat = np.asarray(array).reshape(-1)
    return "".join(v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in flat)
