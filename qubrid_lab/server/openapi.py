"""The OpenAPI document tells the truth: every route lists the errors it sends, in the one error shape.

FastAPI documents a 422 for every route with parameters, which this server never sends (validation errors
are 400 ``invalid_request``), and none of the errors the routes do send. The generated document is
rewritten once here: the 422s and their schemas go, and each operation gets the statuses of
:data:`ROUTE_ERRORS` plus those every API route may send (a missing key, a key over its requests per
minute, an unexpected error). Streaming routes document their ``text/event-stream`` answer too.
The test suite fuzzes the server against this document (schemathesis), so a status sent but not listed fails.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERRORS = {
    400: "The request is invalid: the message names the field and why.",
    401: "The API key is missing, unknown or revoked.",
    402: "The API key's credit is spent.",
    403: "The API key may not do this (admin only).",
    404: "No such model or object, or it belongs to another key.",
    409: "The object's state does not allow this.",
    413: "The body is over the server's limit.",
    429: "The API key is over its requests or tokens per minute; see Retry-After.",
    431: "The request's headers are over the server's limit.",
    500: "The server hit an unexpected error.",
    502: "The model's upstream backend failed or cannot be reached.",
    503: "The model's waiting room is full; see Retry-After.",
    507: "The disk the server stores files on is full.",
}
EVERY_API_ROUTE = (401, 429, 431, 500)
GENERATION = (400, 402, 404, 413, 502, 503)
ROUTE_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/v1/chat/completions"): GENERATION,
    ("post", "/v1/completions"): GENERATION,
    ("post", "/v1/responses"): GENERATION,
    ("post", "/v1/embeddings"): (400, 402, 404, 413, 502),
    ("get", "/v1/models"): (),
    ("get", "/v1/models/{model_id}"): (404,),
    ("get", "/v1/usage"): (400, 403),
    ("get", "/fine-tuning/datasets"): (),
    ("post", "/fine-tuning/datasets"): (400, 413, 507),
    ("get", "/fine-tuning/datasets/{dataset_id}"): (404,),
    ("delete", "/fine-tuning/datasets/{dataset_id}"): (404, 409),
    ("post", "/fine-tuning/jobs"): (400, 402, 413),
    ("get", "/fine-tuning/jobs"): (400,),
    ("get", "/fine-tuning/jobs/{job_id}"): (404,),
    ("post", "/fine-tuning/jobs/{job_id}/cancel"): (404, 409),
    ("get", "/fine-tuning/jobs/{job_id}/events"): (400, 404),
    ("get", "/fine-tuning/jobs/{job_id}/checkpoints"): (404,),
    ("post", "/fine-tuning/jobs/{job_id}/pause"): (404, 409),
    ("post", "/fine-tuning/jobs/{job_id}/resume"): (404, 409),
    ("get", "/fine-tuning/models"): (),
    ("delete", "/fine-tuning/models/{model_id}"): (404,),
    ("post", "/v1/files"): (400, 413, 507),
    ("get", "/v1/files"): (400,),
    ("get", "/v1/files/{file_id}"): (404,),
    ("delete", "/v1/files/{file_id}"): (404, 409),
    ("get", "/v1/files/{file_id}/content"): (404,),
    ("post", "/v1/fine_tuning/jobs"): (400, 402, 413),
    ("get", "/v1/fine_tuning/jobs"): (400,),
    ("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}"): (404,),
    ("post", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel"): (404, 409),
    ("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events"): (400, 404),
    ("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"): (400, 404),
    ("post", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause"): (404, 409),
    ("post", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume"): (404, 409),
}
STREAMING = {"/v1/chat/completions", "/v1/completions", "/v1/responses"}
UNPROTECTED = {"/health"}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code", "param"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": "string"},
                "param": {"type": ["string", "null"]},
            },
        }
    },
}


def _errors_of(method: str, path: str) -> tuple[int, ...]:
    """The route's own errors; fine-tuning routes are listed once for both of their prefixes."""
    for candidate in (path, path.removeprefix("/api/v1"), path.removeprefix("/v1")):
        if (method, candidate) in ROUTE_ERRORS:
            return ROUTE_ERRORS[(method, candidate)]
    raise KeyError(f"{method.upper()} {path} has no entry in ROUTE_ERRORS (qubrid_lab/server/openapi.py)")


def document_errors(app: FastAPI) -> None:
    """Replace ``app.openapi`` with one that documents the real errors (built once, on first use)."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        components["ErrorResponse"] = ERROR_SCHEMA
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for path, item in schema["paths"].items():
            for method, operation in item.items():
                responses = operation["responses"]
                responses.pop("422", None)
                if path in UNPROTECTED:
                    continue
                for status in sorted({*EVERY_API_ROUTE, *_errors_of(method, path)}):
                    responses[str(status)] = {"description": ERRORS[status], "content": error}
                if path in STREAMING:
                    ok = next(code for code in responses if code.startswith("2"))
                    responses[ok].setdefault("content", {})["text/event-stream"] = {
                        "schema": {
                            "type": "string",
                            "description": "Server-sent events: one chunk object per "
                            "'data:' line, then 'data: [DONE]'.",
                        }
                    }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
