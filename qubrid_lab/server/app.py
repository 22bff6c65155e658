"""``create_app``: the FastAPI application over an already loaded :class:`ModelRegistry`."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from qubrid_lab import __version__
from qubrid_lab.engine.registry import ModelRegistry
from qubrid_lab.errors import PayloadTooLargeError
from qubrid_lab.server.auth import BearerAuth
from qubrid_lab.server.errors import error_response, install_error_handlers
from qubrid_lab.server.routes import chat, completions, embeddings, models
from qubrid_lab.settings import Settings


def create_app(settings: Settings, registry: ModelRegistry, *, close_registry: bool = True) -> FastAPI:
    """The server's app; ``registry`` holds the loaded models and is closed when the app shuts down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if close_registry:
            registry.close()

    app = FastAPI(title="qubrid_lab", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = registry
    auth = BearerAuth(settings.load_api_keys())
    app.state.auth = auth
    install_error_handlers(app)

    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)

    for router in (chat.router, completions.router, embeddings.router, models.router):
        app.include_router(router, prefix="/v1", dependencies=[Depends(auth)])

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "models": sorted(registry.all()),
            "auth": auth.enabled,
            "active_sequences": {model_id: backend.active_sequences for model_id, backend in registry.chat.items()},
        }

    return app


class BodySizeLimit:
    """Answers 413 for a body over the limit, whether its length is declared or it arrives chunked.

    Pure ASGI (no BaseHTTPMiddleware), so streaming responses and disconnects pass through untouched.
    """

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    def _too_large(self, size: int):
        return error_response(PayloadTooLargeError(
            f"The request body is {size} bytes or more; this server accepts at most {self.limit} "
            "(QUBRID_LAB_MAX_REQUEST_BYTES)."))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit():
            if int(length) > self.limit:
                return await self._too_large(int(length))(scope, receive, send)
            return await self.app(scope, receive, send)
        # No declared length: read the body here, counting, then replay it to the app.
        buffered, size = [], 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._too_large(size)(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return buffered.pop(0) if buffered else await receive()

        return await self.app(scope, replay, send)
