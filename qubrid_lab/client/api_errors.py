"""What a client call raises: one typed exception per kind of refusal, carrying the server's own words.

The server answers every error with ``{"error": {"message", "type", "code", "param"}}``; the exception keeps
each of those, the HTTP status and the request id, so a caller can name the field at fault (``param``) or
tell a missing job (``NotFoundError``) from a server that is down (``ServerUnavailableError``).
"""

from __future__ import annotations

import httpx


class QubridLabError(Exception):
    """A call the server refused or could not answer: its ``message``, HTTP ``status`` (None when no answer came),
    the field at fault (``param``), the error ``code`` and ``error_type``, and the server's ``request_id``."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        request_id: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.error_type = error_type
        self.request_id = request_id


class InvalidRequestError(QubridLabError):
    """400 (or 413, 422, 431): the request itself is wrong; ``param`` names the first field at fault."""


class AuthenticationError(QubridLabError):
    """401: no API key, or one the server does not accept."""


class InsufficientCreditsError(QubridLabError):
    """402: the key has spent its credit; nothing was done."""


class PermissionDeniedError(QubridLabError):
    """403: the key is valid but may not do this (an admin-only call)."""


class NotFoundError(QubridLabError):
    """404: no such dataset, job, model or route, or one another key owns."""


class ConflictError(QubridLabError):
    """409: the object is in a state that forbids the call (cancelling a finished job, deleting a dataset in use)."""


class RateLimitError(QubridLabError):
    """429: the key is over its requests or tokens per minute; ``retry_after`` is the server's advice in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **details):
        super().__init__(message, **details)
        self.retry_after = retry_after


class ServerUnavailableError(QubridLabError):
    """The server could not be reached, did not answer in time, or answered 5xx (``status`` None for no answer)."""


_BY_STATUS: dict[int, type[QubridLabError]] = {
    400: InvalidRequestError,
    413: InvalidRequestError,
    422: InvalidRequestError,
    431: InvalidRequestError,
    401: AuthenticationError,
    402: InsufficientCreditsError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    429: RateLimitError,
}


def error_from_response(response: httpx.Response) -> QubridLabError:
    """The typed exception for an error answer; a body without the one error shape keeps its first 300 characters."""
    status = response.status_code
    kind = _BY_STATUS.get(status, ServerUnavailableError if status >= 500 else QubridLabError)
    details = {"status": status, "request_id": response.headers.get("x-request-id")}
    try:
        error = response.json()["error"]
        message = str(error["message"])
        details.update(param=error.get("param"), code=error.get("code"), error_type=error.get("type"))
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {status}: {response.text[:300]}"
    if kind is RateLimitError:
        details["retry_after"] = _seconds(response.headers.get("retry-after"))
    return kind(message, **details)


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
