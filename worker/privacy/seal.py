"""The one place personal data is sealed before SQL and opened after it.

Every write path (producer, worker, replay, HTTP intake) and read path (claim, views, HTTP,
CLI, decisions) goes through a `Sealer`, built once per process from Settings
(`Sealer.from_settings`, which refuses to build without keys) and passed down. Each value is
bound to its table, column and row (`crypto.associated_data`): a value copied elsewhere
does not open. Dates and heights are sealed as their ISO text."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from datetime import date
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

from worker.privacy.crypto import KeyRing, associated_data
from worker.privacy.fields import RESULT_LOOKUP_COLUMNS, RESULT_PERSONAL_COLUMNS
from worker.privacy.lookup import id_number_hash
from worker.tencent.types import OcrResult

if TYPE_CHECKING:
    from models import Result
    from worker.settings import Settings

DATE_COLUMNS: Final = frozenset(
    {"birthday", "first_issue_date", "current_issue_date", "validity_period"}
)
DECIMAL_COLUMNS: Final = frozenset({"height_m"})
# HKDF purpose of the image digest's key (`Sealer.image_digest`).
IMAGE_DIGEST_PURPOSE: Final = b"macao-ocr image digest v1"
# HKDF purpose of the key an HTTP request's digest is made under (`Sealer.request_digest`).
REQUEST_DIGEST_PURPOSE: Final = b"macao-ocr request digest v1"
# A request digest keeps this many bytes of its HMAC: 128 bits tell two requests apart, and
# `<key id>:<base64url>` fits the column (64 characters) with a key id of up to 32.
REQUEST_DIGEST_BYTES: Final = 16
LOOKUP_COLUMN: Final = RESULT_LOOKUP_COLUMNS[0]  # id_number_hash


def _to_text(column: str, value: Any) -> str | None:
    if value is None:
        return None
    if column in DATE_COLUMNS:
        return str(value.isoformat())
    if column in DECIMAL_COLUMNS:
        return f"{value:.2f}"
    return str(value)


def _from_text(column: str, text: str | None) -> Any:
    if text is None:
        return None
    if column in DATE_COLUMNS:
        return date.fromisoformat(text)
    if column in DECIMAL_COLUMNS:
        return Decimal(text)
    return text


class Sealer:
    """Seals and opens the personal columns of one process, under its key ring; computes
    the keyed ID-number hash when a lookup key is configured.

    `lookup_key`: the key new hashes are made under; `lookup_keys`: every key lookups
    search, the current one first (it alone when not given)."""

    def __init__(
        self,
        ring: KeyRing,
        lookup_key: bytes | None = None,
        lookup_keys: Sequence[bytes] = (),
    ) -> None:
        self.ring = ring
        self.lookup_keys = tuple(lookup_keys) or ((lookup_key,) if lookup_key else ())
        self.lookup_key = self.lookup_keys[0] if self.lookup_keys else None
        self._digest_keys: dict[str, bytes] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Sealer:
        """The process's sealer; ConfigError (one line) when no data keys are configured."""
        ring = KeyRing.parse(settings.data_key_ring_text())
        return cls(ring, lookup_keys=settings.lookup_keys_bytes())

    def __repr__(self) -> str:
        return f"Sealer({self.ring!r}, lookup={'on' if self.lookup_key else 'off'})"

    # -- single values

    def seal(self, table: str, column: str, row_id: object, value: bytes) -> bytes:
        """Encrypt one value under the current key, bound to `table.column:row_id`."""
        return self.ring.encrypt(value, associated_data(table, column, row_id))

    def open(self, table: str, column: str, row_id: object, blob: bytes) -> bytes:
        """Decrypt one value sealed for `table.column:row_id` (DecryptError otherwise)."""
        return self.ring.decrypt(bytes(blob), associated_data(table, column, row_id))

    def seal_text(self, table: str, column: str, row_id: object, value: str | None) -> bytes | None:
        """None stays None."""
        return None if value is None else self.seal(table, column, row_id, value.encode())

    def open_text(self, table: str, column: str, row_id: object, blob: bytes | None) -> str | None:
        return None if blob is None else self.open(table, column, row_id, blob).decode()

    # -- the job's URLs, images, portraits, kept answers

    def seal_url(self, job_id: object, column: str, url: str | None) -> bytes | None:
        return self.seal_text("job", column, job_id, url)

    def open_url(self, job_id: object, column: str, blob: bytes | None) -> str | None:
        return self.open_text("job", column, job_id, blob)

    def seal_image(self, image_id: object, data: bytes) -> bytes:
        return self.seal("image", "data", image_id, data)

    def open_image(self, image_id: object, blob: bytes | None) -> bytes | None:
        return None if blob is None else self.open("image", "data", image_id, blob)

    def seal_portrait(self, job_id: object, data: bytes | None) -> bytes | None:
        return None if data is None else self.seal("portrait", "data", job_id, data)

    def open_portrait(self, job_id: object, blob: bytes) -> bytes:
        return self.open("portrait", "data", job_id, blob)

    def seal_answer(self, job_id: object, text: str) -> bytes:
        return self.seal("kept_answer", "response_json", job_id, text.encode())

    def open_answer(self, job_id: object, blob: bytes) -> str:
        return self.open("kept_answer", "response_json", job_id, blob).decode()

    def request_digest(self, text: bytes, key_id: str | None = None) -> str:
        """`<key id>:<HMAC>` of a request's canonical text, under a subkey of the current data
        key (or of `key_id`): what an Idempotency-Key is bound to, stored without a plain
        hash of the request (whose image digests would confirm a known card)."""
        kid = key_id or self.ring.current_id
        cache = f"request:{kid}"
        key = self._digest_keys.get(cache)
        if key is None:
            key = self._digest_keys[cache] = self.ring.derive(REQUEST_DIGEST_PURPOSE, kid)
        mac = hmac.new(key, text, hashlib.sha256).digest()[:REQUEST_DIGEST_BYTES]
        return f"{kid}:{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"

    def request_digest_matches(self, stored: str, text: bytes) -> bool:
        """Whether `stored` (a request digest under any key of the ring) is `text`'s. A
        digest under a key no longer in the ring matches nothing."""
        kid, sep, _ = stored.partition(":")
        if not sep or kid not in self.ring.key_ids:
            return False
        return hmac.compare_digest(stored, self.request_digest(text, kid))

    def image_digest(self, data: bytes) -> str:
        """How the image table finds a tenant's identical image without a plain SHA-256 of a
        person's card (which would confirm a known image): HMAC-SHA256 under a subkey of the
        CURRENT data key (HKDF, `IMAGE_DIGEST_PURPOSE`). `keys rotate` recomputes it with the
        image it re-encrypts."""
        kid = self.ring.current_id
        key = self._digest_keys.get(kid)
        if key is None:
            key = self._digest_keys[kid] = self.ring.derive(IMAGE_DIGEST_PURPOSE, kid)
        return hmac.new(key, data, hashlib.sha256).hexdigest()

    # -- the result's personal fields

    def lookup_hash(self, id_number: str | None) -> bytes | None:
        """`result.id_number_hash`: None without a lookup key or an ID number."""
        if self.lookup_key is None or id_number is None:
            return None
        return id_number_hash(self.lookup_key, id_number)

    def seal_result(self, job_id: object, values: Mapping[str, Any]) -> dict[str, Any]:
        """`values` (column → typed value) with every personal column sealed and the lookup
        hash added; other columns pass as they are."""
        sealed = dict(values)
        for column in RESULT_PERSONAL_COLUMNS:
            if column in sealed:
                sealed[column] = self.seal_text(
                    "result", column, job_id, _to_text(column, sealed[column])
                )
        sealed[LOOKUP_COLUMN] = self.lookup_hash(values.get("id_number"))
        return sealed

    def open_result(self, row: Result) -> OcrResult:
        """A stored result row as the typed OcrResult the views and checks read (its
        warnings, portrait and answer left out)."""
        opened = {
            column: _from_text(
                column, self.open_text("result", column, row.job_id, getattr(row, column))
            )
            for column in RESULT_PERSONAL_COLUMNS
        }
        unreadable = tuple(n for n in (row.unreadable_fields or "").split(",") if n)
        return OcrResult(
            request_id=row.request_id,
            sex=row.sex,
            angle=row.angle,
            resident_type=row.resident_type,
            warning_service_disabled=row.warning_service_disabled,
            unreadable=unreadable,
            **opened,
        )
