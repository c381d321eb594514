"""AES-256-GCM over one value, bound to its row and column, under a ring of named keys.

A stored value is an envelope: version byte 1, the key id (length byte + ASCII), a 96-bit
random nonce, then ciphertext and tag. The key id travels with the value so any key of the
ring decrypts it and `keys rotate` finds what is not under the current key. The associated
data names table, column and row, so a value copied to another row or column fails to
decrypt instead of passing as someone else's."""

from __future__ import annotations

import base64
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from worker.errors import ConfigError, MacaoOcrError

VERSION: Final = 1
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class DecryptError(MacaoOcrError):
    """A stored value does not decrypt: unknown key id, wrong row, or altered bytes.

    Never retried. The message names the key id and the column, never the value."""

    kind = "privacy"


def associated_data(table: str, column: str, row_id: object) -> bytes:
    """What a value is bound to: `table.column:row`."""
    return f"{table}.{column}:{row_id}".encode()


@dataclass(frozen=True, slots=True)
class DataKey:
    key_id: str
    key: bytes

    def __repr__(self) -> str:  # the key never reaches a log or a traceback
        return f"DataKey({self.key_id!r})"


def _parse_entry(entry: str, position: int) -> DataKey:
    key_id, sep, encoded = entry.strip().partition(":")
    if not sep or not _KEY_ID.match(key_id):
        raise ConfigError(
            f"data key #{position} is not `<id>:<base64 key>` with an id of 1-32 letters, "
            "digits, `_`, `.` or `-` (run `macao-ocr keys generate` for one)"
        )
    try:
        key = base64.b64decode(encoded.strip(), validate=True)
    except ValueError:
        raise ConfigError(f"data key {key_id!r} is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"data key {key_id!r} is {len(key)} bytes; AES-256 needs {KEY_BYTES}")
    return DataKey(key_id, key)


class KeyRing:
    """The first key encrypts; every key decrypts."""

    def __init__(self, keys: Sequence[DataKey]) -> None:
        if not keys:
            raise ConfigError("the data key ring is empty")
        ids = [k.key_id for k in keys]
        if len(set(ids)) != len(ids):
            raise ConfigError("the data key ring names one key id twice")
        self._keys = {k.key_id: AESGCM(k.key) for k in keys}
        self._raw = {k.key_id: k.key for k in keys}
        self.current_id = ids[0]
        self.key_ids = tuple(ids)

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """`id1:base64key,id2:base64key` (commas or newlines between entries)."""
        entries = [e for e in re.split(r"[,\n]", text) if e.strip()]
        return cls([_parse_entry(e, i + 1) for i, e in enumerate(entries)])

    def __repr__(self) -> str:
        return f"KeyRing(current={self.current_id!r}, ids={self.key_ids!r})"

    def derive(self, purpose: bytes, key_id: str | None = None) -> bytes:
        """A 32-byte subkey of the current key (or of `key_id`'s) for `purpose`
        (HKDF-SHA256): a keyed digest that goes with its key, never the data key itself.
        KeyError for a key id not in the ring."""
        raw = self._raw[key_id or self.current_id]
        return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose).derive(
            raw
        )

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        """Seal `plaintext` under the current key, bound to `aad`."""
        kid = self.current_id.encode()
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._keys[self.current_id].encrypt(nonce, plaintext, aad)
        return bytes((VERSION, len(kid))) + kid + nonce + sealed

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        """Open an envelope sealed by any key of the ring for the same `aad`."""
        kid = key_id_of(blob)
        aead = self._keys.get(kid)
        if aead is None:
            raise DecryptError(f"value is under key {kid!r}, which is not in the ring")
        start = 2 + len(kid)
        nonce = blob[start : start + NONCE_BYTES]
        try:
            return aead.decrypt(nonce, blob[start + NONCE_BYTES :], aad)
        except InvalidTag:
            where = aad.split(b":", 1)[0].decode(errors="replace")
            raise DecryptError(f"value in {where} fails authentication") from None

    def encrypt_text(self, value: str | None, aad: bytes) -> bytes | None:
        """None stays None (a field the card did not show)."""
        return None if value is None else self.encrypt(value.encode(), aad)

    def decrypt_text(self, blob: bytes | None, aad: bytes) -> str | None:
        return None if blob is None else self.decrypt(blob, aad).decode()


def key_id_of(blob: bytes) -> str:
    """The id of the key a value was sealed under."""
    if len(blob) < 2 or blob[0] != VERSION or len(blob) < 2 + blob[1] + NONCE_BYTES + 16:
        raise DecryptError("value is not an encrypted envelope")
    return blob[2 : 2 + blob[1]].decode("ascii", errors="replace")


def generate_lookup_key() -> str:
    """A new MACAO_OCR_LOOKUP_KEY: base64 of 32 random bytes."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def generate_entry(key_id: str | None = None) -> str:
    """A new key-ring entry `<id>:<base64 key>` (`macao-ocr keys generate`)."""
    kid = key_id or f"k{secrets.token_hex(4)}"
    if not _KEY_ID.match(kid):
        raise ConfigError("a key id is 1-32 letters, digits, `_`, `.` or `-`")
    return f"{kid}:{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()}"
