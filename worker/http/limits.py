"""Bodies above the limits are refused (413) before they are read whole: at once when
Content-Length says so, else as soon as the streamed bytes pass the limit.

One job's limit follows from the API's: its request body is at most MAX_BODY_BYTES with both
images inline, so a larger upload cannot make a valid job. A batch has its own setting."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.http.problems import ProblemError, problem_response
from worker.tencent.validation import MAX_BODY_BYTES

# JSON field names, form boundaries and labels around the images.
JOB_BODY_SLACK = 64 * 1024
JOB_BODY_LIMIT = MAX_BODY_BYTES + JOB_BODY_SLACK
BATCHES_PATH = "/v1/batches"


class BodyTooLarge(HTTPException):
    """Raised by the capped receive; FastAPI lets HTTPExceptions through body parsing."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes")
        self.limit = limit


def _too_large(limit: int) -> ProblemError:
    return ProblemError(
        413,
        "body_too_large",
        "Request body too large",
        f"request body over the {limit}-byte limit",
    )


class BodyLimit:
    """ASGI middleware capping request bodies by path."""

    def __init__(self, app: ASGIApp, *, batch_limit: int, job_limit: int = JOB_BODY_LIMIT):
        self.app = app
        self.batch_limit = batch_limit
        self.job_limit = job_limit

    def _limit(self, scope: Scope) -> int:
        return self.batch_limit if scope.get("path") == BATCHES_PATH else self.job_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await problem_response(_too_large(limit))(scope, receive, send)
            return
        received = 0
        started = False

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, capped_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await problem_response(_too_large(limit))(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    headers: Any = scope.get("headers") or []
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
