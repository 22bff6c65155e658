"""What every inference backend speaks: a request handle that streams per-choice events.

A backend (the local transformers engine, Triton, a remote OpenAI-compatible endpoint) receives token ids
or text and pushes :class:`Delta` and :class:`Finish` events into a :class:`GenerationHandle`, from its own
thread; the server's routes read them with ``async for`` and turn them into JSON or SSE chunks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

import numpy as np

from qubrid_lab.engine.logprobs import TokenLogprob
from qubrid_lab.engine.sampling import SamplingParams
from qubrid_lab.errors import QubridError


@dataclass
class Delta:
    """New text for one choice; with ``logprobs`` asked for, the tokens that text is made of."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Finish:
    """One choice ended; ``completion_tokens`` counts every token it generated."""

    index: int
    reason: str  # "stop", "length" or "tool_calls"
    text: str
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[dict] | None = None  # reason "tool_calls": the calls, in OpenAI's shape (ids, JSON arguments)


@dataclass
class Failure:
    """The backend could not finish the request; ``error`` says how the client sees it (else a 500)."""

    message: str
    error: QubridError | None = None


Event = Delta | Finish | Failure


@dataclass
class GenerationHandle:
    """One prompt in flight with ``n`` choices numbered from ``first_index``; events go to ``queue``."""

    prompt_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    n: int = 1
    first_index: int = 0
    prompt_field: str = "messages"  # the request field an error about the prompt names
    max_new_tokens: int = 0
    adapter: str | None = None  # the LoRA adapter (fine-tuned model) to decode with; None: the base model
    shared_prefix: int = (
        0  # leading prompt tokens many prompts share (a chat template's system block), set by the backend
    )
    prompt_logprobs: list[TokenLogprob] | None = (
        None  # with echo and logprobs: the prompt's tokens, set before any event
    )
    cached_tokens: int = 0  # leading prompt tokens whose keys/values came from the prompt cache, set at prefill
    matchers: list | None = None  # structured outputs: one grammar matcher per choice, set by the backend
    images: object | None = None  # a vision model's prompt: what its images add to the prefill (vision.ImageInputs)
    first_token_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False

    def emit(self, event: Event) -> None:
        """Called from the backend's thread; hands the event to the request's event loop."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.finished_at = now
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the request's loop is gone; the backend drops the request on its next step
            self.cancelled = True


class GenerationRun:
    """All prompts of one API request, submitted to one backend; events of every choice on one queue."""

    def __init__(
        self,
        backend: ChatBackend,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        prompt_field: str = "messages",
        prompt_texts: list[str] | None = None,
        images: object | None = None,
    ):
        self.submitted_at = time.perf_counter()
        self.prompt_texts = prompt_texts or []
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.handles = [
            GenerationHandle(
                ids, params, self.queue, loop, n=n, first_index=i * n, prompt_field=prompt_field, images=images
            )
            for i, ids in enumerate(prompts)
        ]
        self.choices = n * len(prompts)
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        try:
            for handle in self.handles:
                backend.submit(handle)
        except Exception:
            self.cancel()
            raise

    def events(self) -> AsyncIterator[Event]:
        """Yields events until every choice has finished, or the backend failed."""
        return drain(self.queue, self.choices)

    def prompt_text(self, prompt: int) -> str:
        """Prompt ``prompt`` as text (what ``echo`` repeats), decoded when it was sent as token ids."""
        return self.prompt_texts[prompt]

    def prompt_logprobs(self, prompt: int) -> list[TokenLogprob] | None:
        """Prompt ``prompt``'s own tokens with log probabilities (``echo`` with ``logprobs``), once it has begun."""
        return self.handles[prompt].prompt_logprobs

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the backend did not prefill: their keys/values came from its prompt cache."""
        return sum(handle.cached_tokens for handle in self.handles)

    def cancel(self) -> None:
        """Free the backend's slots (the client went away or the request is over)."""
        for handle in self.handles:
            handle.cancelled = True

    def metrics(self, completion_tokens: int) -> dict:
        first = min((h.first_token_at for h in self.handles if h.first_token_at), default=None)
        end = max((h.finished_at for h in self.handles if h.finished_at), default=None)
        return run_metrics(self.submitted_at, first, end, completion_tokens)


async def drain(queue: asyncio.Queue, choices: int) -> AsyncIterator[Event]:
    """The events on ``queue`` until ``choices`` choices have finished, or up to the first failure."""
    while choices:
        event = await queue.get()
        yield event
        if isinstance(event, Failure):
            return
        if isinstance(event, Finish):
            choices -= 1


def run_metrics(
    submitted_at: float, first_token_at: float | None, finished_at: float | None, completion_tokens: int
) -> dict:
    """The ``x_metrics`` block: time to first token, output tokens per second, total seconds."""
    end = finished_at or time.perf_counter()
    first = first_token_at or end
    total = end - submitted_at
    return {
        "ttft_seconds": round(first - submitted_at, 4),
        "tps": round(completion_tokens / total, 2) if total > 0 else 0.0,
        "total_time_seconds": round(total, 4),
    }


@dataclass
class GenerationRequest:
    """One validated chat or text-completion request, whole, as every chat backend receives it.

    Chat requests carry ``messages`` (the backend applies the chat template, or its upstream does); text
    completions carry ``prompts``, one or more (each text or token ids), each answered with ``n`` choices
    numbered prompt by prompt.
    """

    params: SamplingParams
    n: int = 1
    messages: list[dict] | None = None
    prompts: list[str | list[int]] | None = None
    echo: bool = False  # text completions: each choice starts with its prompt's text (the route adds it)
    response_format: dict | None = None  # as the client sent it, for backends that enforce it themselves
    tools: list[dict] | None = None  # function tools, as the client sent them
    tool_choice: str | dict = "auto"  # "none", "auto", "required", or {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool = True
    images: list | None = None  # the messages' images (PIL, in order) for backends that read them here


def message_text(message: dict) -> str:
    """A backend message's text: its content, or its text parts joined (an image part has none)."""
    content = message.get("content")
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content)
    return content or ""


class RemoteRun:
    """What a remote backend's run answers about its prompts: they were sent as text (backends refuse echo of
    token ids at start), and no prompt log probabilities (refused at start too)."""

    request: GenerationRequest
    cached_tokens: int = 0  # as the backend reports them (``prompt_tokens_details``), where it does

    def prompt_text(self, prompt: int) -> str:
        return self.request.prompts[prompt]

    def prompt_logprobs(self, prompt: int) -> None:
        return None


class ChatBackend(Protocol):
    """A loaded text-generation model, local or remote."""

    model_id: str
    active_sequences: int

    async def start(self, request: GenerationRequest) -> GenerationRun:
        """Start generating; errors the client should see before any output (a bad field) are raised here."""
        ...

    def close(self) -> None: ...


def start_local(backend, request: GenerationRequest) -> GenerationRun:
    """A run on an engine that takes token ids: the request's prompts tokenized (or their ids checked) by
    ``backend``."""
    if request.messages is not None:
        from qubrid_lab.engine.tool_calls import ToolCallRun, plan

        tools = plan(request, backend.native_tools)
        params = dataclasses.replace(request.params, grammar=tools.grammar) if tools.grammar else request.params
        if request.images:
            ids, images = backend.encode_vision_chat(tools.messages, tools.template_tools, request.images)
        else:
            ids, images = backend.encode_chat(tools.messages, tools.template_tools), None
        run = GenerationRun(backend, [ids], params, request.n, images=images)
        return ToolCallRun(run, tools.functions) if tools.functions else run
    several = len(request.prompts) > 1
    prompts = [
        backend.encode_text(prompt)
        if isinstance(prompt, str)
        else backend.checked_ids(prompt, f"prompt[{i}]" if several else "prompt")
        for i, prompt in enumerate(request.prompts)
    ]
    texts = [prompt if isinstance(prompt, str) else backend.decode(prompt) for prompt in request.prompts]
    return GenerationRun(backend, prompts, request.params, request.n, prompt_field="prompt", prompt_texts=texts)


class EmbeddingBackend(Protocol):
    """A loaded embedding model."""

    model_id: str

    async def embed(self, inputs: list[str | list[int]]) -> tuple[np.ndarray, int]:
        """One vector per input (all texts, or all token ids) and the tokens they took."""
        ...

    def close(self) -> None: ...
