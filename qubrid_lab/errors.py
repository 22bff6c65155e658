"""Typed errors that carry their HTTP status and the platform's error ``type``/``code``.

Every error the server returns has the one shape of the specs:
``{"error": {"message", "type", "code", "param"}}``.
"""

from __future__ import annotations


class QubridError(Exception):
    """Base of every error a client may see; subclasses fix status, type and code."""

    status_code = 500
    error_type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def to_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "code": self.code, "param": self.param}}


class InvalidRequestError(QubridError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class AuthenticationError(QubridError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class InsufficientFundsError(QubridError):
    status_code = 402
    error_type = "insufficient_funds"
    code = "insufficient_funds"


class PermissionDeniedError(QubridError):
    """The key is valid but may not do this (an admin-only operation)."""

    status_code = 403
    error_type = "permission_error"
    code = "permission_denied"


class ModelNotFoundError(QubridError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model_id: str, known: list[str] | None = None, *, reason: str | None = None):
        message = reason or f"The model '{model_id}' does not exist or is not loaded on this server."
        if known:
            message += " Available models: " + ", ".join(known) + "."
        super().__init__(message, param="model")


class NotFoundError(QubridError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ConflictError(QubridError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class PayloadTooLargeError(QubridError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class HeadersTooLargeError(QubridError):
    status_code = 431
    error_type = "invalid_request_error"
    code = "headers_too_large"


class RateLimitError(QubridError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class InternalError(QubridError):
    status_code = 500
    error_type = "server_error"
    code = "internal_error"


class ServerOverloadedError(QubridError):
    """The model's waiting room is full; sent with a ``Retry-After`` header."""

    status_code = 503
    error_type = "server_error"
    code = "server_overloaded"


class InsufficientStorageError(QubridError):
    """The disk the home is on is full (or this process may write no more)."""

    status_code = 507
    error_type = "server_error"
    code = "insufficient_storage"


class UpstreamError(QubridError):
    status_code = 502
    error_type = "upstream_error"
    code = "upstream_error"


def _field_path(location: tuple) -> str:
    parts = [str(p) for p in location if p not in ("body", "query", "path")]
    path = ""
    for part in parts:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    return path


def _is_union_member(part: object) -> bool:
    """Pydantic adds the tried union member's type to the path ("stop.list[str]"); it is no field name."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part or "(" in part)


def validation_problems(errors: list[dict]) -> list[tuple[str, str]]:
    """Pydantic's errors as (field path, problem) pairs, in its order without repeats, e.g.
    ``("hyperparameters.epochs", "Input should be greater than or equal to 1 (got 0)")``."""
    problems = []
    for error in errors:
        location = tuple(p for p in error.get("loc", ()) if not _is_union_member(p))
        message = error["msg"].removeprefix("Value error, ")
        if "input" in error and error.get("type") != "missing" and not isinstance(error["input"], (dict, list)):
            message += f" (got {error['input']!r})"
        problem = (_field_path(location) or "body", message)
        if problem not in problems:
            problems.append(problem)
    return problems


def describe_validation_errors(errors: list[dict]) -> tuple[str, str | None]:
    """A readable message naming every bad field, and the first field's name for ``param``."""
    for error in errors:
        if error.get("type") == "json_invalid":
            return f"The request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}.", None
    problems = validation_problems(errors)
    message = "; ".join(f"{field}: {problem}" for field, problem in problems)
    return f"Invalid request: {message}.", problems[0][0] if problems else None
