"""URL policy: non-public hosts in any notation, credentials and over-long URLs are refused."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.errors import InputError
from worker.netpolicy import UrlPolicy, parse_ip_host, parse_ipv4, refused_address
from worker.tencent.preflight import Preflight
from worker.tencent.types import ImageInput, OcrRequest
from worker.tencent.urls import check_url

REFUSED = [
    ("http://169.254.169.254/latest/meta-data", "metadata_address"),
    ("http://[fd00:ec2::254]/latest/meta-data", "metadata_address"),
    ("http://100.100.100.200/latest/meta-data", "metadata_address"),
    ("http://metadata.google.internal/computeMetadata/v1/", "metadata_address"),
    ("http://127.0.0.1:6379/", "loopback_address"),
    ("http://10.0.0.5/", "private_address"),
    ("http://192.168.1.1/card.jpg", "private_address"),
    ("http://172.16.0.1/card.jpg", "private_address"),
    ("http://0x7f000001/", "loopback_address"),
    ("http://2130706433/", "loopback_address"),
    ("http://0177.0.0.1/", "loopback_address"),
    ("http://127.1/", "loopback_address"),
    ("http://0x7f.1/", "loopback_address"),
    ("http://%31%32%37.0.0.1/", "loopback_address"),
    ("http://127.0.0.1./", "loopback_address"),
    ("http://[::1]:8080/", "loopback_address"),
    ("http://[::ffff:127.0.0.1]/", "loopback_address"),
    ("http://[::ffff:7f00:1]/", "loopback_address"),
    ("http://[::ffff:a9fe:a9fe]/", "metadata_address"),
    ("http://[2002:7f00:1::]/", "loopback_address"),
    ("http://[64:ff9b::a00:5]/", "private_address"),
    ("http://[fe80::1%25eth0]/", "link_local_address"),
    ("http://169.254.1.1/", "link_local_address"),
    ("http://100.64.0.1/", "cgnat_address"),
    ("http://224.0.0.1/", "multicast_address"),
    ("http://[ff02::1]/", "multicast_address"),
    ("http://0.0.0.0/", "unspecified_address"),
    ("http://0/", "unspecified_address"),
    ("http://[::]/", "unspecified_address"),
    ("http://240.0.0.1/", "reserved_address"),
    ("http://localhost/card.jpg", "loopback_address"),
    ("http://LOCALHOST./card.jpg", "loopback_address"),
    ("http://cards.localhost/card.jpg", "loopback_address"),
    ("http://user:pw@cards.example.com/a.jpg", "url_credentials"),
    ("http://token@cards.example.com/a.jpg", "url_credentials"),
    ("http://cards.example.com:80@10.0.0.1/a.jpg", "url_credentials"),
    ("https://cards.example.com/" + "a" * 5000, "url_too_long"),
    ("http://1.2.3.4.5/", "bad_url"),
    ("http://999.1.1.1/", "bad_url"),
]


@pytest.mark.parametrize(("url", "rule"), REFUSED, ids=[u[:60] for u, _ in REFUSED])
def test_refused_with_the_rule_named(url: str, rule: str) -> None:
    with pytest.raises(InputError) as info:
        check_url(url, "front")
    assert info.value.rule == rule
    assert f"rule {rule}" in info.value.message and "front" in info.value.message
    assert "meta-data" not in info.value.message and "pw" not in info.value.message


@pytest.mark.parametrize(
    "url",
    [
        "https://cards.example.com/a.jpg?X-Sig=abc",
        "http://93.184.215.14/a.jpg",
        "http://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/a.jpg",
        "https://cards.example.com/" + "a" * 2000,
    ],
)
def test_public_urls_pass(url: str) -> None:
    check_url(url, "front")


def test_loopback_allowed_only_by_the_test_setting() -> None:
    allow = UrlPolicy(allow_loopback=True)
    check_url("http://127.0.0.1:8080/a.jpg", "front", allow)
    with pytest.raises(InputError, match="metadata_address"):
        check_url("http://169.254.169.254/", "front", allow)
    with pytest.raises(InputError, match="private_address"):
        check_url("http://10.0.0.5/", "front", allow)


def _preflight(answers: dict[str, list[str]]) -> Preflight:
    def resolve(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return [ipaddress.ip_address(a) for a in answers.get(host, [])]

    return Preflight(resolve=resolve, min_side_px=200)


@pytest.mark.parametrize(
    ("addresses", "rule"),
    [(["127.0.0.1"], "loopback_address"), (["93.184.215.14", "10.1.2.3"], "private_address")],
)
def test_a_name_resolving_to_a_private_address_is_refused(addresses: list[str], rule: str) -> None:
    preflight = _preflight({"evil.example.com": addresses})
    with pytest.raises(InputError) as info:
        preflight.check(OcrRequest(front=ImageInput(url="https://evil.example.com/a.jpg")))
    assert info.value.rule == rule


def test_a_name_that_does_not_resolve_is_accepted() -> None:
    # Tencent resolves it, not us.
    _preflight({}).check(OcrRequest(front=ImageInput(url="https://cards.invalid/a.jpg")))


def test_a_public_name_passes_and_is_resolved_once() -> None:
    seen: list[str] = []

    def resolve(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        seen.append(host)
        return [ipaddress.ip_address("93.184.215.14")]

    preflight = Preflight(resolve=resolve, min_side_px=200)
    for _ in range(3):
        preflight.check(OcrRequest(front=ImageInput(url="https://cards.example.com/a.jpg")))
    assert seen == ["cards.example.com"]


# -- the notation parser against the C library's own inet_aton


_part = st.one_of(
    st.integers(0, 2**32 - 1).map(str),
    st.integers(0, 2**32 - 1).map(lambda n: f"0x{n:x}"),
    st.integers(0, 2**32 - 1).map(lambda n: f"0{n:o}"),
    st.integers(0, 255).map(str),
    st.integers(0, 255).map(lambda n: f"0x{n:X}"),
    st.integers(0, 255).map(lambda n: f"0{n:o}"),
)


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(_part, min_size=1, max_size=4))
def test_parse_ipv4_agrees_with_inet_aton(parts: list[str]) -> None:
    text = ".".join(parts)
    try:
        expected: ipaddress.IPv4Address | None = ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        expected = None
    assert parse_ipv4(text) == expected


@settings(max_examples=300, deadline=None)
@given(value=st.integers(0, 2**32 - 1))
def test_every_notation_of_an_address_is_judged_alike(value: int) -> None:
    ip = ipaddress.IPv4Address(value)
    octets = [int(o) for o in str(ip).split(".")]
    notations = [
        str(ip),
        str(value),
        hex(value),
        "0" + oct(value)[2:],
        ".".join(f"0x{o:x}" for o in octets),
        f"{octets[0]}.{(octets[1] << 16) | (octets[2] << 8) | octets[3]}",
        f"[::ffff:{ip}]",
    ]
    verdict = refused_address(ip)
    for text in notations:
        parsed = parse_ip_host(text)
        assert parsed is not None
        assert refused_address(parsed) == verdict, text
