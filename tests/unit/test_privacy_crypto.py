"""The envelope: AES-256-GCM bound to row and column, under a ring whose first key seals."""

from __future__ import annotations

import base64

import pytest

from worker.errors import ConfigError
from worker.privacy.crypto import (
    DecryptError,
    KeyRing,
    associated_data,
    generate_entry,
    key_id_of,
)
from worker.privacy.lookup import id_number_hash, key_fingerprint, search_hashes

AAD = associated_data("result", "id_number", "00000000-0000-0000-0000-000000000001")


def test_a_value_opens_under_its_row_and_column_only() -> None:
    ring = KeyRing.parse(generate_entry("k1"))
    blob = ring.encrypt(b"1234567(8)", AAD)
    assert b"1234567" not in blob
    assert ring.decrypt(blob, AAD) == b"1234567(8)"
    for other in (
        associated_data("result", "id_number", "00000000-0000-0000-0000-000000000002"),
        associated_data("result", "en_last_name", "00000000-0000-0000-0000-000000000001"),
    ):
        with pytest.raises(DecryptError) as err:
            ring.decrypt(blob, other)
        assert "1234567" not in str(err.value)


def test_the_first_key_seals_and_every_key_opens() -> None:
    old, new = generate_entry("old"), generate_entry("new")
    sealed_old = KeyRing.parse(old).encrypt(b"v", AAD)
    ring = KeyRing.parse(f"{new},{old}")
    assert key_id_of(sealed_old) == "old"
    assert ring.decrypt(sealed_old, AAD) == b"v"
    assert key_id_of(ring.encrypt(b"v", AAD)) == "new"
    with pytest.raises(DecryptError, match="not in the ring"):
        KeyRing.parse(new).decrypt(sealed_old, AAD)


def test_two_seals_of_one_value_differ() -> None:
    ring = KeyRing.parse(generate_entry())
    assert ring.encrypt(b"v", AAD) != ring.encrypt(b"v", AAD)


def test_altered_bytes_fail_authentication() -> None:
    ring = KeyRing.parse(generate_entry("k"))
    blob = bytearray(ring.encrypt(b"value", AAD))
    blob[-1] ^= 1
    with pytest.raises(DecryptError, match="fails authentication"):
        ring.decrypt(bytes(blob), AAD)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("nocolon", "#1"),
        ("bad id!:" + base64.b64encode(b"x" * 32).decode(), "#1"),
        ("k:not-base64!", "'k'"),
        ("k:" + base64.b64encode(b"short").decode(), "5 bytes"),
        ("", "empty"),
    ],
)
def test_a_bad_ring_says_what_is_wrong_without_the_key(text: str, names: str) -> None:
    with pytest.raises(ConfigError) as err:
        KeyRing.parse(text)
    assert names in str(err.value)


def test_a_ring_never_prints_its_keys() -> None:
    entry = generate_entry("k")
    assert entry.split(":", 1)[1] not in repr(KeyRing.parse(entry))


def test_the_lookup_hash_is_keyed_and_spelling_blind() -> None:
    a = id_number_hash(b"k" * 32, "1234567(8)")
    assert a == id_number_hash(b"k" * 32, " 1234567(8) ")
    assert a != id_number_hash(b"j" * 32, "1234567(8)")
    assert len(a) == 36 and a[:4] == key_fingerprint(b"k" * 32) != key_fingerprint(b"j" * 32)
    # Lookups also match the bare HMAC that releases before the fingerprint stored.
    assert search_hashes([b"k" * 32], "1234567(8)") == [a, a[4:]]
