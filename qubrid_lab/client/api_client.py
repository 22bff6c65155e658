"""``Client``: the platform API of any qubrid_lab server (datasets, jobs, models, usage), over HTTP only.

It needs httpx and nothing heavy: no torch, no widgets, none of the server's modules, so a script, a CLI or a
notebook on another machine can drive a server with it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from datetime import date
from functools import cached_property
from typing import TYPE_CHECKING, Any

import httpx

from qubrid_lab.client.api_errors import ServerUnavailableError, error_from_response
from qubrid_lab.client.datasets_api import Datasets
from qubrid_lab.client.jobs_api import Jobs
from qubrid_lab.client.models_api import Models

if TYPE_CHECKING:
    import openai
    import pandas

DEFAULT_URL = "http://127.0.0.1:8000"  # where `qubrid-lab serve` listens by default
URL_VARIABLE, KEY_VARIABLE = "QUBRID_LAB_URL", "QUBRID_LAB_API_KEY"
CONNECT_SECONDS = 10.0


class Client:
    """Typed calls to a qubrid_lab server: ``datasets``, ``jobs``, ``models``, ``usage()`` and ``compare()``.

    ``base_url`` is the server's address, with or without ``/v1`` (default: ``$QUBRID_LAB_URL``, else
    ``http://127.0.0.1:8000``); ``api_key`` its bearer key (default: ``$QUBRID_LAB_API_KEY``; ``""`` sends none,
    for a server without keys); ``timeout`` the seconds one request may take. Calls return the server's JSON objects as
    dicts, and raise a ``QubridLabError`` subclass carrying the server's message, HTTP status and field.
    ``http`` is the underlying ``httpx.Client`` (base URL and key set) and ``openai`` an ``openai.OpenAI``
    client for the inference routes.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 600.0):
        self.url = (base_url or os.environ.get(URL_VARIABLE) or DEFAULT_URL).rstrip("/").removesuffix("/v1")
        self.api_key = (api_key if api_key is not None else os.environ.get(KEY_VARIABLE)) or None
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_SECONDS))
        )
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)
        self.models = Models(self)

    @property
    def base_url(self) -> str:
        """The OpenAI API root: ``url + "/v1"``."""
        return f"{self.url}/v1"

    @cached_property
    def openai(self) -> openai.OpenAI:
        """An ``openai.OpenAI`` client for this server (created on first use)."""
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=self.api_key or "no-key", timeout=self.timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send ``method path`` (``path`` from the server's root, e.g. ``/v1/models``; ``kwargs`` as httpx takes
        them) and return the decoded JSON answer, or None for an empty one; an error answer raises its type."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnavailableError(
                f"No answer from the server at {self.url}: {type(exc).__name__}: {exc}"
            ) from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        return response.json() if response.content else None

    def usage(
        self,
        start_date: date | str | None = None,
        end_date: date | str | None = None,
        *,
        model: str | None = None,
        key_name: str | None = None,
    ) -> list[dict]:
        """Tokens and cost by UTC day, model and key (rows of ``GET /v1/usage``): this key's own, or with an
        admin key everyone's (``key_name`` picks one key). Days are ``date``s or ``YYYY-MM-DD``, both inclusive."""
        filters = {"start_date": start_date, "end_date": end_date, "model": model, "key_name": key_name}
        params = {name: str(value) for name, value in filters.items() if value is not None}
        return self.request("GET", "/v1/usage", params=params)["data"]

    def compare(
        self, models: Iterable[str] | Mapping[str, str], questions: Iterable[str] | str, **sampling: Any
    ) -> pandas.DataFrame:
        """Every model's answer to every question, greedy unless ``sampling`` says otherwise: a DataFrame with a
        ``question`` column and one column per model (``models``: ids, or column names mapped to ids)."""
        from qubrid_lab.client.compare import compare

        return compare(self, models, questions, **sampling)

    def close(self) -> None:
        """Close the HTTP connections (and the ``openai`` client's, if one was made)."""
        self.http.close()
        openai_client = self.__dict__.pop("openai", None)
        if openai_client is not None:
            openai_client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<qubrid_lab.Client {self.url} {'with' if self.api_key else 'without'} an API key>"
