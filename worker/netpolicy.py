"""Which hosts we reach: one address policy for image URLs (`worker.tencent.urls`: Tencent's
download and our own fallback fetch) and webhook targets (`worker.webhooks.urls`).

A loopback, private, link-local, CGNAT, multicast, reserved or cloud-metadata address is never
a card image's host nor a tenant's receiver; reaching it is how a user-supplied URL gets into
the operator's network (or Tencent's). Hosts are read the way permissive parsers (glibc
`inet_aton`, browsers' WHATWG URL parser, curl) read them: `2130706433`, `0x7f000001`,
`0177.0.0.1` and `127.1` are all 127.0.0.1; an IPv6 address carrying an IPv4 one (mapped,
6to4, Teredo, NAT64, compatible) is judged by that.

Each side has its own allowance (`UrlPolicy`): images `allow_loopback`
(MACAO_OCR_URL_ALLOW_LOOPBACK, tests only), webhooks `allow_private`
(MACAO_OCR_WEBHOOK_ALLOW_PRIVATE, on-premise receivers). A leaf: it imports nothing of ours,
so both packages may use it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

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
LOCALHOST_NAMES: Final = frozenset({"localhost", "localhost.localdomain"})


@dataclass(frozen=True)
class UrlPolicy:
    """What the host checks allow.

    `allow_loopback`: loopback addresses (tests: servers on 127.0.0.1), never the name
    localhost. `allow_private`: every address but the unspecified and multicast ones, and
    any name (private receivers)."""

    allow_loopback: bool = False
    allow_private: bool = False


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


def looks_numeric(host: str) -> bool:
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


def addresses_of(texts: Iterable[object]) -> list[IPAddress]:
    """getaddrinfo's sockaddr hosts as addresses (IPv6 zone ids dropped)."""
    found: list[IPAddress] = []
    for text in texts:
        try:
            found.append(ipaddress.ip_address(str(text).split("%", 1)[0]))
        except ValueError:
            continue
    return found


# -- which hosts are refused


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
    """The rule an address breaks (`loopback_address`, `private_address`,
    `metadata_address`...), None if the policy allows it."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            rule = refused_address(inner, policy)
            if rule is None and ip.teredo is not None and not policy.allow_private:
                # Teredo's own prefix (2001::/32) is not globally reachable, whatever
                # client address it carries.
                return "non_public_address"
            return rule
    if policy.allow_private:
        # Still never the unspecified or multicast addresses: no receiver lives there.
        if ip.is_unspecified:
            return "unspecified_address"
        return "multicast_address" if ip.is_multicast else None
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


def refused_name(host: str, policy: UrlPolicy = PUBLIC_ONLY) -> str | None:
    """The rule a host name breaks by itself (`loopback_address` for localhost,
    `metadata_address` for a metadata service), None otherwise: what it resolves to is
    `refused_address`'s. `host` is lower case, without a trailing dot."""
    if policy.allow_private:
        return None
    if host in LOCALHOST_NAMES or host.endswith(".localhost"):
        return "loopback_address"
    if host in METADATA_NAMES:
        return "metadata_address"
    return None
