"""URL policy: an image URL must point at a public host, and we must be able to tell.

Tencent downloads a URL image itself, so a URL to a loopback, private, link-local, CGNAT,
multicast, reserved or cloud-metadata address can only fail (or, worse, reach something
of Tencent's): refusing it here costs nothing, sending it costs up to the job's whole
download budget. The same rules guard the worker's own fetch (`worker.tencent.fetch`),
where they are what keeps a user-supplied URL from reaching the operator's network.

Hosts are read the way permissive parsers (glibc `inet_aton`, browsers' WHATWG URL parser,
curl) read them: `2130706433`, `0x7f000001`, `0177.0.0.1` and `127.1` are all 127.0.0.1.
A host that looks numeric but is no address at all is refused rather than guessed at.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import socket
import threading
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import yarl

from worker.errors import InputError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_CHARS: Final = 2048
CGNAT: Final = ipaddress.ip_network("100.64.0.0/10")
NAT64: Final = ipaddress.ip_network("64:ff9b::/96")
# Cloud instance-metadata services. Most sit in ranges refused anyway (link-local, ULA,
# CGNAT); they are named so the refusal says what was being reached.
METADATA_ADDRESSES: Final = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, Oracle, OpenStack, Tencent (also 169.254.0.23)
        "169.254.0.23",
        "169.254.170.2",  # AWS ECS task metadata
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS IPv6
    )
)
METADATA_NAMES: Final = frozenset(
    {"metadata.google.internal", "metadata.tencentyun.com", "metadata", "instance-data"}
)

# A resolver: host name -> the addresses it resolves to (empty: it does not resolve).
Resolver = Callable[[str], list[IPAddress]]


class UrlRefused(InputError):
    """An image URL breaks the URL policy; `rule` names which part."""


@dataclass(frozen=True)
class UrlPolicy:
    """What the URL checks allow. `allow_loopback` is for tests (servers on 127.0.0.1)."""

    allow_loopback: bool = False


PUBLIC_ONLY: Final = UrlPolicy()

# -- numeric hosts


def _parse_ipv4_part(part: str) -> int | None:
    if not part:
        return None
    lowered = part.lower()
    try:
        if lowered.startswith("0x"):
            return int(lowered[2:], 16) if len(lowered) > 2 else 0
        if len(part) > 1 and part.startswith("0"):
            return int(part, 8)
        if part.isdigit() and part.isascii():
            return int(part, 10)
    except ValueError:
        return None
    return None


def _looks_numeric(host: str) -> bool:
    """WHATWG: a host whose last label is a number is an IPv4 address or an error."""
    last = host.rstrip(".").rsplit(".", 1)[-1].lower()
    if not last:
        return False
    if last.startswith("0x"):
        return all(c in "0123456789abcdef" for c in last[2:])
    return last.isascii() and last.isdigit()


def parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """`inet_aton` semantics: 1 to 4 parts, each decimal, octal (leading 0) or hex (0x); the
    last part fills the remaining bytes. None if `host` is not such an address."""
    text = host[:-1] if host.endswith(".") else host
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = [_parse_ipv4_part(p) for p in parts]
    if any(v is None for v in values):
        return None
    nums = [v for v in values if v is not None]
    *head, last = nums
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(nums)):
        return None
    value = 0
    for v in head:
        value = value * 256 + v
    value = value * 256 ** (5 - len(nums)) + last
    return ipaddress.IPv4Address(value)


def parse_ip_host(host: str) -> IPAddress | None:
    """The address a URL host names literally (any IPv4 notation, IPv6 with or without
    brackets and zone), or None for a name."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError:
            return None
    return parse_ipv4(text)


# -- which addresses are refused


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64, compatible)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(int(ip))
    return None


def refused_address(ip: IPAddress, policy: UrlPolicy = PUBLIC_ONLY) -> str | None:
    """The rule an address breaks (`loopback`, `private`, `metadata`...), None if public."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return refused_address(inner, policy)
    if ip in METADATA_ADDRESSES:
        return "metadata_address"
    if ip.is_loopback:
        return None if policy.allow_loopback else "loopback_address"
    checks = (
        ("unspecified_address", ip.is_unspecified),
        ("link_local_address", ip.is_link_local),
        ("multicast_address", ip.is_multicast),
        ("cgnat_address", isinstance(ip, ipaddress.IPv4Address) and ip in CGNAT),
        ("reserved_address", ip.is_reserved),
        ("private_address", ip.is_private),
        # Whatever else IANA lists as not globally reachable (benchmarking, documentation...).
        ("non_public_address", not ip.is_global),
    )
    for rule, hit in checks:
        if hit:
            return rule
    return None


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
    if ip is None and (host.startswith("[") or _looks_numeric(host)):
        raise _refuse("bad_url", side, "has a host that is neither a name nor an IP address")
    if ip is not None:
        rule = refused_address(ip, policy)
        if rule is not None:
            raise _refuse(rule, side, f"points at a non-public address ({rule})")
        return ParsedUrl(parsed, host, ip)
    if host == "localhost" or host.endswith(".localhost"):
        raise _refuse("loopback_address", side, "names localhost")
    if host in METADATA_NAMES:
        raise _refuse("metadata_address", side, "names a cloud metadata service")
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


def addresses_of(texts: Iterable[object]) -> list[IPAddress]:
    """getaddrinfo's sockaddr hosts as addresses (IPv6 zone ids dropped)."""
    found: list[IPAddress] = []
    for text in texts:
        try:
            found.append(ipaddress.ip_address(str(text).split("%", 1)[0]))
        except ValueError:
            continue
    return found


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
