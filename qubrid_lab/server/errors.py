"""One exception handler per error family, all producing the specs' single error shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qubrid_lab.errors import InternalError, InvalidRequestError, NotFoundError, QubridError

log = logging.getLogger(__name__)


def error_response(error: QubridError) -> JSONResponse:
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=error.headers)


def _field_path(location: tuple) -> str:
    parts = [str(p) for p in location if p not in ("body", "query", "path")]
    path = ""
    for part in parts:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    return path


def _is_union_member(part: object) -> bool:
    """Pydantic adds the tried union member's type to the path ("stop.list[str]"); it is no field name."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part or "(" in part)


def describe_validation_errors(errors: list[dict]) -> tuple[str, str | None]:
    """A readable message naming every bad field, and the first field's name for ``param``."""
    problems, first = [], None
    for error in errors:
        if error.get("type") == "json_invalid":
            return f"The request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}.", None
        location = error.get("loc", ())
        location = tuple(p for p in location if not _is_union_member(p))
        field = _field_path(location) or "body"
        first = first or field
        message = error["msg"].removeprefix("Value error, ")
        if "input" in error and error.get("type") != "missing" and not isinstance(error["input"], (dict, list)):
            message += f" (got {error['input']!r})"
        problem = f"{field}: {message}"
        if problem not in problems:
            problems.append(problem)
    return "Invalid request: " + "; ".join(problems) + ".", first


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(QubridError)
    async def _qubrid(request: Request, exc: QubridError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(list(exc.errors()))
        return error_response(InvalidRequestError(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFoundError(f"No route {request.method} {request.url.path}. See /docs for the API."))
        error = InvalidRequestError(str(exc.detail))
        error.status_code = exc.status_code
        return error_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(InternalError("The server hit an unexpected error; it has been logged."))
