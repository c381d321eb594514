"""The URL fallback's fetch: download a user's image URL ourselves, safely.

Used only when Tencent could not download a URL (`FailedOperation.DownLoadError`, budget
spent) and `MACAO_OCR_URL_FALLBACK` is on. Every hop's host is resolved by us, checked
against the URL policy, and the connection is pinned to the checked address (a custom
aiohttp resolver answers only it; TLS SNI and Host stay the name), so a name cannot
resolve public for the check and private for the connection. Redirects are followed by
hand, each target checked the same way; the body is capped and read under a timeout.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Final

import aiohttp
import yarl

from worker.errors import InputError
from worker.netpolicy import IPAddress, UrlPolicy, addresses_of, refused_address
from worker.tencent.urls import check_url
from worker.tencent.validation import MAX_IMAGE_BASE64_BYTES

MAX_REDIRECTS: Final = 3
# The largest raw image whose base64 fits the API's 7 MB.
MAX_FETCH_BYTES: Final = MAX_IMAGE_BASE64_BYTES // 4 * 3
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})


class FetchRefused(InputError):
    """Our own fetch of an image URL was refused or failed; `rule` says why."""


class _PinnedResolver(aiohttp.abc.AbstractResolver):
    """Answers one name with the one address we checked, and nothing else."""

    def __init__(self, host: str, ip: IPAddress) -> None:
        self._host = host
        self._ip = ip

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[Any]:
        if host.lower().rstrip(".") != self._host:
            raise OSError(f"unexpected host lookup: {host!r}")
        fam = socket.AF_INET6 if self._ip.version == 6 else socket.AF_INET
        return [
            {
                "hostname": host,
                "host": str(self._ip),
                "port": port,
                "family": fam,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


async def _resolve(host: str, timeout_s: float) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        return []
    return addresses_of(info[4][0] for info in infos)


def _refuse(rule: str, side: str, problem: str) -> FetchRefused:
    # Never the URL: its query string may hold a signed token.
    return FetchRefused(rule, f"URL fallback: {side} image {problem} (rule {rule})")


async def _pin(url: str, side: str, policy: UrlPolicy, timeout_s: float) -> tuple[str, IPAddress]:
    """The URL's host and the one checked address to connect to."""
    try:
        parsed = check_url(url, side, policy)
    except InputError as err:
        raise _refuse(err.rule, side, f"URL refused: {err.message}") from None
    if parsed.ip is not None:
        return parsed.host, parsed.ip
    addresses = await _resolve(parsed.host, timeout_s)
    if not addresses:
        raise _refuse("fetch_unresolved", side, "host does not resolve from here")
    for ip in addresses:
        rule = refused_address(ip, policy)
        if rule is not None:
            raise _refuse(rule, side, f"host resolves to a non-public address ({rule})")
    return parsed.host, addresses[0]


async def _read_capped(response: aiohttp.ClientResponse, side: str, max_bytes: int) -> bytes:
    if response.content_length is not None and response.content_length > max_bytes:
        raise _refuse("fetch_too_large", side, f"is over {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise _refuse("fetch_too_large", side, f"is over {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def fetch_image(
    url: str,
    side: str,
    *,
    policy: UrlPolicy,
    timeout_s: float,
    max_bytes: int = MAX_FETCH_BYTES,
    max_redirects: int = MAX_REDIRECTS,
) -> bytes:
    """The image's bytes (content checks are the caller's: they cost CPU, not I/O).

    Raises FetchRefused naming the rule: a non-public address at any hop, too many
    redirects, a non-200 answer, over `max_bytes`, or no answer within `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _fetch(url, side, policy, timeout_s, max_bytes, max_redirects)
    except TimeoutError:
        raise _refuse("fetch_timeout", side, f"was not fetched within {timeout_s} s") from None
    except aiohttp.ClientError as err:
        raise _refuse(
            "fetch_failed", side, f"could not be fetched ({type(err).__name__})"
        ) from None


async def _fetch(
    url: str, side: str, policy: UrlPolicy, timeout_s: float, max_bytes: int, max_redirects: int
) -> bytes:
    current = url
    for _hop in range(max_redirects + 1):
        host, ip = await _pin(current, side, policy, timeout_s)
        connector = aiohttp.TCPConnector(
            resolver=_PinnedResolver(host, ip), use_dns_cache=False, force_close=True
        )
        # trust_env off: no proxy from the environment may carry the request elsewhere.
        async with (
            aiohttp.ClientSession(connector=connector, trust_env=False) as session,
            session.get(
                current,
                allow_redirects=False,
                headers={"Accept": "image/png, image/jpeg", "Accept-Encoding": "identity"},
            ) as response,
        ):
            if response.status in _REDIRECTS:
                location = response.headers.get("Location")
                if not location:
                    raise _refuse("fetch_failed", side, "redirect has no Location")
                current = str(yarl.URL(current).join(yarl.URL(location)))
                continue
            if response.status != 200:
                raise _refuse("fetch_failed", side, f"answered HTTP {response.status}")
            return await _read_capped(response, side, max_bytes)
    raise _refuse("fetch_redirects", side, f"redirected more than {max_redirects} times")
