"""What chat and text completions share: running a request to completion, or streaming it."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi import Request

from qubrid_lab.engine.base import Delta, Failure, Finish, GenerationRequest, GenerationRun
from qubrid_lab.engine.logprobs import TokenLogprob
from qubrid_lab.errors import InternalError
from qubrid_lab.server.access import chat_backend
from qubrid_lab.server.auth import key_of
from qubrid_lab.server.metering import Charge

RECORD_WAIT_SECONDS = 1.0


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class Collected:
    """A finished request: every choice's text, finish reason and (when asked for) tokens' log probabilities,
    and the usage."""

    texts: list[str]
    reasons: list[str]
    prompt_tokens: int
    completion_tokens: int
    metrics: dict = field(default_factory=dict)
    logprobs: list[list[TokenLogprob] | None] = field(default_factory=list)
    tool_calls: list[list[dict] | None] = field(default_factory=list)
    cached_tokens: int = 0

    @property
    def usage(self) -> dict:
        return usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """A chat or completions answer's ``usage``, with OpenAI's ``prompt_tokens_details.cached_tokens``: the
    prompt's leading tokens that came from the server's prompt cache (billed as any prompt token)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


async def start_metered(
    request: Request, model: str, generation: GenerationRequest, prompt_characters: int, backend=None
) -> tuple[GenerationRun, Charge]:
    """Admit the request for its key (credit, limits, the model's waiting room), then start it on its model."""
    backend = backend or chat_backend(request, model)
    choices = generation.n * (len(generation.prompts) if generation.prompts is not None else 1)
    charge = request.app.state.meter.admit(
        key_of(request), model, prompt_characters, generation.params.max_tokens, choices, backend
    )
    try:
        run = await backend.start(generation)
    except BaseException:
        charge.settle(0, 0)
        raise
    return run, charge


async def settled(recorded, seconds: float = RECORD_WAIT_SECONDS) -> None:
    """Wait a moment for a usage row to be written, so the answer's client can read it right after; a database
    busy for longer does not hold the answer back (the row is still written when it frees up)."""
    if recorded is not None:
        try:
            await asyncio.wait_for(asyncio.shield(recorded), seconds)
        except asyncio.TimeoutError:
            pass


async def collect(run: GenerationRun, charge: Charge) -> Collected:
    """Wait for every choice of ``run``; a backend failure becomes a 500 with its reason."""
    texts, reasons, tokens = [""] * run.choices, ["stop"] * run.choices, 0
    logprobs: list[list[TokenLogprob] | None] = [None] * run.choices
    tool_calls: list[list[dict] | None] = [None] * run.choices
    recorded = None
    try:
        async for event in run.events():
            if isinstance(event, Failure):
                raise event.error or InternalError(event.message)
            texts[event.index] += event.text
            if event.logprobs is not None:
                logprobs[event.index] = (logprobs[event.index] or []) + event.logprobs
            if isinstance(event, Finish):
                reasons[event.index] = event.reason
                tool_calls[event.index] = event.tool_calls
                tokens += event.completion_tokens
    finally:
        run.cancel()
        recorded = charge.settle(run.prompt_tokens, tokens, run.metrics(tokens)["ttft_seconds"])
    await settled(recorded)
    return Collected(
        texts, reasons, run.prompt_tokens, tokens, run.metrics(tokens), logprobs, tool_calls, run.cached_tokens
    )


@dataclass
class StreamFormat:
    """How one endpoint spells its chunks: ``opening(index)`` (may be None), ``piece(index, text, finish,
    logprobs)``, ``calls(index, tool_calls)`` (the chunks that stream a choice's tool calls); ``late_opening``:
    the openings wait for the first event (the prompt's logprobs come with it)."""

    opening: Callable[[int], dict] | None
    piece: Callable[[int, str, str | None, list[TokenLogprob] | None], dict]
    envelope: Callable[[list[dict]], dict]
    late_opening: bool = False
    calls: Callable[[int, list[dict]], list[dict]] | None = None


async def stream(run: GenerationRun, fmt: StreamFormat, include_usage: bool, charge: Charge) -> AsyncIterator[str]:
    """SSE chunks of ``run``; ``x_metrics`` rides on the last chunk before ``[DONE]``.

    The usage is settled however the stream ends: a client that hangs up is charged what was generated.
    """
    from qubrid_lab.server.sse import DONE, sse_event

    def chunk(choices: list[dict], **extra) -> str:
        body = fmt.envelope(choices)
        if include_usage:
            body["usage"] = None
        body.update(extra)
        return sse_event(body)

    tokens, open_choices, opened = 0, run.choices, not fmt.opening
    try:
        if fmt.opening and not fmt.late_opening:
            for index in range(run.choices):
                yield chunk([fmt.opening(index)])
            opened = True
        async for event in run.events():
            if isinstance(event, Failure):
                yield sse_event((event.error or InternalError(event.message)).to_body())
                return
            if not opened:
                for index in range(run.choices):
                    yield chunk([fmt.opening(index)])
                opened = True
            if isinstance(event, Delta):
                yield chunk([fmt.piece(event.index, event.text, None, event.logprobs)])
                continue
            tokens += event.completion_tokens
            open_choices -= 1
            if event.text or event.logprobs:
                yield chunk([fmt.piece(event.index, event.text, None, event.logprobs)])
            for call_chunk in fmt.calls(event.index, event.tool_calls) if event.tool_calls and fmt.calls else ():
                yield chunk([call_chunk])
            last = open_choices == 0 and not include_usage
            extra = {"x_metrics": run.metrics(tokens)} if last else {}
            yield chunk([fmt.piece(event.index, "", event.reason, None)], **extra)
        if include_usage:
            totals = usage(run.prompt_tokens, tokens, run.cached_tokens)
            yield chunk([], usage=totals, x_metrics=run.metrics(tokens))
        yield DONE
    finally:
        run.cancel()
        charge.settle(run.prompt_tokens, tokens, run.metrics(tokens)["ttft_seconds"])


def envelope(object_name: str, request_id: str, model: str) -> Callable[[list[dict]], dict]:
    created = int(time.time())
    return lambda choices: {
        "id": request_id,
        "object": object_name,
        "created": created,
        "model": model,
        "choices": choices,
    }
