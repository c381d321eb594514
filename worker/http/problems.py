"""RFC 9457 problem details: every error answer is `application/problem+json` with a stable
`type` (a URN) and `code`. Nothing of the request's content (images, URLs, values) is echoed."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.errors import InputError

log = structlog.get_logger(__name__)

MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:macao-ocr:problem:"


class Problem(BaseModel):
    """An error answer (RFC 9457). `code` is stable; branch on it (or on `type`)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    code: str
    detail: str | None = None
    # Pre-flight refusals: the rule that failed (`code` is then `Input.<rule>`).
    rule: str | None = None
    # A refused batch: every bad job, by its index in `jobs` (from 0).
    errors: list[dict[str, Any]] | None = None


class ProblemError(Exception):
    """Raised anywhere in a request: answered as a problem document."""

    def __init__(
        self,
        status: int,
        code: str,
        title: str,
        detail: str | None = None,
        *,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(f"{status} {code}")
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.kind = kind or code
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": TYPE_PREFIX + self.kind,
            "title": self.title,
            "status": self.status,
            "code": self.code,
        }
        if self.detail is not None:
            doc["detail"] = self.detail
        doc.update(self.extra)
        return doc


def problem_response(error: ProblemError) -> JSONResponse:
    return JSONResponse(
        error.body(), status_code=error.status, media_type=MEDIA_TYPE, headers=error.headers
    )


def input_problem(exc: InputError) -> ProblemError:
    """A pre-flight refusal (no API call made): 422 naming the rule."""
    return ProblemError(
        422, exc.code, "Input refused", exc.message, kind="input-rejected", rule=exc.rule
    )


def unauthorized(detail: str) -> ProblemError:
    return ProblemError(
        401, "unauthorized", "Unauthorized", detail, headers={"WWW-Authenticate": "Bearer"}
    )


def not_found(what: str) -> ProblemError:
    """Unknown, or another tenant's: the two are one answer (never 403)."""
    return ProblemError(404, f"{what}_not_found", "Not found", f"no such {what}")


_STATUS_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Location and message only: the input value may be an image or a signed URL.
    return [
        {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", ""))}
        for err in exc.errors()
    ]


def install(app: FastAPI) -> None:
    """Answer every error, ours or the framework's, as a problem document."""

    @app.exception_handler(ProblemError)
    async def _problem(_request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(exc)

    @app.exception_handler(InputError)
    async def _input(_request: Request, exc: InputError) -> JSONResponse:
        return problem_response(input_problem(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(
            ProblemError(
                422,
                "invalid_request",
                "Invalid request",
                "the request does not match the API's schema",
                errors=_validation_errors(exc),
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        detail = exc.detail if isinstance(exc.detail, str) else None
        error = ProblemError(exc.status_code, code, detail or code, headers=dict(exc.headers or {}))
        return problem_response(error)

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> JSONResponse:
        # The type only: an exception's text may carry a URL with a password or a value.
        log.error("http_internal_error", error_type=type(exc).__name__)
        return problem_response(ProblemError(500, "internal_error", "Internal error"))
