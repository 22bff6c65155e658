"""Server-sent events in the OpenAI stream format."""

from __future__ import annotations

import json
from typing import AsyncIterator

from fastapi.responses import StreamingResponse

DONE = "data: [DONE]\n\n"
# JSON leaves these unescaped, and Python's str.splitlines (which httpx's aiter_lines uses) breaks lines at
# them: a generated U+2028 split a chunk in two for such clients. Escaped, every event is one line anywhere.
UNICODE_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_event(payload: dict) -> str:
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).translate(UNICODE_LINE_BREAKS)
    return f"data: {text}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
