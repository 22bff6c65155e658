"""The widgets' side of the HTTP API: a small view over ``qubrid_lab.Client`` (a ``LabServer``'s, or a new one).

Every call returns the decoded JSON body or raises the client's typed ``QubridLabError`` (``ServerError`` here)
carrying the server's own ``error.message``, so a widget can show it next to the field it concerns instead of a
traceback.
"""

from __future__ import annotations

from typing import Any

from qubrid_lab.client import FINISHED_STATUSES, Client, QubridLabError

__all__ = ["FINISHED_STATUSES", "LabClient", "ServerError", "connect", "error_text"]

ServerError = QubridLabError  # the name the widgets' callers have always caught


class LabClient:
    """The widgets' access to one qubrid_lab server: ``api_client`` (a ``qubrid_lab.Client``), its ``http`` and
    ``openai`` clients, and the two lists the forms fill their menus from.

    ``server`` is a ``LabServer`` (from ``qubrid_lab.start_server``), whose client is reused, or the server's
    address as a string; ``base_url`` and ``api_key`` name a server started elsewhere.
    """

    def __init__(
        self, server: Any = None, *, base_url: str | None = None, api_key: str | None = None, timeout: float = 120
    ):
        if isinstance(server, str):
            server, base_url = None, server
        if server is not None:
            self.api_client: Client = server.api_client
        elif base_url:
            self.api_client = Client(base_url, api_key or "", timeout=timeout)
        else:
            raise ValueError("pass a LabServer (qubrid_lab.start_server()) or base_url= (and api_key= if it needs one)")
        self.url = self.api_client.url
        self.http = self.api_client.http

    @property
    def openai(self):
        """The server's ``openai.OpenAI`` client."""
        return self.api_client.openai

    def request(self, method: str, path: str, **kwargs) -> Any:
        """``path`` is absolute on the server (``/v1/...``); the JSON body, or None for an empty one."""
        return self.api_client.request(method, path, **kwargs)

    def get(self, path: str, **params) -> Any:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, **kwargs) -> Any:
        return self.request("POST", path, **kwargs)

    def datasets(self) -> list[dict]:
        return self.api_client.datasets.list()

    def chat_models(self, *, fine_tuned: bool = True) -> list[str]:
        """Ids from ``/v1/models`` that generate text, fine-tuned ones (``ft:...``) unless ``fine_tuned=False``."""
        return self.api_client.models.chat_ids(fine_tuned=fine_tuned)


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
