"""The widgets' side of the HTTP API: one small client over a ``LabServer`` (or a base URL and key).

Every call returns the decoded JSON body or raises ``ServerError`` carrying the server's own
``error.message``, so a widget can show it next to the field it concerns instead of a traceback.
"""

from __future__ import annotations

from typing import Any

import httpx

FINISHED_STATUSES = frozenset({"completed", "failed", "cancelled"})


class ServerError(Exception):
    """A request the server refused (``status`` and ``param`` as it sent them) or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param

    @classmethod
    def of(cls, response: httpx.Response) -> ServerError:
        try:
            error = response.json()["error"]
            return cls(error["message"], status=response.status_code, param=error.get("param"))
        except (ValueError, KeyError, TypeError):
            return cls(f"HTTP {response.status_code}: {response.text[:300]}", status=response.status_code)


class LabClient:
    """Plain HTTP and ``openai`` access to one qubrid_lab server.

    ``server`` is a ``LabServer`` (from ``qubrid_lab.start_server``), whose ``http`` and ``client`` are reused,
    or the server's address as a string; ``base_url`` and ``api_key`` name a server started elsewhere.
    """

    def __init__(self, server: Any = None, *, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 120):
        if isinstance(server, str):
            server, base_url = None, server
        if server is not None:
            self.url = server.url
            self.http: httpx.Client = server.http
            self.openai = server.client
            return
        if not base_url:
            raise ValueError("pass a LabServer (qubrid_lab.start_server()) or base_url= (and api_key= if it needs one)")
        from openai import OpenAI

        self.url = base_url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout)
        self.openai = OpenAI(base_url=f"{self.url}/v1", api_key=api_key or "unused", max_retries=0, timeout=timeout)

    def request(self, method: str, path: str, **kwargs) -> Any:
        """``path`` is absolute on the server (``/v1/...``); the JSON body, or None for an empty one."""
        try:
            response = self.http.request(method, f"{self.url}{path}", **kwargs)
        except httpx.HTTPError as exc:
            raise ServerError(f"Cannot reach the server at {self.url}: {exc}") from exc
        if response.status_code >= 400:
            raise ServerError.of(response)
        return response.json() if response.content else None

    def get(self, path: str, **params) -> Any:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, **kwargs) -> Any:
        return self.request("POST", path, **kwargs)

    def datasets(self) -> list[dict]:
        return self.get("/v1/fine-tuning/datasets")["data"]

    def chat_models(self, *, fine_tuned: bool = True) -> list[str]:
        """Ids from ``/v1/models`` that generate text (its ``kind`` extension), fine-tuned ones (``ft:...``)
        unless ``fine_tuned=False``."""
        return [model["id"] for model in self.get("/v1/models")["data"]
                if model["kind"] == "chat" and (fine_tuned or not model["id"].startswith("ft:"))]


def connect(server: Any = None, base_url: str | None = None, api_key: str | None = None) -> LabClient:
    """The client a widget uses; ``server`` may already be a ``LabClient``."""
    if isinstance(server, LabClient):
        return server
    return LabClient(server, base_url=base_url, api_key=api_key)


def error_text(exc: BaseException) -> str:
    """What a widget shows for a failure: the message the server or the library wrote, never a traceback."""
    body = getattr(exc, "body", None)  # openai.APIStatusError: the JSON body, or its "error" member
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    message = getattr(exc, "message", None)
    if isinstance(message, str) and message:
        return message
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
