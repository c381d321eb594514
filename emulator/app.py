"""An aiohttp.web application that answers RecognizeMacaoIDCardOCR like Tencent's endpoint.

Order of checks (each answers Tencent's HTTP-200 error envelope): injected gateway faults,
method + path, Content-Type, action + version, body size, timestamp, signature, per-SecretId
quota, parameters, injected engine faults, recognition. See emulator/README.md.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from emulator import gateway, params
from emulator.config import (
    CONTROL_TOKEN_ENV,
    CONTROL_TOKEN_HEADER,
    EmulatorConfig,
    KnobError,
    Knobs,
    apply_knobs,
)
from emulator.counters import HTTP_502, OK, RESET, Counters
from emulator.envelope import CallError, bad_gateway, error_response, success_response
from emulator.specimen import make_specimen, read_embedded
from worker.tencent.types import WARNING_SERVICE_DISABLED

# Far above the API's 10 MB so that an oversized body gets Tencent's answer, not aiohttp's 413.
CLIENT_MAX_SIZE_BYTES = 64 * 1024 * 1024


@dataclass
class State:
    """Per-app mutable state; one event loop owns it."""

    config: EmulatorConfig
    start_knobs: Knobs
    rng: random.Random
    counters: Counters = field(default_factory=Counters)
    # SecretId → (window second, accepted calls in it)
    quota: dict[str, tuple[int, int]] = field(default_factory=dict)
    session: aiohttp.ClientSession | None = None

    @property
    def knobs(self) -> Knobs:
        return self.config.knobs

    def roll(self, probability: float) -> bool:
        return probability > 0 and self.rng.random() < probability

    def latency_s(self) -> float:
        k = self.knobs
        if k.latency_median_ms <= 0:
            return 0.0
        ms = k.latency_median_ms * math.exp(k.latency_sigma * self.rng.gauss(0.0, 1.0))
        if self.roll(k.latency_tail_prob):
            ms *= k.latency_tail_mult
        return ms / 1000.0

    def admit(self, secret_id: str, now_s: float) -> bool:
        """Fixed 1-second windows per SecretId, measured at the server."""
        second = int(now_s)
        limit = self.knobs.quota_per_s
        window, used = self.quota.get(secret_id, (second, 0))
        if window != second:
            used = 0
        accepted = limit <= 0 or used < limit
        if accepted:
            used += 1
        self.quota[secret_id] = (second, used)
        self.counters.window(second, secret_id, accepted=accepted)
        return accepted


STATE = web.AppKey("emulator_state", State)


def _reset_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()  # drop it: the client sees a reset, never a response


async def _api(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    knobs = state.knobs
    request_id = str(uuid.uuid4())
    if state.roll(knobs.http_502):
        state.counters.outcome(HTTP_502, secret_id=None, image_sha256=None)
        return bad_gateway()
    if state.roll(knobs.reset):
        state.counters.outcome(RESET, secret_id=None, image_sha256=None)
        _reset_connection(request)
        raise asyncio.CancelledError  # aiohttp ends the handler without writing

    secret_id: str | None = None
    image_sha: str | None = None
    delay_s = 0.0
    try:
        gateway.check_method_path(request.method, request.path)
        content_type = request.headers.get("Content-Type")
        gateway.check_content_type(content_type)
        gateway.check_action_version(request.headers)
        body = await request.read()
        gateway.check_body_size(len(body))
        now_s = time.time()
        timestamp = gateway.check_timestamp(
            request.headers.get("X-TC-Timestamp"), now_s, knobs.timestamp_skew_s
        )
        caller = gateway.check_signature(
            authorization=request.headers.get("Authorization"),
            credentials=state.config.credentials,
            host=request.headers.get("Host", ""),
            content_type=content_type or "",
            body=body,
            timestamp=timestamp,
        )
        secret_id = caller.secret_id
        if not state.admit(secret_id, now_s):
            raise CallError(
                "RequestLimitExceeded",
                "Your request frequency has exceeded the limit of "
                f"{knobs.quota_per_s} per second for this action.",
            )
        delay_s = state.latency_s()
        fields = await _recognize(state, params.parse_params(body), request_id)
        image_sha = fields.pop("_sha256")
        code = OK
        response = success_response(fields, request_id, charset=knobs.json_charset)
    except _FrontError as exc:
        image_sha = exc.sha256
        code = exc.error.code
        response = error_response(code, exc.error.message, request_id, charset=knobs.json_charset)
    except CallError as exc:
        code = exc.code
        response = error_response(code, exc.message, request_id, charset=knobs.json_charset)
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    state.counters.outcome(code, secret_id=secret_id, image_sha256=image_sha)
    return response


class _FrontError(Exception):
    """A CallError raised after the front image was read (so its hash is counted)."""

    def __init__(self, error: CallError, sha256: str) -> None:
        super().__init__(error.code)
        self.error = error
        self.sha256 = sha256


async def _recognize(state: State, p: params.Params, request_id: str) -> dict[str, Any]:
    knobs = state.knobs
    assert state.session is not None
    if (p.image_url or p.back_image_url) and state.roll(knobs.url_download_error):
        raise CallError("FailedOperation.DownLoadError", "File download failed.")
    front = await params.obtain(
        state.session,
        p.image_url,
        p.image_base64,
        side="front",
        required=True,
        timeout_s=knobs.download_timeout_s,
    )
    assert front is not None
    try:
        await params.obtain(
            state.session,
            p.back_image_url,
            p.back_image_base64,
            side="back",
            required=False,
            timeout_s=knobs.download_timeout_s,
        )
        if knobs.force_error_code:
            raise CallError(knobs.force_error_code, "Injected by the emulator (force_error_code).")
        if state.roll(knobs.ocr_failed):
            raise CallError("FailedOperation.OcrFailed", "OCR recognition failed.")
        if state.roll(knobs.download_error):
            raise CallError("FailedOperation.DownLoadError", "File download failed.")
        if state.roll(knobs.internal_error):
            raise CallError("InternalError", "An internal error occurred.")
        embedded = read_embedded(front.image)
        if embedded is None:
            raise CallError(
                "FailedOperation.ImageNoSpecifiedCard",
                "No Macao identity card was found in the image.",
            )
    except CallError as exc:
        raise _FrontError(exc, front.sha256) from None
    fields = dict(embedded.truth)
    if knobs.warning_service_disabled:
        fields["WarnCardInfos"] = [WARNING_SERVICE_DISABLED]
    fields["RetImage"] = embedded.portrait_b64 if p.want_portrait and knobs.portrait_enabled else ""
    fields["_sha256"] = front.sha256
    return fields


async def _not_api(request: web.Request) -> web.Response:
    """Anything but POST / gets the gateway's envelope, like the real endpoint."""
    try:
        gateway.check_method_path(request.method, request.path)
    except CallError as exc:
        state = request.app[STATE]
        state.counters.outcome(exc.code, secret_id=None, image_sha256=None)
        return error_response(exc.code, exc.message, str(uuid.uuid4()))
    raise AssertionError("unreachable: POST / is routed to the API handler")


# ---------------------------------------------------------------- control plane

Handler = Callable[[web.Request], Awaitable[web.Response]]


def _guarded(handler: Handler) -> Handler:
    """Only a caller holding the control token may read counters or change knobs: anyone
    else on the network could otherwise make every call fail, or watch the traffic."""

    async def guarded(request: web.Request) -> web.Response:
        token = request.app[STATE].config.control_token
        if not token:
            off = f"control endpoints are off: start the emulator with {CONTROL_TOKEN_ENV}"
            return web.json_response({"error": off}, status=403)
        given = request.headers.get(CONTROL_TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return web.json_response(
                {"error": f"missing or wrong {CONTROL_TOKEN_HEADER} header"}, status=401
            )
        return await handler(request)

    return guarded


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def _counters(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].counters.snapshot())


async def _reset(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.counters = Counters()
    state.quota.clear()
    if request.query.get("knobs", "").lower() in {"1", "true", "yes"}:
        state.config.knobs = state.start_knobs
    return web.json_response({"ok": True, "knobs": state.knobs.public()})


async def _get_config(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].knobs.public())


async def _set_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        changes = await request.json()
        if not isinstance(changes, dict):
            raise KnobError("the body must be a JSON object of knob: value")
        state.config.knobs = apply_knobs(state.knobs, changes)
    except (KnobError, ValueError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(state.knobs.public())


async def _specimen(request: web.Request) -> web.Response:
    """A specimen image over HTTP, for ImageUrl tests: ?seed=&warn=&fmt=png&no_expiry=1."""
    q = request.query
    try:
        spec = make_specimen(
            int(q["seed"]) if "seed" in q else None,
            warnings=q.getall("warn", []),
            fmt=q.get("fmt", "JPEG"),
            no_expiry=q.get("no_expiry", "") in {"1", "true"},
            permanent=q.get("permanent", "1") not in {"0", "false"},
        )
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.Response(body=spec.image, content_type=f"image/{spec.fmt.lower()}")


async def _download_session(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64), trust_env=False)
    yield
    await state.session.close()


def create_app(config: EmulatorConfig) -> web.Application:
    """The emulator as an aiohttp application (serve it with web.run_app or a TestServer)."""
    if not config.credentials:
        raise ValueError("the emulator needs at least one SecretId:SecretKey credential")
    app = web.Application(client_max_size=CLIENT_MAX_SIZE_BYTES)
    app[STATE] = State(config=config, start_knobs=config.knobs, rng=random.Random(config.seed))
    app.cleanup_ctx.append(_download_session)
    app.router.add_get("/__emulator__/health", _health)
    app.router.add_get("/__emulator__/counters", _guarded(_counters))
    app.router.add_post("/__emulator__/reset", _guarded(_reset))
    app.router.add_get("/__emulator__/config", _guarded(_get_config))
    app.router.add_post("/__emulator__/config", _guarded(_set_config))
    app.router.add_get("/__emulator__/specimen", _specimen)
    app.router.add_post("/", _api)
    app.router.add_route("*", "/{tail:.*}", _not_api)
    return app
