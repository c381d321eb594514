"""The HTTP side of a delivery: one POST through aiohttp on the process's event loop.

One session per process (keep-alive to receivers), created on the loop at first use, its
resolver filtered by the URL policy (worker.webhooks.urls). Redirects are not followed and
the response body is never read into anything we keep.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import aiohttp

from worker.errors import InputError, WebhookUrlRefused
from worker.settings import Settings
from worker.webhooks.delivery import SendResult
from worker.webhooks.urls import PolicyResolver, check_url

T = TypeVar("T")

USER_AGENT = "macao-ocr-webhooks/1"


class HttpSender:
    """`send(url, headers, body) -> SendResult`, running the POST on `run`'s event loop."""

    def __init__(
        self, settings: Settings, run: Callable[[Coroutine[Any, Any, SendResult]], SendResult]
    ) -> None:
        self._settings = settings
        self._run = run
        self._session: aiohttp.ClientSession | None = None

    def __call__(self, url: str, headers: Mapping[str, str], body: bytes) -> SendResult:
        return self._run(self._post(url, headers, body))

    def _session_on_loop(self) -> aiohttp.ClientSession:
        # Only ever called on the loop's thread: no lock needed.
        if self._session is None or self._session.closed:
            resolver = PolicyResolver(allow_private=self._settings.webhook_allow_private)
            connector = aiohttp.TCPConnector(resolver=resolver, limit=100)
            self._session = aiohttp.ClientSession(
                connector=connector, headers={"user-agent": USER_AGENT}
            )
        return self._session

    async def _post(self, url: str, headers: Mapping[str, str], body: bytes) -> SendResult:
        started = time.perf_counter()

        def took() -> int:
            return int((time.perf_counter() - started) * 1000)

        try:
            # IP literals never reach the resolver: checked here, names at connect time.
            check_url(url, allow_private=self._settings.webhook_allow_private, resolve=False)
            timeout = aiohttp.ClientTimeout(total=self._settings.webhook_timeout_s)
            session = self._session_on_loop()
            async with session.post(
                url, data=body, headers=dict(headers), timeout=timeout, allow_redirects=False
            ) as resp:
                return SendResult(status_code=resp.status, latency_ms=took())
        except (InputError, WebhookUrlRefused):
            return SendResult(None, took(), error_class="WebhookUrlRefused")
        except TimeoutError:
            return SendResult(None, took(), error_class="Timeout")
        except (aiohttp.ClientError, OSError) as err:
            return SendResult(None, took(), error_class=type(err).__name__)

    async def close(self) -> None:
        """Close the session (on the loop)."""
        if self._session is not None:
            await self._session.close()
