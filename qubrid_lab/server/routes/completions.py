"""``POST /v1/completions`` (legacy text completions)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from qubrid_lab.engine.base import GenerationRequest
from qubrid_lab.server.protocol.completions import Completion, CompletionRequest
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


@router.post("/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request):
    prompts = body.prompts()
    n = body.choices_per_prompt
    run, charge = await start_metered(request, body.model, GenerationRequest(
        body.sampling_params(body.max_tokens), n, prompts=prompts), sum(len(prompt) for prompt in prompts))
    request_id = completion_id("cmpl")

    def echoed(index: int) -> str:
        return prompts[index // n] if body.echo else ""

    if body.stream:
        fmt = StreamFormat(
            opening=(lambda i: {"text": echoed(i), "index": i, "logprobs": None, "finish_reason": None})
            if body.echo else None,
            piece=lambda i, text, finish: {"text": text, "index": i, "logprobs": None, "finish_reason": finish},
            envelope=envelope("text_completion", request_id, body.model),
        )
        return sse_response(stream(run, fmt, body.include_usage, charge))
    done = await collect(run, charge)
    return Completion(
        id=request_id,
        created=int(time.time()),
        model=body.model,
        choices=[{"text": echoed(i) + text, "index": i, "finish_reason": reason}
                 for i, (text, reason) in enumerate(zip(done.texts, done.reasons))],
        usage=done.usage,
        x_metrics=done.metrics,
    )
