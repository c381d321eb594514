"""The async client for RecognizeMacaoIDCardOCR: validate, sign, send once, translate.

`OcrClient._exchange` is the one boundary where aiohttp/JSON exceptions and Tencent error
envelopes become `worker.errors` classes. One `aiohttp.ClientSession` per worker process is
injected, so connections are pooled and kept alive across calls.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import structlog
import yarl
from pydantic import SecretStr

from worker.errors import AnswerUndecodable, ApiError, ConfigError, TransportError, api_error
from worker.netpolicy import PUBLIC_ONLY, UrlPolicy
from worker.settings import Settings, env_name
from worker.tencent import signing
from worker.tencent.response import parse_response
from worker.tencent.types import OcrRequest, OcrResult
from worker.tencent.validation import Base64Text, build_payload, validate_request

log = structlog.get_logger(__name__)

ACTION: Final = "RecognizeMacaoIDCardOCR"
VERSION: Final = "2018-11-19"
SERVICE: Final = "ocr"
# Exactly what is signed and sent; aiohttp would otherwise send application/octet-stream.
CONTENT_TYPE: Final = "application/json"
LANGUAGES: Final = frozenset({"en-US", "zh-CN"})
REQUEST_CLIENT: Final = "macao-ocr/0.1"
# Tencent's messages are short; a long one is cut so no echoed payload rides along.
MAX_MESSAGE_CHARS: Final = 200
_URL_IN_TEXT = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)


@dataclass(frozen=True)
class ClientConfig:
    """Where and as whom to call. Secrets are SecretStr, so reprs show `**********`."""

    endpoint: str
    host: str
    secret_id: str
    secret_key: SecretStr
    region: str | None = None
    language: str | None = None
    session_token: SecretStr | None = None
    action: str = ACTION
    version: str = VERSION
    service: str = SERVICE
    request_client: str = REQUEST_CLIENT
    # Answers larger than this are refused unread (Transport.ResponseTooLarge).
    max_response_bytes: int = 16 * 1024 * 1024
    # The URL policy the last check before sending applies (loopback only in tests).
    url_policy: UrlPolicy = PUBLIC_ONLY

    @property
    def url(self) -> str:
        """The POST target: the endpoint's root (the signature's canonical URI is `/`)."""
        return self.endpoint + "/"

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientConfig:
        """Build from settings; a missing credential or bad endpoint names its variable."""
        missing = [
            env_name(name)
            for name in ("secret_id", "secret_key")
            if not _secret_value(getattr(settings, name))
        ]
        if missing:
            raise ConfigError(f"missing credentials: set {' and '.join(missing)}")
        language = settings.api_language
        if language is not None and language not in LANGUAGES:
            raise ConfigError(
                f"{env_name('api_language')} must be one of {', '.join(sorted(LANGUAGES))}"
            )
        endpoint, host = _endpoint_and_host(settings.api_endpoint)
        token = _secret_value(settings.session_token)
        return cls(
            endpoint=endpoint,
            host=host,
            secret_id=_secret_value(settings.secret_id),
            secret_key=settings.secret_key or SecretStr(""),
            region=settings.api_region or None,
            language=language,
            session_token=SecretStr(token) if token else None,
            max_response_bytes=settings.max_response_bytes,
            url_policy=UrlPolicy(allow_loopback=settings.url_allow_loopback),
        )


def _secret_value(secret: SecretStr | None) -> str:
    return secret.get_secret_value().strip() if secret is not None else ""


def _endpoint_and_host(endpoint: str) -> tuple[str, str]:
    """Normalised endpoint and the Host header value (with :port only when not default)."""
    variable = env_name("api_endpoint")
    try:
        url = yarl.URL(endpoint)
        host_port = url.host_port_subcomponent
    except ValueError:
        raise ConfigError(f"{variable} is not a valid URL") from None
    if url.scheme not in ("http", "https") or not host_port:
        raise ConfigError(f"{variable} must be http(s)://host[:port]")
    if url.path not in ("", "/") or url.query_string or url.fragment or url.user:
        raise ConfigError(f"{variable} must have no path, query or user info (POST goes to /)")
    return f"{url.scheme}://{host_port}", host_port


def make_session(settings: Settings) -> aiohttp.ClientSession:
    """The per-process session: pooled keep-alive connections and explicit timeouts.

    Call it inside the event loop that will use it, and close it when that loop ends.
    """
    connector = aiohttp.TCPConnector(
        limit=settings.max_connections, limit_per_host=0, keepalive_timeout=30.0
    )
    timeout = aiohttp.ClientTimeout(
        total=settings.total_timeout_s,
        connect=settings.connect_timeout_s,
        sock_connect=settings.connect_timeout_s,
    )
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


def safe_message(message: str) -> str:
    """A Tencent error message fit for logs: URLs removed, length bounded."""
    cleaned = _URL_IN_TEXT.sub("<url>", message)
    if len(cleaned) > MAX_MESSAGE_CHARS:
        cleaned = cleaned[:MAX_MESSAGE_CHARS] + "…"
    return cleaned


def signed_headers(cfg: ClientConfig, body: bytes, timestamp: int) -> dict[str, str]:
    """Every header of the request; the signed ones carry exactly what is sent."""
    sig = signing.sign(
        secret_id=cfg.secret_id,
        secret_key=cfg.secret_key.get_secret_value(),
        service=cfg.service,
        host=cfg.host,
        content_type=CONTENT_TYPE,
        body=body,
        timestamp=timestamp,
    )
    headers = {
        "Authorization": sig.authorization,
        "Content-Type": CONTENT_TYPE,
        "Host": cfg.host,
        "X-TC-Action": cfg.action,
        "X-TC-Version": cfg.version,
        "X-TC-Timestamp": str(timestamp),
        "X-TC-RequestClient": cfg.request_client,
    }
    if cfg.region:
        headers["X-TC-Region"] = cfg.region
    if cfg.session_token is not None:
        headers["X-TC-Token"] = cfg.session_token.get_secret_value()
    if cfg.language:
        headers["X-TC-Language"] = cfg.language
    return headers


def encode_request(request: OcrRequest) -> bytes:
    """Exactly `encode_body(build_payload(request))`, built from bytes: each image's base64 is
    made once and copied once, into the body. Through text, a 7 MB image passed through four
    copies on its way, and a worker starting calls for many large images at once held them
    all (worker.membudget counts the base64 twice: the body and, while it is built, itself)."""
    skeleton = build_payload(request, inline=False)
    images = {
        "ImageBase64": request.front.data if request.front is not None else None,
        "BackImageBase64": request.back.data if request.back is not None else None,
    }
    parts: list[bytes] = []
    for key, value in skeleton.items():
        parts.append(b"," if parts else b"{")
        parts.append(json.dumps(key, ensure_ascii=False).encode("utf-8") + b":")
        if type(value) is Base64Text:
            parts += [b'"', base64.b64encode(images[key] or b""), b'"']
        else:
            parts.append(json.dumps(value, ensure_ascii=False).encode("utf-8"))
    parts.append(b"}")
    return b"".join(parts)


@dataclass
class OcrClient:
    """Calls RecognizeMacaoIDCardOCR. Exactly one HTTP request per `recognize()`."""

    session: aiohttp.ClientSession
    config: ClientConfig
    clock: Callable[[], float] = field(default=time.time, repr=False)

    async def recognize(self, request: OcrRequest) -> OcrResult:
        """Validate (InputError, no call), sign with a fresh timestamp, send, parse.

        Raises `worker.errors.ApiError` subclasses for every failure of the exchange.
        """
        validate_request(request, self.config.url_policy)
        body = encode_request(request)
        response = await self._exchange(body)
        try:
            return parse_response(response)
        except Exception as exc:
            # Answered, so paid for: never a retry. The pipeline keeps the answer.
            raise AnswerUndecodable(type(exc).__name__, response) from None

    async def _exchange(self, body: bytes) -> dict[str, Any]:
        """One signed POST; returns the success `Response` object or raises an ApiError."""
        # Signed here, after any wait the caller did, so the timestamp is always fresh.
        headers = signed_headers(self.config, body, int(self.clock()))
        started = time.monotonic()
        status = 0
        try:
            async with self.session.post(
                self.config.url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                raw = await _read_capped(resp, self.config.max_response_bytes)
            response = _interpret(status, raw)
        except ApiError as exc:
            self._log(exc.code, exc.request_id, started, status)
            raise
        except TimeoutError:
            err = TransportError("Transport.Timeout", "no complete response within the timeout")
            self._log(err.code, None, started, status)
            raise err from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            err = TransportError(
                "Transport.ConnectionError", f"connection failed ({type(exc).__name__})"
            )
            self._log(err.code, None, started, status)
            raise err from None
        except aiohttp.ClientError as exc:
            # What is left is an unreadable HTTP exchange (bad status line, headers, ...).
            err = TransportError(
                "Transport.BadResponse", f"malformed HTTP response ({type(exc).__name__})"
            )
            self._log(err.code, None, started, status)
            raise err from None
        request_id = response.get("RequestId")
        self._log("ok", request_id if isinstance(request_id, str) else None, started, status)
        return response

    def _log(self, outcome: str, request_id: str | None, started: float, status: int) -> None:
        # DEBUG: the worker logs every call once, as `api_call` with its job and attempt; a
        # second INFO line per call cost a busy worker about 4% of its CPU.
        log.debug(
            "ocr.call",
            outcome_code=outcome,
            request_id=request_id,
            http_status=status or None,
            latency_ms=round((time.monotonic() - started) * 1000, 1),
        )


async def _read_capped(resp: aiohttp.ClientResponse, cap_bytes: int) -> bytes:
    """The body, refused (transient) as soon as it is known to exceed `cap_bytes`: by its
    Content-Length before reading, or while reading a chunked one."""
    too_large = TransportError(
        "Transport.ResponseTooLarge",
        f"response body over the {cap_bytes}-byte cap",
        http_status=resp.status,
    )
    length = resp.content_length
    if length is not None and length > cap_bytes:
        raise too_large
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > cap_bytes:
            raise too_large
    return bytes(body)


def _interpret(status: int, raw: bytes) -> dict[str, Any]:
    """Status + body → the success `Response` object, or the matching ApiError raised.

    `Response.Error` is looked for whatever the Content-Type claims.
    """
    if status != 200:
        raise TransportError(f"Transport.HTTP{status}", f"HTTP status {status}", http_status=status)
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise TransportError("Transport.BadResponse", "response body is not JSON") from None
    response = document.get("Response") if isinstance(document, dict) else None
    if not isinstance(response, dict):
        raise TransportError("Transport.BadResponse", "response has no Response object")
    request_id = response.get("RequestId")
    request_id = request_id if isinstance(request_id, str) else None
    error = response.get("Error")
    if error is not None:
        code = error.get("Code") if isinstance(error, dict) else None
        if not isinstance(code, str) or not code:
            raise TransportError(
                "Transport.BadResponse", "Response.Error has no Code", http_status=status
            )
        message = error.get("Message")
        text = safe_message(message) if isinstance(message, str) else ""
        raise api_error(code, text, request_id=request_id)
    return response
