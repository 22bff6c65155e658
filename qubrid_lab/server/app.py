"""``create_app``: the FastAPI application over an already loaded :class:`ModelRegistry`.

Inference lives under ``/v1``; the fine-tuning API under both ``/api/v1`` (the platform spec's server) and
``/v1``, so one ``base_url`` reaches everything.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from qubrid_lab import __version__
from qubrid_lab.engine.registry import ModelRegistry
from qubrid_lab.errors import HeadersTooLargeError, PayloadTooLargeError
from qubrid_lab.models.catalogue import Catalogue, default_catalogue
from qubrid_lab.server.auth import BearerAuth, require_admin
from qubrid_lab.server.errors import error_response, install_error_handlers
from qubrid_lab.server.images import ImagePolicy
from qubrid_lab.server.metering import Meter
from qubrid_lab.server.observability import Metrics, RequestObserver
from qubrid_lab.server.openapi import document_errors
from qubrid_lab.server.routes import (
    chat,
    completions,
    embeddings,
    files,
    fine_tuning_datasets,
    fine_tuning_jobs,
    fine_tuning_models,
    models,
    openai_fine_tuning,
    responses,
    usage,
)
from qubrid_lab.settings import Settings
from qubrid_lab.storage.datasets import DatasetStore
from qubrid_lab.storage.db import Database
from qubrid_lab.storage.jobs import JobStore
from qubrid_lab.storage.keys import KeyStore
from qubrid_lab.storage.usage import UsageLedger
from qubrid_lab.training.jobs import JobManager

FINE_TUNING_PREFIXES = ("/api/v1", "/v1")


def _catalogue_of(registry: ModelRegistry) -> Catalogue:
    """The default catalogue plus the registry's loaded models, for apps built without a catalogue."""
    catalogue = default_catalogue()
    for backend in registry.all().values():
        entry = getattr(backend, "entry", None)
        if entry is not None and entry.id not in catalogue.entries:
            catalogue.register(entry)
    return catalogue


def create_app(
    settings: Settings, registry: ModelRegistry, *, close_registry: bool = True, catalogue: Catalogue | None = None
) -> FastAPI:
    """The server's app; ``registry`` holds the loaded models and is closed when the app shuts down.

    ``catalogue`` lists the models jobs may fine-tune (its chat models); by default the bundled ones and
    those in ``registry``. Fine-tuned models reach the registry through its ``add_adapter`` and
    ``remove_adapter`` methods, called by the job manager when a job completes (and at start for every
    stored one) and when a fine-tuned model is deleted.
    """
    database = Database(settings.database_path)
    datasets = DatasetStore(database, settings.files_dir)
    catalogue = catalogue or _catalogue_of(registry)
    keys = KeyStore(database)
    meter = Meter(settings, UsageLedger(database), keys, catalogue.entries)
    job_manager = JobManager(
        settings,
        catalogue,
        datasets,
        JobStore(database),
        on_model_ready=registry.add_adapter,
        on_model_removed=registry.remove_adapter,
        gpu_reservations=registry.gpu_reservations,
        on_trained=meter.record_training,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        job_manager.start()
        try:
            yield
        finally:
            job_manager.stop()
            database.close()
            if close_registry:
                registry.close()

    app = FastAPI(title="qubrid_lab", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = registry
    app.state.datasets = datasets
    app.state.job_manager = job_manager
    app.state.meter = meter
    app.state.image_policy = ImagePolicy.from_settings(settings)
    auth = BearerAuth(keys, settings.load_api_keys(), meter)
    app.state.auth = auth
    install_error_handlers(app)
    document_errors(app)

    app.add_middleware(
        BodySizeLimit,
        limit=settings.max_request_bytes,
        streamed_paths={prefix + fine_tuning_datasets.UPLOAD_PATH for prefix in FINE_TUNING_PREFIXES}
        | {"/v1" + files.UPLOAD_PATH},
    )
    metrics = Metrics(app.state)
    meter.metrics = metrics
    app.add_middleware(RequestObserver, metrics=metrics)  # outermost: every response gets its request id

    for router in (
        chat.router,
        completions.router,
        responses.router,
        embeddings.router,
        models.router,
        usage.router,
        files.router,
        openai_fine_tuning.router,
    ):
        app.include_router(router, prefix="/v1", dependencies=[Depends(auth)])
    for prefix in FINE_TUNING_PREFIXES:
        for router in (fine_tuning_datasets.router, fine_tuning_jobs.router, fine_tuning_models.router):
            app.include_router(router, prefix=prefix, dependencies=[Depends(auth)])

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        """Prometheus text format; with keys configured, for admin keys only."""
        request.state.key = auth.resolve(request.headers.get("authorization", ""))
        require_admin(request, "Reading /metrics")
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "models": sorted(registry.all()),
            "auth": auth.enabled,
            "active_sequences": {model_id: backend.active_sequences for model_id, backend in registry.chat.items()},
            # what each embedded chat model is served in, and for --dtype auto what was measured to choose it
            "precision": {
                model_id: backend.precision_choice.as_dict()
                for model_id, backend in registry.chat.items()
                if hasattr(backend, "precision_choice")
            },
        }

    return app


MAX_HEADER_BYTES = 64 * 1024  # uvicorn's parser takes headers of any size; a client needs a few KiB at most


class BodySizeLimit:
    """Answers 413 for a body over the limit, whether its length is declared or it arrives chunked, and 431
    for headers over :data:`MAX_HEADER_BYTES`.

    Pure ASGI (no BaseHTTPMiddleware), so streaming responses and disconnects pass through untouched.
    ``streamed_paths`` (dataset uploads) are left alone: their handlers stream to disk under a limit of their own.
    """

    def __init__(self, app, limit: int, streamed_paths: set[str] = frozenset()):
        self.app = app
        self.limit = limit
        self.streamed_paths = streamed_paths

    def _too_large(self, size: int):
        return error_response(
            PayloadTooLargeError(
                f"The request body is {size} bytes or more; this server accepts at most {self.limit} "
                "(QUBRID_LAB_MAX_REQUEST_BYTES)."
            )
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header_bytes = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if header_bytes > MAX_HEADER_BYTES:
            error = HeadersTooLargeError(
                f"The request's headers are {header_bytes} bytes; this server accepts at most {MAX_HEADER_BYTES}."
            )
            return await error_response(error)(scope, receive, send)
        if scope["path"] in self.streamed_paths:
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
