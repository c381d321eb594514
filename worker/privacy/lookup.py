"""Find a job by ID number without decrypting the table: a keyed hash beside the value.

HMAC-SHA256 under its own key (`MACAO_OCR_LOOKUP_KEY`), never a data key: a plain hash of a
Macao ID number (8 characters of a small alphabet) would be reversed by enumeration."""

from __future__ import annotations

import hashlib
import hmac
import re

_SPACES = re.compile(r"[\s]+")


def normalise_id_number(value: str) -> str:
    """One spelling per card number: no spaces, upper case (`1234567(8)` as printed)."""
    return _SPACES.sub("", value).upper()


def id_number_hash(lookup_key: bytes, id_number: str) -> bytes:
    """The 32-byte keyed hash stored beside the encrypted ID number."""
    return hmac.new(lookup_key, normalise_id_number(id_number).encode(), hashlib.sha256).digest()
