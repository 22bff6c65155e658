"""What an operator sees: Prometheus metrics at ``GET /metrics``, and a request id on every response and log line.

Metrics live in a registry of the app's own (``prometheus-client``), so every app (and every test) counts
alone. Counters and histograms are updated as requests pass; the state of models and jobs (sequences running
and waiting, jobs by status, running jobs' step and loss, backend health) is read when Prometheus scrapes.

Every response carries ``X-Request-Id``: the client's own (when it is 1-128 characters of letters, digits and
``-_.:``), else a fresh one. One structured log line per request (logger ``qubrid_lab.access``) names it.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

access_log = logging.getLogger("qubrid_lab.access")
request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class Metrics:
    """The app's metrics; ``observe_request`` and ``observe_generation`` as traffic passes."""

    def __init__(self, app_state):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "qubrid_lab_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "qubrid_lab_request_duration_seconds",
            "Request time until the response ended (a stream's whole length).",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "qubrid_lab_time_to_first_token_seconds",
            "Time to the first generated token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "qubrid_lab_tokens",
            "Tokens by model and kind (prompt, completion, training).",
            ["model", "kind"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(app_state))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_generation(
        self,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_seconds: float | None = None,
        training_tokens: int = 0,
    ) -> None:
        for kind, count in (
            ("prompt", prompt_tokens),
            ("completion", completion_tokens),
            ("training", training_tokens),
        ):
            if count:
                self.tokens.labels(model, kind).inc(count)
        if ttft_seconds is not None and completion_tokens:
            self.ttft.labels(model).observe(ttft_seconds)


class _StateCollector:
    """Gauges read at scrape time from the registry of models and the job store."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        settings, registry = self.state.settings, self.state.registry
        running = GaugeMetricFamily(
            "qubrid_lab_sequences_running", "Sequences decoding now, per model.", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "qubrid_lab_sequences_waiting",
            "Sequences waiting for a decoding slot, per "
            "model (for remote backends: requests in flight beyond max_batch_size).",
            labels=["model"],
        )
        up = GaugeMetricFamily(
            "qubrid_lab_backend_up", "1 when the model's backend can take requests.", labels=["model", "backend"]
        )
        for model_id, backend in registry.all().items():
            entry = getattr(backend, "entry", None)
            up.add_metric([model_id, getattr(entry, "backend", "local")], 1.0 if _healthy(backend) else 0.0)
            if model_id in registry.chat:
                active = backend.active_sequences
                running.add_metric([model_id], min(active, settings.max_batch_size))
                waiting.add_metric([model_id], max(active - settings.max_batch_size, 0))
        yield running
        yield waiting
        yield up
        jobs = self.state.job_manager.jobs
        by_status = GaugeMetricFamily("qubrid_lab_jobs", "Fine-tuning jobs by status.", labels=["status"])
        counts = jobs.counts()
        for status in ("queued", "running", "paused", "completed", "failed", "cancelled"):
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status
        steps = GaugeMetricFamily("qubrid_lab_job_steps_completed", "Steps a running job has trained.", labels=["job"])
        loss = GaugeMetricFamily(
            "qubrid_lab_job_training_loss", "A running job's latest training loss.", labels=["job"]
        )
        for job in jobs.with_status("running"):
            steps.add_metric([job.id], job.steps_completed)
            if job.training_loss is not None:
                loss.add_metric([job.id], job.training_loss)
        yield steps
        yield loss


def _route_template(scope) -> str:
    """The matched route's path with its parameters as ``{name}`` (ids would make a label per object)."""
    if "endpoint" not in scope:
        return "unmatched"
    path = scope["path"]
    for name, value in (scope.get("path_params") or {}).items():
        value = str(value)
        if value and value in path:
            head, _, tail = path.rpartition(value)
            path = f"{head}{{{name}}}{tail}"
    return path


def _healthy(backend) -> bool:
    """A managed vLLM is up while its child answers; a remote backend until a request to it fails (and again
    once one succeeds); the embedded engine while it is loaded."""
    process = getattr(backend, "process", None)
    if process is not None and hasattr(process, "ready") and not process.ready.is_set():
        return False
    return getattr(backend, "healthy", True)


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every log record (``%(request_id)s``; '-' outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(level: str) -> None:
    """The server's log: every line names the request it was written for."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())


class RequestObserver:
    """Pure ASGI middleware: the request id, one access log line, and the request metrics."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started, status = time.perf_counter(), 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            template = _route_template(scope)
            self.metrics.observe_request(template, scope["method"], status, seconds)
            key = scope.get("state", {}).get("key")
            access_log.info(
                "request_id=%s method=%s route=%s status=%d duration_ms=%.1f key=%s",
                request_id,
                scope["method"],
                template,
                status,
                seconds * 1000,
                getattr(key, "name", "-") if key is not None else "-",
            )
            request_id_var.reset(token)
