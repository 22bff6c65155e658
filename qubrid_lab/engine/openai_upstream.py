"""The ``openai`` backend: an OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, Ollama, the hosted
platform, another ``qubrid-lab serve``) behind this server's API, keys and ``x_metrics``.

Requests are forwarded whole and streamed back chunk by chunk (never buffered), with pooled connections
(httpx). Usage comes from the upstream (``stream_options.include_usage``). Errors take the one error shape:
a 400/404 from the upstream keeps its status and message (a 422 becomes 400); a refused key, an unreachable,
timing-out or failing upstream becomes 502 ``upstream_error`` naming the backend and model. Connection
attempts are retried with backoff; a request that may have started generating never is. A client that hangs
up closes the upstream stream, which cancels the request there.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import AsyncIterator

import httpx
import numpy as np

from qubrid_lab.engine.base import Delta, Event, Failure, Finish, GenerationRequest, run_metrics
from qubrid_lab.errors import InvalidRequestError, QubridError, UpstreamError
from qubrid_lab.models.catalogue import ModelEntry

CONNECT_RETRY_DELAYS = (0.25, 0.5, 1.0)  # seconds before each new attempt after a refused connection
TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=60.0, pool=60.0)


class UpstreamRefusal(QubridError):
    """A 400/404 the upstream answered, passed on with its own status, message and code."""

    def __init__(self, status: int, message: str, *, error_type: str, code: str, param: str | None):
        super().__init__(message, param=param)
        self.status_code, self.error_type, self.code = status, error_type, code


def api_key_of(entry: ModelEntry) -> str | None:
    """The upstream key from the entry's ``api_key_env``; a named variable that is unset is refused at start."""
    if not entry.api_key_env:
        return None
    key = os.environ.get(entry.api_key_env)
    if not key:
        raise InvalidRequestError(f"Model '{entry.id}' (backend 'openai') takes its upstream key from the "
                                  f"environment variable {entry.api_key_env}, which is not set. Set it, or "
                                  "remove api_key_env from the entry if the upstream needs no key.")
    return key


def upstream_status(entry: ModelEntry, timeout: float = 5.0) -> str:
    """A one-line health of an entry's upstream, from its ``GET /models``: ready, or what is wrong."""
    try:
        key = api_key_of(entry)
    except InvalidRequestError as exc:
        return f"not ready: {exc.message}"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(f"{entry.base_url.rstrip('/')}/models", headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return f"unreachable: {type(exc).__name__}: {exc}"
    if response.status_code in (401, 403):
        return f"key refused ({response.status_code})"
    if response.status_code >= 400:
        return f"answers {response.status_code}"
    try:
        listed = {model.get("id") for model in response.json().get("data", [])}
    except (ValueError, AttributeError):
        return "answers, but not with an OpenAI model list"
    return "ready" if entry.upstream_model in listed else f"reachable, but it does not list '{entry.upstream_model}'"


class _Upstream:
    """One catalogue entry's upstream: its pooled client (one per event loop) and error mapping."""

    def __init__(self, entry: ModelEntry, key: str | None = None):
        self.entry = entry
        self.model_id = entry.id
        self.base_url = entry.base_url.rstrip("/")
        key = key or api_key_of(entry)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}
        self.created = int(time.time())

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            self._clients[loop] = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=TIMEOUT)
        return self._clients[loop]

    def failure(self, what: str) -> UpstreamError:
        return UpstreamError(f"The upstream of model '{self.model_id}' (backend 'openai', {self.base_url}) {what}")

    async def open(self, path: str, body: dict, stream: bool) -> httpx.Response:
        """Send ``body``; a refused connection is retried, any other failure or error status raised mapped."""
        client = self._client()
        for delay in (*CONNECT_RETRY_DELAYS, None):
            try:
                response = await client.send(client.build_request("POST", path, json=body), stream=stream)
                break
            except httpx.ConnectError as exc:
                if delay is None:
                    raise self.failure(f"cannot be reached: {exc}") from exc
                await asyncio.sleep(delay)
            except httpx.TimeoutException as exc:
                raise self.failure(f"did not answer in time ({type(exc).__name__})") from exc
            except httpx.HTTPError as exc:
                raise self.failure(f"failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            raise self._refusal(response)
        return response

    def _refusal(self, response: httpx.Response) -> QubridError:
        status = response.status_code
        try:
            error = response.json().get("error") or {}
        except ValueError:
            error = {}
        message = error.get("message") if isinstance(error, dict) else str(error)
        message = message or response.text[:500] or f"HTTP {status}"
        if status in (400, 404, 422):
            return UpstreamRefusal(
                400 if status == 422 else status, message, param=error.get("param"),
                error_type=error.get("type") or "invalid_request_error",
                code=error.get("code") or ("not_found" if status == 404 else "invalid_request"))
        if status in (401, 403):
            return self.failure(f"refused this server's key ({status}: {message}); check the key in "
                                f"{self.entry.api_key_env or 'api_key_env (none is set)'}")
        return self.failure(f"answered {status}: {message}")

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()


class UpstreamRun:
    """One request streaming from the upstream; the same interface as :class:`GenerationRun`."""

    def __init__(self, upstream: _Upstream, response: httpx.Response, choices: int, submitted_at: float,
                 runs: set):
        self.upstream, self.response, self.choices = upstream, response, choices
        self.submitted_at = submitted_at
        self.prompt_tokens = 0
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._runs = runs
        runs.add(self)

    async def events(self) -> AsyncIterator[Event]:
        """Deltas as they arrive; the finishes at the end, when the usage chunk has given the token counts."""
        finishes: list[Finish] = []
        usage, pieces = None, 0
        try:
            async for line in self.response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"]
                    yield self._failure(f"failed mid-stream: {error.get('message', error)}")
                    return
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                    self.finished_at = time.perf_counter()
                    if text:
                        self.first_token_at = self.first_token_at or self.finished_at
                        pieces += 1
                    if choice.get("finish_reason"):
                        finishes.append(Finish(choice["index"], choice["finish_reason"], text, 0))
                    elif text:
                        yield Delta(choice["index"], text)
        except (httpx.HTTPError, ValueError) as exc:
            yield self._failure(f"broke off mid-stream: {type(exc).__name__}: {exc}")
            return
        finally:
            self.cancel()
        if len(finishes) < self.choices:
            yield self._failure(f"ended the stream with {len(finishes)} of {self.choices} choices finished")
            return
        # OpenAI reports usage per request, not per choice: the last finish carries the request's total.
        completion_tokens = int(usage["completion_tokens"]) if usage else pieces
        self.prompt_tokens = int(usage["prompt_tokens"]) if usage else 0
        finishes[-1].completion_tokens = completion_tokens
        for finish in finishes:
            yield finish

    def _failure(self, what: str) -> Failure:
        error = self.upstream.failure(what)
        return Failure(error.message, error)

    def cancel(self) -> None:
        """Close the upstream stream (which cancels the request there) unless it is closed already."""
        if self in self._runs:
            self._runs.discard(self)
            if not self.response.is_closed:
                asyncio.get_running_loop().create_task(self.response.aclose())

    def metrics(self, completion_tokens: int) -> dict:
        return run_metrics(self.submitted_at, self.first_token_at, self.finished_at, completion_tokens)


class OpenAIUpstreamChat(_Upstream):
    """A chat model served by an OpenAI-compatible upstream: chat and text completions."""

    def __init__(self, entry: ModelEntry, key: str | None = None):
        super().__init__(entry, key)
        self._runs: set[UpstreamRun] = set()

    @property
    def active_sequences(self) -> int:
        return sum(run.choices for run in self._runs)

    async def start(self, request: GenerationRequest) -> UpstreamRun:
        params = request.params
        body = {"model": self.entry.upstream_model, "stream": True, "stream_options": {"include_usage": True},
                "n": request.n, "temperature": params.temperature, "top_p": params.top_p,
                "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty}
        if params.max_tokens:
            body["max_tokens"] = params.max_tokens
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        if request.messages is not None:
            path, body["messages"], choices = "/chat/completions", request.messages, request.n
        else:
            path, body["prompt"], choices = "/completions", request.prompts, request.n * len(request.prompts)
        submitted_at = time.perf_counter()
        response = await self.open(path, body, stream=True)
        return UpstreamRun(self, response, choices, submitted_at, self._runs)

    def close(self) -> None:
        """Connections close with the process; an in-flight stream ends when its client does."""


class OpenAIUpstreamEmbedding(_Upstream):
    """An embedding model served by an OpenAI-compatible upstream."""

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        response = await self.open("/embeddings", {"model": self.entry.upstream_model, "input": texts,
                                                   "encoding_format": "float"}, stream=False)
        try:
            body = response.json()
            rows = sorted(body["data"], key=lambda item: item["index"])
            vectors = np.asarray([row["embedding"] for row in rows], dtype=np.float32)
            tokens = int((body.get("usage") or {}).get("prompt_tokens", 0))
        except (ValueError, KeyError, TypeError) as exc:
            raise self.failure(f"sent an embeddings answer this server cannot read: {exc}") from exc
        return vectors, tokens

    def close(self) -> None:
        """Connections close with the process."""
