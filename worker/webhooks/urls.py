"""Which webhook URLs we POST to: never loopback, private, link-local, metadata or other
non-public addresses, unless MACAO_OCR_WEBHOOK_ALLOW_PRIVATE=true (tests, on-premise
receivers).

Checked twice: when the URL is set (`check_url`, resolving the host name), and at every
connection (`PolicyResolver`, aiohttp's resolver filtered), so a name that later resolves
to an internal address (DNS rebinding) is refused too: we connect only to addresses that
passed. Redirects are never followed.

Which hosts are public is `worker.netpolicy`, the image URLs' policy too (every notation of
an address, addresses carried inside IPv6 ones, local and metadata names); here is what a
webhook URL may look like and the `webhook_url_*` rules a refusal names.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver

from worker.errors import InputError, WebhookUrlRefused
from worker.netpolicy import (
    MAX_URL_CHARS,
    IPAddress,
    UrlPolicy,
    addresses_of,
    parse_ip_host,
    refused_address,
    refused_name,
)


def address_allowed(address: str, *, allow_private: bool) -> bool:
    """Whether we may connect to this IP address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return refused_address(ip, UrlPolicy(allow_private=allow_private)) is None


def check_url(url: str, *, allow_private: bool, resolve: bool = True) -> str:
    """The URL, if we may send webhooks to it; InputError naming the rule otherwise."""
    if len(url) > MAX_URL_CHARS:
        raise InputError("webhook_url_too_long", f"webhook URL is over {MAX_URL_CHARS} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http"):
        raise InputError("webhook_url_scheme", "webhook URL must start with https:// or http://")
    if parts.username or parts.password:
        raise InputError("webhook_url_credentials", "webhook URL must not carry a user or password")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise InputError("webhook_url_host", "webhook URL has no host")
    try:
        port = parts.port
    except ValueError:
        raise InputError("webhook_url_port", "webhook URL has an invalid port") from None
    policy = UrlPolicy(allow_private=allow_private)
    if refused_name(host, policy) is not None:
        raise InputError("webhook_url_private", f"webhook host {host} is not a public address")
    addresses = _addresses(host, port or (443 if parts.scheme == "https" else 80), resolve)
    for address in addresses:
        if refused_address(address, policy) is not None:
            raise InputError(
                "webhook_url_private",
                f"webhook host {host} resolves to {address}, not a public address "
                "(MACAO_OCR_WEBHOOK_ALLOW_PRIVATE=true allows private receivers)",
            )
    return url


def _addresses(host: str, port: int, resolve: bool) -> list[IPAddress]:
    literal = parse_ip_host(host)
    if literal is not None:
        return [literal]
    if not resolve:
        return []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise InputError(
            "webhook_url_unresolvable", f"webhook host {host} does not resolve"
        ) from None
    return addresses_of(sorted({str(info[4][0]) for info in infos}))


class PolicyResolver(AbstractResolver):
    """aiohttp's resolver, keeping only allowed addresses (none left: WebhookUrlRefused)."""

    def __init__(self, *, allow_private: bool, inner: AbstractResolver | None = None) -> None:
        self._allow_private = allow_private
        self._policy = UrlPolicy(allow_private=allow_private)
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> Any:
        if refused_name(host.rstrip(".").lower(), self._policy) is not None:
            raise WebhookUrlRefused("webhook host is not a public address")
        results = await self._inner.resolve(host, port, family)
        allowed = [
            r for r in results if address_allowed(r["host"], allow_private=self._allow_private)
        ]
        if not allowed:
            raise WebhookUrlRefused("webhook host resolves to no public address")
        return allowed

    async def close(self) -> None:
        await self._inner.close()
