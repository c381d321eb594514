"""A successful `Response` object of RecognizeMacaoIDCardOCR → `OcrResult`.

Malformed field values never crash the parse: the field becomes None and a structlog warning
names the field (never its value, which is personal data). Empty strings mean "not read" and
become None. An unknown WarnCardInfos code is kept, named `unknown_<code>` (e.g.
`unknown_-9105`), so a new Tencent warning is stored rather than silently dropped.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import structlog

from worker.tencent.types import WARNING_NAMES, WARNING_SERVICE_DISABLED, CardWarning, OcrResult

log = structlog.get_logger(__name__)

DATE_FORMAT = "%d-%m-%Y"
_DATE_FIELDS = {
    "Birthday": "birthday",
    "FirstIssueDate": "first_issue_date",
    "CurrentIssueDate": "current_issue_date",
}
MAX_HEIGHT_M = Decimal(10)


def warning_name(code: int) -> str:
    """The stable name of a WarnCardInfos code; unknown codes keep their number."""
    return WARNING_NAMES.get(code, f"unknown_{code}")


def parse_date(text: str) -> date:
    """A DD-MM-YYYY date as the API writes it."""
    return datetime.strptime(text.strip(), DATE_FORMAT).date()


def _unreadable_date(value: object) -> bool:
    """Present (not None or empty) but not a DD-MM-YYYY date."""
    if value is None or value == "":
        return False
    if not isinstance(value, str):
        return True
    try:
        parse_date(value)
    except ValueError:
        return True
    return False


def _malformed(field: str, request_id: str) -> None:
    log.warning("ocr.response.malformed_field", field=field, request_id=request_id)


def _text(resp: Mapping[str, Any], field: str, request_id: str) -> str | None:
    value = resp.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        _malformed(field, request_id)
        return None
    return value


def _date(resp: Mapping[str, Any], field: str, request_id: str) -> date | None:
    text = _text(resp, field, request_id)
    if text is None:
        return None
    try:
        return parse_date(text)
    except ValueError:
        _malformed(field, request_id)
        return None


def _height(resp: Mapping[str, Any], request_id: str) -> Decimal | None:
    value = resp.get("Height")
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        _malformed("Height", request_id)
        return None
    text = str(value).strip().removesuffix("m").strip()
    try:
        height = Decimal(text)
    except InvalidOperation:
        _malformed("Height", request_id)
        return None
    # Metres: anything from 10 m up is no reading (and would not fit its column).
    if not height.is_finite() or height <= 0 or height >= MAX_HEIGHT_M:
        _malformed("Height", request_id)
        return None
    return height


def _angle(resp: Mapping[str, Any], request_id: str) -> float | None:
    value = resp.get("Angle")
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        _malformed("Angle", request_id)
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        _malformed("Angle", request_id)
        return None


def _portrait(resp: Mapping[str, Any], request_id: str) -> bytes | None:
    text = _text(resp, "RetImage", request_id)
    if text is None:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        _malformed("RetImage", request_id)
        return None


def _warnings(resp: Mapping[str, Any], request_id: str) -> tuple[tuple[CardWarning, ...], bool]:
    raw = resp.get("WarnCardInfos")
    if raw is None:
        return (), False
    if not isinstance(raw, list):
        _malformed("WarnCardInfos", request_id)
        return (), False
    warnings: list[CardWarning] = []
    disabled = False
    for item in raw:
        try:
            code = int(item)
        except (TypeError, ValueError):
            _malformed("WarnCardInfos", request_id)
            continue
        if code == WARNING_SERVICE_DISABLED:
            # An account condition, not a defect of this card.
            disabled = True
        elif all(w.code != code for w in warnings):
            warnings.append(CardWarning(code, warning_name(code)))
    return tuple(warnings), disabled


def parse_response(resp: Mapping[str, Any]) -> OcrResult:
    """Every field of a success `Response` object, typed (the caller has ruled out `Error`)."""
    raw_id = resp.get("RequestId")
    if not isinstance(raw_id, str):
        _malformed("RequestId", "")
    request_id: str = raw_id if isinstance(raw_id, str) else ""

    def text(field: str) -> str | None:
        return _text(resp, field, request_id)

    def day(field: str) -> date | None:
        return _date(resp, field, request_id)

    validity_text = _text(resp, "ValidityPeriod", request_id)
    validity: date | None = None
    if validity_text is not None:
        try:
            validity = parse_date(validity_text)
        except ValueError:
            # Holders aged 60+ have no expiry: the text (e.g. 永久有效) is the value.
            validity = None
    warnings, disabled = _warnings(resp, request_id)
    unreadable = tuple(
        name for api_name, name in _DATE_FIELDS.items() if _unreadable_date(resp.get(api_name))
    )
    return OcrResult(
        request_id=request_id,
        cn_last_name=text("CnLastName"),
        en_last_name=text("EnLastName"),
        last_name_code=text("LastNameCode"),
        cn_first_name=text("CnFirstName"),
        en_first_name=text("EnFirstName"),
        first_name_code=text("FirstNameCode"),
        id_number=text("ID"),
        birthday=day("Birthday"),
        sex=text("Sex"),
        first_issue_date=day("FirstIssueDate"),
        current_issue_date=day("CurrentIssueDate"),
        validity_period=validity,
        validity_period_text=validity_text,
        symbol=text("Symbol"),
        height_m=_height(resp, request_id),
        angle=_angle(resp, request_id),
        resident_type=text("ResidentType"),
        portrait=_portrait(resp, request_id),
        warnings=warnings,
        warning_service_disabled=disabled,
        unreadable=unreadable,
        answer=resp,
    )
