"""URL policy: an image URL must point at a public host, and we must be able to tell.

Tencent downloads a URL image itself, so a URL to a loopback, private, link-local, CGNAT,
multicast, reserved or cloud-metadata address can only fail (or, worse, reach something
of Tencent's): refusing it here costs nothing, sending it costs up to the job's whole
download budget. The same rules guard the worker's own fetch (`worker.tencent.fetch`),
where they are what keeps a user-supplied URL from reaching the operator's network.

Which hosts are public (every notation of an address, names known to be local) is
`worker.netpolicy`, shared with the webhook targets; this module reads an image URL and
names the broken rule. A host that looks numeric but is no address at all is refused rather
than guessed at.
"""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import unicodedata
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import yarl

from worker.errors import InputError
from worker.netpolicy import (
    MAX_URL_CHARS,
    PUBLIC_ONLY,
    IPAddress,
    UrlPolicy,
    addresses_of,
    looks_numeric,
    parse_ip_host,
    refused_address,
    refused_name,
)

# A resolver: host name -> the addresses it resolves to (empty: it does not resolve).
Resolver = Callable[[str], list[IPAddress]]


class UrlRefused(InputError):
    """An image URL breaks the URL policy; `rule` names which part."""


# -- the URL


@dataclass(frozen=True)
class ParsedUrl:
    """A URL that passed the syntax checks: its host (lower case, no trailing dot) and
    the address it names literally, if it does."""

    url: yarl.URL
    host: str
    ip: IPAddress | None


def _refuse(rule: str, side: str, problem: str) -> UrlRefused:
    # Never the URL itself: its query string may hold a signed token.
    return UrlRefused(rule, f"{side} image URL {problem} (rule {rule})")


def _raw_host(url: str) -> str:
    """The host as written (percent-decoded, NFKC), before any parser normalises it away."""
    netloc = urllib.parse.urlsplit(url).netloc
    host = netloc.rpartition("@")[2]
    if host.startswith("["):
        host = host[: host.find("]") + 1] if "]" in host else host
    else:
        host = host.rpartition(":")[0] if ":" in host else host
    host = urllib.parse.unquote(host)
    return unicodedata.normalize("NFKC", host).lower().rstrip(".")


def check_url(url: str, side: str, policy: UrlPolicy = PUBLIC_ONLY) -> ParsedUrl:
    """Every check that needs no network: length, scheme, host, credentials, and the
    address policy for literal addresses and names known to be local."""
    if len(url) > MAX_URL_CHARS:
        raise _refuse("url_too_long", side, f"is {len(url)} characters, over {MAX_URL_CHARS}")
    try:
        parsed = yarl.URL(url)
        parsed.port  # noqa: B018 -- raises on a non-numeric port
    except (ValueError, UnicodeError):
        raise _refuse("bad_url", side, "is malformed") from None
    if parsed.scheme not in ("http", "https"):
        raise _refuse("bad_url", side, "must use http or https")
    if parsed.user is not None or parsed.password is not None or "@" in parsed.raw_authority:
        raise _refuse("url_credentials", side, "carries credentials (user:password@)")
    try:
        host = _raw_host(url)
    except ValueError:
        raise _refuse("bad_url", side, "is malformed") from None
    if not host or not parsed.host:
        raise _refuse("bad_url", side, "has no host")
    ip = parse_ip_host(host)
    if ip is None and (host.startswith("[") or looks_numeric(host)):
        raise _refuse("bad_url", side, "has a host that is neither a name nor an IP address")
    if ip is not None:
        rule = refused_address(ip, policy)
        if rule is not None:
            raise _refuse(rule, side, f"points at a non-public address ({rule})")
        return ParsedUrl(parsed, host, ip)
    rule = refused_name(host, policy)
    if rule == "loopback_address":
        raise _refuse(rule, side, "names localhost")
    if rule is not None:
        raise _refuse(rule, side, "names a cloud metadata service")
    return ParsedUrl(parsed, host, None)


_POOL: list[concurrent.futures.ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()


def _resolver_pool() -> concurrent.futures.ThreadPoolExecutor:
    # One small pool per process, made on first use: a lookup that outlives its timeout
    # keeps a thread busy, and a pool per submit would leave such threads behind.
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(
                concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="resolve")
            )
        return _POOL[0]


def system_resolver(timeout_s: float) -> Resolver:
    """`socket.getaddrinfo` bounded by `timeout_s` (it has no timeout of its own). A name
    that does not resolve, or not in time, gives no addresses."""

    def resolve(host: str) -> list[IPAddress]:
        future = _resolver_pool().submit(socket.getaddrinfo, host, None, type=socket.SOCK_STREAM)
        try:
            infos = future.result(timeout=timeout_s)
        except (OSError, UnicodeError, concurrent.futures.TimeoutError):
            return []
        return addresses_of(info[4][0] for info in infos)

    return resolve


def check_resolved(
    parsed: ParsedUrl, side: str, resolve: Resolver, policy: UrlPolicy = PUBLIC_ONLY
) -> list[IPAddress]:
    """The name's addresses, refused if ANY is non-public (a name resolving to a mix is
    as good as a private one). A name that does not resolve from here passes: Tencent
    resolves it, not us."""
    if parsed.ip is not None:
        return [parsed.ip]
    addresses = resolve(parsed.host)
    for ip in addresses:
        rule = refused_address(ip, policy)
        if rule is not None:
            problem = f"names a host that resolves to a non-public address ({rule})"
            raise _refuse(rule, side, problem)
    return addresses
