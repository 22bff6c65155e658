"""``POST /v1/embeddings``."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request

from qubrid_lab.server.protocol.embeddings import EmbeddingRequest, EmbeddingResponse

router = APIRouter()


@router.post("/embeddings")
async def create_embedding(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    backend = request.app.state.registry.embedding_model(body.model)
    vectors, tokens = await backend.embed(body.texts())
    if body.encoding_format == "base64":  # little-endian float32, as OpenAI's SDKs decode it
        encoded = [base64.b64encode(row.tobytes()).decode() for row in vectors.astype("<f4", copy=False)]
    else:
        encoded = vectors.tolist()
    return EmbeddingResponse(
        data=[{"embedding": vector, "index": i} for i, vector in enumerate(encoded)],
        model=body.model,
        usage={"prompt_tokens": tokens, "total_tokens": tokens},
    )
