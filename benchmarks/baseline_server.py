"""The naive reference server for ``serve_throughput.py``: one request at a time, plain fp32 ``generate``.

It speaks just enough of the OpenAI chat API (streaming and not) for the benchmark's client. The model is
loaded and run on one dedicated thread, because torch's CPU thread pools belong to the thread that made
them: loading on one thread and generating on another runs about twice as slow, which would make the
baseline look worse than it is.

    python benchmarks/baseline_server.py --model DIR --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

DEFAULT_MAX_TOKENS = 256


class ChatRequest(BaseModel):
    """The subset of the chat completion request the baseline honours."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    stream: bool = False
    stream_options: dict[str, Any] | None = None


@dataclass
class Job:
    """One generation, handed to the worker thread; results come back on ``events`` as they are made."""

    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value: Any) -> None:
        """Pass ``(kind, value)`` to the request's coroutine from the worker thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class GenerationWorker:
    """Owns the model: loading and every ``generate`` call happen on its single thread, in arrival order."""

    def __init__(self, model_dir: str) -> None:
        self._model_dir = model_dir
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        threading.Thread(target=self._serve, name="generate", daemon=True).start()

    def wait_loaded(self) -> None:
        """Block until the model is ready; re-raise the loading error if there was one."""
        self._loaded.wait()
        if self._load_error is not None:
            raise RuntimeError(f"could not load {self._model_dir}") from self._load_error

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def _serve(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self._model_dir)
            self._model = AutoModelForCausalLM.from_pretrained(self._model_dir, dtype=torch.float32).eval()
        except BaseException as error:  # reported to the main thread by wait_loaded
            self._load_error = error
            return
        finally:
            self._loaded.set()
        while True:
            job = self._jobs.get()
            try:
                self._generate(job)
            except Exception as error:  # the request reports it; the worker keeps serving
                job.emit("error", repr(error))

    def _generate(self, job: Job) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), job.cancelled.is_set(), dtype=torch.bool)

        inputs = self._tokenizer.apply_chat_template(
            job.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        greedy = job.temperature <= 0
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": job.temperature}
        streamer = TokenStreamer(self._tokenizer, job)
        with torch.inference_mode():
            self._model.generate(
                **inputs,
                **sampling,
                max_new_tokens=job.max_tokens,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([Cancelled()]),
                pad_token_id=self._tokenizer.eos_token_id,
            )
        eos_ids = self._model.generation_config.eos_token_id
        eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
        stopped = bool(streamer.token_ids) and streamer.token_ids[-1] in eos_ids
        prompt_tokens = inputs["input_ids"].shape[1]
        job.emit("end", (usage(prompt_tokens, len(streamer.token_ids)), "stop" if stopped else "length"))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The OpenAI ``usage`` object."""
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


class TokenStreamer:
    """A ``generate`` streamer that emits one text piece per token.

    ``TextIteratorStreamer`` holds text back to word boundaries, which would make the baseline's chunks
    words rather than tokens and its inter-token latency incomparable with the other servers'.
    """

    def __init__(self, tokenizer: Any, job: Job) -> None:
        self._tokenizer = tokenizer
        self._job = job
        self._prompt_seen = False
        self._sent = ""
        self.token_ids: list[int] = []

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.token_ids.extend(value.reshape(-1).tolist())
        text = self._tokenizer.decode(self.token_ids, skip_special_tokens=True)
        # A trailing replacement character is half of a multi-byte character: wait for the rest.
        if text.endswith("\ufffd") or len(text) <= len(self._sent):
            return
        self._job.emit("text", text[len(self._sent) :])
        self._sent = text

    def end(self) -> None:
        """Nothing to flush: every complete character was emitted by ``put``."""


def create_app(worker: GenerationWorker, model_name: str) -> FastAPI:
    """The baseline's routes; one asyncio lock makes requests wait their turn."""
    app = FastAPI(title="baseline")
    turn = asyncio.Lock()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        model = {"id": model_name, "object": "model", "created": 0, "owned_by": "baseline"}
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatRequest) -> Any:
        job = Job(
            messages=request.messages,
            max_tokens=request.max_completion_tokens or request.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=request.temperature,
            loop=asyncio.get_running_loop(),
        )
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if request.stream:
            include_usage = bool((request.stream_options or {}).get("include_usage"))
            chunks = stream_chunks(job, completion_id, include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream")
        pieces = []
        async for kind, value in run_job(job):
            if kind == "text":
                pieces.append(value)
            elif kind == "error":
                return JSONResponse(error_body(value), status_code=500)
            else:
                final_usage, finish_reason = value
        message = {"role": "assistant", "content": "".join(pieces)}
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": final_usage,
        }

    async def run_job(job: Job) -> AsyncIterator[tuple[str, Any]]:
        """Wait for this request's turn, run it, and yield its events until it ends."""
        async with turn:
            worker.submit(job)
            try:
                while True:
                    kind, value = await job.events.get()
                    yield kind, value
                    if kind != "text":
                        return
            finally:
                job.cancelled.set()

    async def stream_chunks(job: Job, completion_id: str, include_usage: bool) -> AsyncIterator[str]:
        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model_name,
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(body)}\n\n"

        def delta(content: dict[str, str], finish_reason: str | None = None) -> str:
            return event([{"index": 0, "delta": content, "finish_reason": finish_reason}])

        yield delta({"role": "assistant", "content": ""})
        async for kind, value in run_job(job):
            if kind == "text":
                yield delta({"content": value})
            elif kind == "error":
                yield f"data: {json.dumps(error_body(value))}\n\n"
            else:
                final_usage, finish_reason = value
                yield delta({}, finish_reason)
                if include_usage:
                    yield event([], usage=final_usage)
        yield "data: [DONE]\n\n"

    return app


def error_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="transformers-format model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    worker = GenerationWorker(args.model)
    worker.wait_loaded()
    uvicorn.run(create_app(worker, args.model), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
