"""One host policy (worker.netpolicy) for image URLs and webhook targets: both refuse the same
non-public hosts, literal in any notation or named, each with its own rule names and its own
allowance."""

from __future__ import annotations

import ipaddress

import pytest

from worker.errors import InputError
from worker.netpolicy import UrlPolicy, refused_address, refused_name
from worker.tencent.urls import check_url as check_image_url
from worker.webhooks.urls import check_url as check_webhook_url

NON_PUBLIC = [
    "127.0.0.1",
    "0x7f000001",
    "2130706433",
    "127.1",
    "[::ffff:127.0.0.1]",
    "[2002:7f00:1::]",  # 6to4 around loopback
    "[64:ff9b::a00:5]",  # NAT64 around 10.0.0.5
    "[2001:0:4136:e378:8000:63bf:f7f7:f7f7]",  # Teredo: its prefix is not global
    "10.0.0.5",
    "169.254.169.254",
    "100.100.100.200",
    "100.64.0.1",
    "224.0.0.1",
    "0.0.0.0",
    "240.0.0.1",
    "[fd00:ec2::254]",
    "localhost",
    "localhost.localdomain",
    "cards.localhost",
    "metadata.google.internal",
    "metadata.tencentyun.com",
    "instance-data",
]
PUBLIC = ["93.184.215.14", "[2606:2800:21f:cb07:6820:80da:af6b:8b2c]", "cards.example.com"]


@pytest.mark.parametrize("host", NON_PUBLIC)
def test_both_sides_refuse_a_non_public_host(host: str) -> None:
    with pytest.raises(InputError) as image:
        check_image_url(f"http://{host}/a.jpg", "front")
    assert image.value.rule.endswith("_address")
    # Without resolving: a literal address in any notation is judged as written.
    with pytest.raises(InputError) as hook:
        check_webhook_url(f"https://{host}/hook", allow_private=False, resolve=False)
    assert hook.value.rule == "webhook_url_private"


@pytest.mark.parametrize("host", PUBLIC)
def test_both_sides_pass_a_public_host(host: str) -> None:
    check_image_url(f"http://{host}/a.jpg", "front")
    check_webhook_url(f"https://{host}/hook", allow_private=False, resolve=False)


def test_each_side_keeps_its_own_allowance() -> None:
    ip = ipaddress.ip_address
    # Images (tests only): loopback addresses, never the name localhost nor anything private.
    loopback = UrlPolicy(allow_loopback=True)
    assert refused_address(ip("127.0.0.1"), loopback) is None
    assert refused_address(ip("10.0.0.5"), loopback) == "private_address"
    assert refused_address(ip("169.254.169.254"), loopback) == "metadata_address"
    assert refused_name("localhost", loopback) == "loopback_address"
    # Webhooks (on-premise receivers): anything but unspecified and multicast addresses.
    private = UrlPolicy(allow_private=True)
    assert refused_address(ip("10.0.0.5"), private) is None
    assert refused_address(ip("169.254.169.254"), private) is None
    assert refused_name("localhost", private) is None
    assert refused_address(ip("224.0.0.1"), private) == "multicast_address"
    assert refused_address(ip("::ffff:0.0.0.0"), private) == "unspecified_address"
