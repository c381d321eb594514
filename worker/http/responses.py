"""OpenAPI descriptions of the answers routes share (problems, JSON bodies)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from worker.http.problems import MEDIA_TYPE

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def problem(description: str, *, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "description": description,
        "content": {MEDIA_TYPE: {"schema": PROBLEM_REF}},
    }
    if headers:
        doc["headers"] = headers
    return doc


def body(model: type[BaseModel], description: str, **headers: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": model, "description": description}
    if headers:
        doc["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return doc


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}}
AUTH: dict[int | str, dict[str, Any]] = {
    400: problem("A body that cannot be parsed."),
    401: problem("Missing, unknown or revoked API key."),
    422: problem("The request does not match the schema, or an input rule refused it."),
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: problem("Unknown, or another tenant's.")}
SUBMIT: dict[int | str, dict[str, Any]] = {
    409: problem("Idempotency-Key used with another request, or still in progress."),
    413: problem("Request body over the limit (refused before being read whole)."),
    415: problem("Neither application/json nor multipart/form-data."),
    429: problem("The tenant's backlog is full at the current quota.", headers=RETRY_AFTER),
}
