"""The ``openai`` backend: an OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, Ollama, the hosted
platform, another ``qubrid-lab serve``) behind this server's API, keys and ``x_metrics``.

Requests are forwarded whole and streamed back chunk by chunk (never buffered), with pooled connections
(aiohttp: its C HTTP parser reads a token's SSE event in about half the CPU httpx's pure-Python stack takes,
which on a CPU the engine shares is time taken from generation; see ``benchmarks/proxy_overhead.py``).
Usage comes from the upstream (``stream_options.include_usage``, or the body); an upstream that sends none is
counted here, with the entry's ``tokenizer`` when it names one, else estimated. Errors take the one error shape:
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
from collections.abc import AsyncIterator

import aiohttp
import httpx
import numpy as np

from qubrid_lab.engine.base import (
    Delta,
    Event,
    Failure,
    Finish,
    GenerationRequest,
    RemoteRun,
    message_text,
    run_metrics,
)
from qubrid_lab.engine.logprobs import TokenLogprob
from qubrid_lab.errors import InvalidRequestError, QubridError, UpstreamError
from qubrid_lab.models.catalogue import ModelEntry

BYTES_PER_TOKEN = 4  # the estimate without a tokenizer: about 4 bytes of English text per token
CONNECT_RETRY_DELAYS = (0.25, 0.5, 1.0)  # seconds before each new attempt after a refused connection
TIMEOUT = aiohttp.ClientTimeout(total=None, connect=60.0, sock_connect=10.0, sock_read=300.0)


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
        raise InvalidRequestError(
            f"Model '{entry.id}' (backend 'openai') takes its upstream key from the "
            f"environment variable {entry.api_key_env}, which is not set. Set it, or "
            "remove api_key_env from the entry if the upstream needs no key."
        )
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


class TokenCounter:
    """Counts the tokens of an answer whose upstream sent no usage (some servers ignore
    ``stream_options.include_usage``): exactly with the entry's ``tokenizer`` (loaded at start, so a wrong one
    is refused there), else estimated at one token per 4 bytes of UTF-8, so such answers are never free."""

    def __init__(self, entry: ModelEntry, cache_dir=None):
        self.tokenizer = None
        if not entry.tokenizer:
            return
        from transformers import AutoTokenizer

        from qubrid_lab.models.loading import tokenizer_location

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_location(entry, cache_dir))
        except (OSError, ValueError) as exc:
            raise InvalidRequestError(
                f"Model '{entry.id}' (backend 'openai') names tokenizer "
                f"'{entry.tokenizer}', which cannot be loaded: {exc}"
            ) from exc

    def text(self, text: str, special_tokens: bool = False) -> int:
        """Tokens in ``text``; with ``special_tokens`` (an embedding input) the ones the tokenizer adds too."""
        if self.tokenizer is None:
            return -(-len(text.encode()) // BYTES_PER_TOKEN)
        return len(self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"])

    def prompt(self, request: GenerationRequest) -> int:
        """The request's prompt tokens: its messages through the chat template, or each prompt once."""
        if request.messages is None:
            return sum(self.text(prompt) if isinstance(prompt, str) else len(prompt) for prompt in request.prompts)
        # the text only: an image's tokens depend on the upstream model's processor
        if self.tokenizer is not None and self.tokenizer.chat_template:
            messages = [{**message, "content": message_text(message)} for message in request.messages]
            return len(
                self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        # no template to render with: each message's role and text
        return sum(self.text(f"{message['role']}\n{message_text(message)}\n") for message in request.messages)


class _Upstream:
    """One catalogue entry's upstream: its pooled client (one per event loop) and error mapping."""

    def __init__(self, entry: ModelEntry, key: str | None = None, cache_dir=None):
        self.entry = entry
        self.counter = TokenCounter(entry, cache_dir)
        self.model_id = entry.id
        self.base_url = entry.base_url.rstrip("/")
        key = key or api_key_of(entry)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}
        self.created = int(time.time())
        self.healthy = True

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            session = self._sessions[loop] = aiohttp.ClientSession(
                headers=self.headers, timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=0)
            )
        return session

    def failure(self, what: str) -> UpstreamError:
        self.healthy = False  # until the upstream next answers (/metrics: qubrid_lab_backend_up)
        return UpstreamError(f"The upstream of model '{self.model_id}' (backend 'openai', {self.base_url}) {what}")

    async def open(self, path: str, body: dict) -> aiohttp.ClientResponse:
        """Send ``body``; a refused connection is retried, any other failure or error status raised mapped."""
        session = self._session()
        for delay in (*CONNECT_RETRY_DELAYS, None):
            try:
                response = await session.post(self.base_url + path, json=body)
                break
            except aiohttp.ClientConnectorError as exc:
                if delay is None:
                    raise self.failure(f"cannot be reached: {exc}") from exc
                await asyncio.sleep(delay)
            except asyncio.TimeoutError as exc:
                raise self.failure(f"did not answer in time ({type(exc).__name__})") from exc
            except aiohttp.ClientError as exc:
                raise self.failure(f"failed: {type(exc).__name__}: {exc}") from exc
        self.healthy = response.status < 500
        if response.status >= 400:
            try:
                text = await response.text(errors="replace")
            except (aiohttp.ClientError, asyncio.TimeoutError):
                text = ""
            response.release()
            raise self._refusal(response.status, text)
        return response

    def _refusal(self, status: int, text: str) -> QubridError:
        try:
            error = json.loads(text).get("error") or {}
        except (ValueError, AttributeError):
            error = {}
        if not isinstance(error, dict):
            error = {"message": str(error)}
        message = error.get("message") or text[:500] or f"HTTP {status}"
        if status in (400, 404, 422):
            return UpstreamRefusal(
                400 if status == 422 else status,
                message,
                param=error.get("param"),
                error_type=error.get("type") or "invalid_request_error",
                code=error.get("code") or ("not_found" if status == 404 else "invalid_request"),
            )
        if status in (401, 403):
            return self.failure(
                f"refused this server's key ({status}: {message}); check the key in "
                f"{self.entry.api_key_env or 'api_key_env (none is set)'}"
            )
        return self.failure(f"answered {status}: {message}")

    def close(self) -> None:
        """Close the pooled connections, each on its own event loop (a closed loop took its sockets along)."""
        sessions, self._sessions = self._sessions, {}
        for loop, session in sessions.items():
            if session.closed or loop.is_closed():
                continue
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                loop.create_task(session.close())
            else:
                asyncio.run_coroutine_threadsafe(session.close(), loop)


async def _lines(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The body's lines as they arrive, of any length (aiohttp's own ``readline`` refuses lines over 64 KiB)."""
    pending = b""
    async for data in response.content.iter_any():
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line
    if pending:
        yield pending


class UpstreamRun(RemoteRun):
    """One request streaming from the upstream; the same interface as :class:`GenerationRun`."""

    def __init__(
        self,
        upstream: _Upstream,
        request: GenerationRequest,
        response: aiohttp.ClientResponse,
        choices: int,
        submitted_at: float,
        runs: set,
    ):
        self.upstream, self.request, self.response, self.choices = upstream, request, response, choices
        self.submitted_at = submitted_at
        self.prompt_tokens = 0
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._runs = runs
        runs.add(self)

    async def events(self) -> AsyncIterator[Event]:
        """Deltas as they arrive; the finishes at the end, when the usage chunk has given the token counts."""
        finishes: list[Finish] = []
        usage, pieces = None, [[] for _ in range(self.choices)]  # each choice's text, for a count of our own
        calls: list[dict[int, dict]] = [{} for _ in range(self.choices)]  # each choice's tool calls, by index
        try:
            async for line in _lines(self.response):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"]
                    yield self._failure(f"failed mid-stream: {error.get('message', error)}")
                    return
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    index, delta = choice["index"], choice.get("delta") or {}
                    own = 0 <= index < self.choices  # a choice this run asked for (others are not counted)
                    text = delta.get("content") or choice.get("text") or ""
                    if delta.get("tool_calls") and own:
                        _gather_calls(calls[index], delta["tool_calls"])
                    logprobs = (
                        _logprobs_of(choice.get("logprobs")) if self.request.params.logprobs is not None else None
                    )
                    self.finished_at = time.perf_counter()
                    if text:
                        self.first_token_at = self.first_token_at or self.finished_at
                        if own:
                            pieces[index].append(text)
                    if choice.get("finish_reason"):
                        gathered = calls[index] if own else {}
                        finishes.append(
                            Finish(
                                index,
                                choice["finish_reason"],
                                text,
                                0,
                                logprobs,
                                tool_calls=[gathered[k] for k in sorted(gathered)] or None,
                            )
                        )
                    elif text or logprobs:
                        yield Delta(index, text, logprobs)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            yield self._failure(f"broke off mid-stream: {type(exc).__name__}: {exc}")
            return
        finally:
            self.cancel()
        if len(finishes) < self.choices:
            yield self._failure(f"ended the stream with {len(finishes)} of {self.choices} choices finished")
            return
        # OpenAI reports usage per request, not per choice: the last finish carries the request's total.
        if usage:
            completion_tokens, self.prompt_tokens = int(usage["completion_tokens"]), int(usage["prompt_tokens"])
            self.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        else:
            counter = self.upstream.counter
            completion_tokens = sum(counter.text("".join(texts)) for texts in pieces)
            self.prompt_tokens = counter.prompt(self.request)
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
            self.response.close()  # drops the connection: the upstream sees the client leave

    def metrics(self, completion_tokens: int) -> dict:
        return run_metrics(self.submitted_at, self.first_token_at, self.finished_at, completion_tokens)


def _gather_calls(calls: dict[int, dict], fragments: list[dict]) -> None:
    """Add a chunk's tool-call fragments (the id and name first, then pieces of the arguments) to ``calls``."""
    for fragment in fragments:
        call = calls.setdefault(
            fragment.get("index", 0), {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        call["id"] = fragment.get("id") or call["id"]
        function = fragment.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""


def _logprobs_of(upstream: dict | None) -> list[TokenLogprob] | None:
    """An upstream chunk's ``logprobs``, chat's (``content``) or text completions' (parallel arrays)."""
    if not upstream:
        return None
    if "content" in upstream:
        return [
            TokenLogprob(
                -1,
                item["token"],
                bytes(item.get("bytes") or item["token"].encode()),
                item["logprob"],
                [
                    (top["token"], bytes(top.get("bytes") or top["token"].encode()), top["logprob"])
                    for top in item.get("top_logprobs") or []
                ],
            )
            for item in upstream["content"] or []
        ]
    return [
        TokenLogprob(-1, token, token.encode(), logprob, [(t, t.encode(), lp) for t, lp in (top or {}).items()])
        for token, logprob, top in zip(
            upstream.get("tokens") or [], upstream.get("token_logprobs") or [], upstream.get("top_logprobs") or []
        )
    ]


class OpenAIUpstreamChat(_Upstream):
    """A chat model served by an OpenAI-compatible upstream: chat and text completions."""

    def __init__(self, entry: ModelEntry, key: str | None = None, cache_dir=None):
        super().__init__(entry, key, cache_dir)
        self._runs: set[UpstreamRun] = set()

    @property
    def active_sequences(self) -> int:
        return sum(run.choices for run in self._runs)

    async def start(self, request: GenerationRequest) -> UpstreamRun:
        params = request.params
        body = {
            "model": self.entry.upstream_model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": request.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
        }
        if params.max_tokens:
            body["max_tokens"] = params.max_tokens
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        if request.echo and any(not isinstance(prompt, str) for prompt in request.prompts or []):
            raise InvalidRequestError(
                f"Model '{self.model_id}' is served by the 'openai' backend, which cannot "
                "echo a prompt sent as token ids; send the prompt as text, or leave echo unset.",
                param="echo",
            )
        if params.echo_logprobs:
            raise InvalidRequestError(
                f"Model '{self.model_id}' is served by the 'openai' backend, which does not "
                "return the prompt's log probabilities: send echo or logprobs, not both.",
                param="echo",
            )
        if request.response_format is not None:
            body["response_format"] = request.response_format
        if request.tools:
            body.update(
                tools=request.tools, tool_choice=request.tool_choice, parallel_tool_calls=request.parallel_tool_calls
            )
        if params.logprobs is not None and request.messages is not None:
            body["logprobs"], body["top_logprobs"] = True, params.logprobs
        elif params.logprobs is not None:
            body["logprobs"] = params.logprobs
        if request.messages is not None:
            path, body["messages"], choices = "/chat/completions", request.messages, request.n
        else:
            path, body["prompt"], choices = "/completions", request.prompts, request.n * len(request.prompts)
        submitted_at = time.perf_counter()
        response = await self.open(path, body)
        return UpstreamRun(self, request, response, choices, submitted_at, self._runs)


class OpenAIUpstreamEmbedding(_Upstream):
    """An embedding model served by an OpenAI-compatible upstream."""

    async def embed(self, inputs: list[str | list[int]]) -> tuple[np.ndarray, int]:
        response = await self.open(
            "/embeddings", {"model": self.entry.upstream_model, "input": inputs, "encoding_format": "float"}
        )
        try:
            body = await response.json(content_type=None)
            rows = sorted(body["data"], key=lambda item: item["index"])
            vectors = np.asarray([row["embedding"] for row in rows], dtype=np.float32)
            usage = body.get("usage") or {}
            tokens = (
                int(usage["prompt_tokens"])
                if "prompt_tokens" in usage
                else sum(
                    self.counter.text(item, special_tokens=True) if isinstance(item, str) else len(item)
                    for item in inputs
                )
            )
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self.failure(f"broke off its embeddings answer: {type(exc).__name__}: {exc}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise self.failure(f"sent an embeddings answer this server cannot read: {exc}") from exc
        return vectors, tokens
