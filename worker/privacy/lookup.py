"""Find a job by ID number without decrypting the table: a keyed hash beside the value.

HMAC-SHA256 under its own key (`MACAO_OCR_LOOKUP_KEY`), never a data key: a plain hash of a
Macao ID number (8 characters of a small alphabet) would be reversed by enumeration.

Keys rotate like data keys: the setting may list several (comma-separated), the first hashes
what is written, every one is searched. A stored hash begins with a 4-byte fingerprint of its
key, so `macao-ocr keys rotate` can find the rows hashed under another key (or under none:
results stored before a lookup key was set) and hash them again. Hashes written before the
fingerprint existed are the bare 32-byte HMAC; lookups still match them."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Final

_SPACES = re.compile(r"[\s]+")
# The fingerprint is an HMAC of a fixed label, not of the key alone: it names the key without
# being a hash of it.
_FINGERPRINT_LABEL: Final = b"macao-ocr lookup key id v1"
FINGERPRINT_BYTES: Final = 4
HASH_BYTES: Final = FINGERPRINT_BYTES + hashlib.sha256().digest_size


def normalise_id_number(value: str) -> str:
    """One spelling per card number: no spaces, upper case (`1234567(8)` as printed)."""
    return _SPACES.sub("", value).upper()


def key_fingerprint(lookup_key: bytes) -> bytes:
    """The 4 bytes every hash under `lookup_key` begins with."""
    return hmac.new(lookup_key, _FINGERPRINT_LABEL, hashlib.sha256).digest()[:FINGERPRINT_BYTES]


def _bare(lookup_key: bytes, id_number: str) -> bytes:
    return hmac.new(lookup_key, normalise_id_number(id_number).encode(), hashlib.sha256).digest()


def id_number_hash(lookup_key: bytes, id_number: str) -> bytes:
    """The keyed hash stored beside the encrypted ID number: fingerprint + HMAC (36 bytes)."""
    return key_fingerprint(lookup_key) + _bare(lookup_key, id_number)


def search_hashes(lookup_keys: Sequence[bytes], id_number: str) -> list[bytes]:
    """Every stored form `id_number` may have under any of `lookup_keys` (with the key's
    fingerprint, and the bare HMAC of hashes written before fingerprints)."""
    forms: list[bytes] = []
    for key in lookup_keys:
        bare = _bare(key, id_number)
        forms += [key_fingerprint(key) + bare, bare]
    return forms
