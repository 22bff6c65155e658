"""``POST /v1/embeddings``."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request

from qubrid_lab.server.access import embedding_backend
from qubrid_lab.server.auth import key_of
from qubrid_lab.server.metering import input_characters
from qubrid_lab.server.protocol.embeddings import EmbeddingRequest, EmbeddingResponse
from qubrid_lab.server.routes.generation import settled

router = APIRouter()


@router.post("/embeddings")
async def create_embedding(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    backend = embedding_backend(request, body.model)
    inputs = body.inputs()
    charge = request.app.state.meter.admit(key_of(request), body.model, input_characters(inputs), 0)
    tokens, recorded = 0, None
    try:
        vectors, tokens = await backend.embed(inputs)
    finally:
        recorded = charge.settle(tokens, 0)
    await settled(recorded)
    if body.encoding_format == "base64":  # little-endian float32, as OpenAI's SDKs decode it
        encoded = [base64.b64encode(row.tobytes()).decode() for row in vectors.astype("<f4", copy=False)]
    else:
        encoded = vectors.tolist()
    return EmbeddingResponse(
        data=[{"embedding": vector, "index": i} for i, vector in enumerate(encoded)],
        model=body.model,
        usage={"prompt_tokens": tokens, "total_tokens": tokens},
    )
