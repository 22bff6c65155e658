"""``POST /v1/completions`` (legacy text completions)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from qubrid_lab.engine.base import GenerationRequest
from qubrid_lab.server.metering import input_characters
from qubrid_lab.server.protocol.completions import Completion, CompletionRequest
from qubrid_lab.server.protocol.logprobs import completion_logprobs
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
    with_logprobs = body.logprobs is not None
    echo_logprobs = bool(body.echo) and with_logprobs
    run, charge = await start_metered(
        request,
        body.model,
        GenerationRequest(
            body.sampling_params(body.max_tokens, body.logprobs, echo_logprobs),
            n,
            prompts=prompts,
            echo=bool(body.echo),
        ),
        input_characters(prompts),
    )
    request_id = completion_id("cmpl")

    def echoed(index: int) -> str:
        return run.prompt_text(index // n) if body.echo else ""

    def echoed_logprobs(index: int) -> list:
        return (run.prompt_logprobs(index // n) or []) if echo_logprobs else []

    if body.stream:
        offsets = [len(echoed(i)) for i in range(run.choices)]  # where each choice's next text starts

        def piece(i: int, text: str, finish: str | None, logprobs: list | None) -> dict:
            chunk = {
                "text": text,
                "index": i,
                "logprobs": completion_logprobs(logprobs, offsets[i]),
                "finish_reason": finish,
            }
            offsets[i] += len(text)
            return chunk

        fmt = StreamFormat(
            opening=(
                lambda i: {
                    "text": echoed(i),
                    "index": i,
                    "finish_reason": None,
                    "logprobs": completion_logprobs(echoed_logprobs(i), 0) if echo_logprobs else None,
                }
            )
            if body.echo
            else None,
            piece=piece,
            envelope=envelope("text_completion", request_id, body.model),
            late_opening=echo_logprobs,
        )
        return sse_response(stream(run, fmt, body.include_usage, charge))
    done = await collect(run, charge)
    return Completion(
        id=request_id,
        created=int(time.time()),
        model=body.model,
        choices=[
            {
                "text": echoed(i) + text,
                "index": i,
                "finish_reason": reason,
                "logprobs": completion_logprobs(echoed_logprobs(i) + (logprobs or []), 0) if with_logprobs else None,
            }
            for i, (text, reason, logprobs) in enumerate(zip(done.texts, done.reasons, done.logprobs))
        ],
        usage=done.usage,
        x_metrics=done.metrics,
    )
