"""``POST /v1/responses``: OpenAI's Responses API for text and function calling, stateless.

It runs on the same chat backends as ``/v1/chat/completions`` (one choice); the answer becomes a response
object whose ``output`` holds a ``message`` item or ``function_call`` items. Streamed, it sends the typed
events OpenAI's SDKs read (``response.created``, ``response.output_text.delta``,
``response.function_call_arguments.delta``, ..., ``response.completed``), each numbered.
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request

from qubrid_lab.engine.base import Delta, Failure, GenerationRun
from qubrid_lab.errors import InternalError
from qubrid_lab.server.access import chat_backend
from qubrid_lab.server.metering import Charge
from qubrid_lab.server.protocol.responses import ResponseRequest
from qubrid_lab.server.routes.chat import ARGUMENT_FRAGMENT, prompt_characters
from qubrid_lab.server.routes.generation import collect, start_metered
from qubrid_lab.server.sse import sse_event, sse_response

router = APIRouter()


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "input_tokens": prompt_tokens,
        "output_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(message_id: str, text: str, status: str) -> dict:
    return {
        "type": "message",
        "id": message_id,
        "status": status,
        "role": "assistant",
        "content": [] if status == "in_progress" else [_text_part(text)],
    }


def _function_call(call: dict, arguments: str | None = None) -> dict:
    return {
        "type": "function_call",
        "id": _id("fc"),
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"] if arguments is None else arguments,
        "status": "completed" if arguments is None else "in_progress",
    }


class ResponseShape:
    """A response object of one request, at any stage: settings echoed, output and usage as they stand."""

    def __init__(self, body: ResponseRequest):
        self.body, self.id, self.created = body, _id("resp"), int(time.time())

    def __call__(
        self,
        status: str,
        output: list[dict],
        usage: dict | None = None,
        metrics: dict | None = None,
        reason: str | None = None,
    ) -> dict:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.body.model,
            "output": output,
            "usage": usage,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if reason == "length" else None,
            **self.body.echoed(),
            "x_metrics": metrics,
        }


@router.post("/responses", response_model=None)
async def create_response(body: ResponseRequest, request: Request):
    backend = chat_backend(request, body.model)
    generation = body.generation_request()
    run, charge = await start_metered(request, body.model, generation, prompt_characters(generation.messages), backend)
    shape = ResponseShape(body)
    if body.stream:
        return sse_response(_stream(run, charge, shape))
    done = await collect(run, charge)
    reason, calls = done.reasons[0], done.tool_calls[0]
    output = (
        [_function_call(call) for call in calls]
        if calls
        else [_message(_id("msg"), done.texts[0], "incomplete" if reason == "length" else "completed")]
    )
    return shape(
        "incomplete" if reason == "length" else "completed",
        output,
        _usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens),
        done.metrics,
        reason,
    )


async def _stream(run: GenerationRun, charge: Charge, shape: ResponseShape) -> AsyncIterator[str]:
    """The typed events of one response; the usage is settled however the stream ends."""
    numbers = itertools.count()

    def event(kind: str, **fields) -> str:
        return f"event: {kind}\n" + sse_event({"type": kind, "sequence_number": next(numbers), **fields})

    message_id, text, tokens, output = _id("msg"), "", 0, []
    where = {"item_id": message_id, "output_index": 0, "content_index": 0}
    try:
        yield event("response.created", response=shape("in_progress", []))
        yield event("response.in_progress", response=shape("in_progress", []))
        opened = False
        async for item in run.events():
            if isinstance(item, Failure):
                error = (item.error or InternalError(item.message)).to_body()["error"]
                failed = shape("failed", output)
                failed["error"] = {"code": error.get("code") or "server_error", "message": error["message"]}
                yield event("response.failed", response=failed)
                return
            calls = None if isinstance(item, Delta) else item.tool_calls
            if not opened and not calls:  # a text answer (even an empty one) is one message item
                opened = True
                yield event("response.output_item.added", output_index=0, item=_message(message_id, "", "in_progress"))
                yield event("response.content_part.added", **where, part=_text_part(""))
            if item.text:
                text += item.text
                yield event("response.output_text.delta", **where, delta=item.text, logprobs=[])
            if isinstance(item, Delta):
                continue
            tokens, reason = item.completion_tokens, item.reason
            if calls:
                for index, call in enumerate(calls):
                    pending = _function_call(call, arguments="")
                    yield event("response.output_item.added", output_index=index, item=pending)
                    arguments = call["function"]["arguments"]
                    for start in range(0, len(arguments), ARGUMENT_FRAGMENT):
                        yield event(
                            "response.function_call_arguments.delta",
                            item_id=pending["id"],
                            output_index=index,
                            delta=arguments[start : start + ARGUMENT_FRAGMENT],
                        )
                    yield event(
                        "response.function_call_arguments.done",
                        item_id=pending["id"],
                        output_index=index,
                        arguments=arguments,
                    )
                    output.append({**pending, "arguments": arguments, "status": "completed"})
                    yield event("response.output_item.done", output_index=index, item=output[-1])
            else:
                status = "incomplete" if reason == "length" else "completed"
                yield event("response.output_text.done", **where, text=text, logprobs=[])
                yield event("response.content_part.done", **where, part=_text_part(text))
                output.append(_message(message_id, text, status))
                yield event("response.output_item.done", output_index=0, item=output[-1])
        final = shape(
            "incomplete" if reason == "length" else "completed",
            output,
            _usage(run.prompt_tokens, tokens, run.cached_tokens),
            run.metrics(tokens),
            reason,
        )
        yield event("response.incomplete" if reason == "length" else "response.completed", response=final)
    finally:
        run.cancel()
        charge.settle(run.prompt_tokens, tokens, run.metrics(tokens)["ttft_seconds"])
