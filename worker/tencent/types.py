"""What goes to RecognizeMacaoIDCardOCR and what comes back, as typed values.

Shared by the client, the pipeline, the producer and the tests. reprs of these
classes never print personal data or image bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any

# Stable names for WarnCardInfos codes (reference, WarnCardInfos table).
WARNING_NAMES: dict[int, str] = {
    -9101: "covered",
    -9102: "photocopy",
    -9103: "screen_recapture",
    -9104: "tampered",
    -9107: "glare",
    -9108: "blurry",
}
# Not a card defect: the account has no warning service. Recorded, never stored as a warning.
WARNING_SERVICE_DISABLED = -9109
WARNING_CODES: dict[str, int] = {name: code for code, name in WARNING_NAMES.items()}

PORTRAIT_CONFIG = {"RetImage": "portrait"}


@dataclass(frozen=True)
class ImageInput:
    """One side of the card: a URL Tencent downloads, or the image bytes we send as base64."""

    url: str | None = None
    data: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.url is None) == (self.data is None):
            raise ValueError("an image is either a url or data, exactly one")

    def __repr__(self) -> str:
        if self.url is not None:
            return "ImageInput(url=<redacted>)"
        return f"ImageInput(data=<{len(self.data or b'')} bytes>)"


@dataclass(frozen=True)
class OcrRequest:
    """One RecognizeMacaoIDCardOCR call's inputs."""

    front: ImageInput | None = None
    back: ImageInput | None = None
    portrait: bool = False
    # Raw `Config` keys beyond RetImage; validated before any call.
    extra_config: dict[str, str] | None = None

    def config(self) -> dict[str, str] | None:
        """The `Config` object to send (the client serialises it to a JSON string)."""
        cfg: dict[str, str] = dict(self.extra_config or {})
        if self.portrait:
            cfg.update(PORTRAIT_CONFIG)
        return cfg or None


@dataclass(frozen=True)
class CardWarning:
    code: int
    name: str


@dataclass(frozen=True, repr=False)
class OcrResult:
    """Every response field, typed. `validity_period` is None when the card's text is not a date
    (holders aged 60+); `validity_period_text` always keeps what Tencent returned."""

    request_id: str
    cn_last_name: str | None = None
    en_last_name: str | None = None
    last_name_code: str | None = None
    cn_first_name: str | None = None
    en_first_name: str | None = None
    first_name_code: str | None = None
    id_number: str | None = None
    birthday: date | None = None
    sex: str | None = None
    first_issue_date: date | None = None
    current_issue_date: date | None = None
    validity_period: date | None = None
    validity_period_text: str | None = None
    symbol: str | None = None
    height_m: Decimal | None = None
    angle: float | None = None
    resident_type: str | None = None
    portrait: bytes | None = None
    warnings: tuple[CardWarning, ...] = ()
    warning_service_disabled: bool = False
    # snake_case names of date fields present in the answer but not DD-MM-YYYY dates (their
    # value above is None): the decision's `date_unreadable` check reads them.
    unreadable: tuple[str, ...] = ()
    # The `Response` object this was parsed from, kept with the result until it is stored:
    # if storing fails, it is what `kept_answer` keeps (see worker.store.kept).
    answer: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def validity_not_a_date(self) -> bool:
        """True when ValidityPeriod was given but is not a DD-MM-YYYY date."""
        return self.validity_period is None and bool(self.validity_period_text)

    def __repr__(self) -> str:
        names = ",".join(w.name for w in self.warnings)
        return f"OcrResult(request_id={self.request_id!r}, warnings=[{names}], fields=<redacted>)"
