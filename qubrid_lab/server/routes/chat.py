"""``POST /v1/chat/completions``."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from qubrid_lab.engine.base import GenerationRequest, message_text
from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.server.access import chat_backend, reads_images
from qubrid_lab.server.images import check_fetchable, load_images
from qubrid_lab.server.protocol.chat import ChatCompletion, ChatCompletionRequest
from qubrid_lab.server.protocol.logprobs import chat_logprobs
from qubrid_lab.server.routes.generation import (
    StreamFormat,
    collect,
    completion_id,
    envelope,
    start_metered,
    stream,
)
from qubrid_lab.server.sse import sse_response

router = APIRouter()


async def _read_images(body: ChatCompletionRequest, generation: GenerationRequest, backend, request: Request) -> None:
    """Check the request's images against the model and the server's image policy; for a backend that takes
    them decoded (the embedded engine), read them (data URLs) or fetch them (http(s) URLs)."""
    with_image = [i for i, message in enumerate(body.messages) if message.has_image()]
    if not with_image:
        return
    if not reads_images(backend):
        raise InvalidRequestError(
            f"messages[{with_image[0]}].content has an image_url part, but model '{body.model}' reads text only. "
            "Send text parts only, or use a vision model.",
            param=f"messages[{with_image[0]}].content",
        )
    policy = request.app.state.image_policy
    if hasattr(backend, "encode_vision_chat"):
        generation.images = await load_images(generation.messages, policy)
    else:
        check_fetchable(generation.messages, policy)


def prompt_characters(messages: list[dict]) -> int:
    """The text the prompt holds, for the token estimate admission reserves before the backend counts it."""
    return sum(len(message_text(message)) for message in messages)


ARGUMENT_FRAGMENT = 16  # characters of a call's arguments per streamed chunk


def _call_chunks(index: int, calls: list[dict]) -> list[dict]:
    """A choice's tool calls as OpenAI streams them: each call's id and name first, then its arguments in
    fragments."""
    chunks = []
    for k, call in enumerate(calls):
        chunks.append(
            {
                "index": index,
                "finish_reason": None,
                "logprobs": None,
                "delta": {
                    "tool_calls": [
                        {
                            "index": k,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": ""},
                        }
                    ]
                },
            }
        )
        arguments = call["function"]["arguments"]
        for start in range(0, len(arguments), ARGUMENT_FRAGMENT):
            chunks.append(
                {
                    "index": index,
                    "finish_reason": None,
                    "logprobs": None,
                    "delta": {
                        "tool_calls": [
                            {"index": k, "function": {"arguments": arguments[start : start + ARGUMENT_FRAGMENT]}}
                        ]
                    },
                }
            )
    return chunks


@router.post("/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    backend = chat_backend(request, body.model)
    generation = body.generation_request()
    await _read_images(body, generation, backend, request)
    run, charge = await start_metered(request, body.model, generation, prompt_characters(generation.messages), backend)
    request_id = completion_id("chatcmpl")
    if body.stream:
        fmt = StreamFormat(
            opening=lambda i: {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
            piece=lambda i, text, finish, logprobs: {
                "index": i,
                "delta": {"content": text} if text else {},
                "logprobs": chat_logprobs(logprobs),
                "finish_reason": finish,
            },
            envelope=envelope("chat.completion.chunk", request_id, body.model),
            calls=_call_chunks,
        )
        return sse_response(stream(run, fmt, body.include_usage, charge))
    done = await collect(run, charge)
    return ChatCompletion(
        id=request_id,
        created=int(time.time()),
        model=body.model,
        choices=[
            {
                "index": i,
                "finish_reason": reason,
                "logprobs": chat_logprobs(logprobs),
                "message": {"role": "assistant", "content": None, "tool_calls": calls}
                if calls
                else {"role": "assistant", "content": text},
            }
            for i, (text, reason, logprobs, calls) in enumerate(
                zip(done.texts, done.reasons, done.logprobs, done.tool_calls)
            )
        ],
        usage=done.usage,
        x_metrics=done.metrics,
    )
