"""The vocabulary of decisions: outcomes, effects, and every reason code with its default.

Codes are a public contract (stored, filtered on, used as metric labels and policy keys):
never rename one. A warning code is the stable name of a WarnCardInfos value; a check code is
one of ours (`worker.decision.checks`).

A leaf (it imports nothing of ours), so the settings can check MACAO_OCR_WARNING_POLICY
against it (`worker.policy_text`) without reaching up into `worker.decision`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final


class Outcome(enum.StrEnum):
    """A job's decision: onboard, send to a person, or refuse."""

    clear = "clear"
    consider = "consider"
    reject = "reject"


class Effect(enum.StrEnum):
    """What one finding does to the decision under a policy."""

    reject = "reject"
    consider = "consider"
    ignore = "ignore"


class Source(enum.StrEnum):
    """Where a reason comes from: Tencent's WarnCardInfos or one of our card checks."""

    warning = "warning"
    check = "check"


@dataclass(frozen=True)
class CodeInfo:
    """One reason code: where it comes from, what it means, what it does by default."""

    code: str
    source: Source
    default: Effect
    meaning: str


# Any WarnCardInfos code the reference does not list is stored as `unknown_<code>`; the
# policy treats them all under this one key (a new Tencent warning goes to a person).
UNKNOWN_WARNING: Final = "unknown_warning"
UNKNOWN_WARNING_PREFIX: Final = "unknown_"
WARNING_SERVICE_DISABLED: Final = "warning_service_disabled"

_W, _C = Source.warning, Source.check
_R, _K, _I = Effect.reject, Effect.consider, Effect.ignore

CATALOGUE: Final[tuple[CodeInfo, ...]] = (
    CodeInfo("tampered", _W, _R, "-9104: the image was edited (PS)"),
    CodeInfo("photocopy", _W, _R, "-9102: a photocopy, not the card"),
    CodeInfo("screen_recapture", _W, _K, "-9103: photographed from a screen"),
    CodeInfo("covered", _W, _K, "-9101: part of the card is covered"),
    CodeInfo("glare", _W, _K, "-9107: reflection or glare on the card"),
    CodeInfo("blurry", _W, _K, "-9108: the image is blurry"),
    CodeInfo(UNKNOWN_WARNING, _W, _K, "a WarnCardInfos code the reference does not list"),
    CodeInfo(
        WARNING_SERVICE_DISABLED,
        _W,
        _I,
        "-9109: the account has no warning service (not a card defect; no warning was checked)",
    ),
    CodeInfo("field_missing", _C, _K, "a mandatory field was not read"),
    CodeInfo(
        "id_number_format", _C, _K, "ID number not XNNNNNN(Y) or X/NNNNNN/Y with X in 1, 5, 7"
    ),
    CodeInfo("date_unreadable", _C, _K, "a date field was read but is not a DD-MM-YYYY date"),
    CodeInfo(
        "dates_out_of_order",
        _C,
        _K,
        "not birth <= first issue <= current issue <= validity, or issued after the reading",
    ),
    CodeInfo("card_expired", _C, _R, "the validity date is before the day of reading"),
    CodeInfo(
        "card_expiring", _C, _K, "the card expires within MACAO_OCR_EXPIRY_WARNING_DAYS of reading"
    ),
    CodeInfo("age_impossible", _C, _R, "born after the day of reading, or older than 120"),
    CodeInfo("age_below_minimum", _C, _R, "younger than MACAO_OCR_MIN_AGE on the day of reading"),
    CodeInfo("sex_value", _C, _K, "Sex is not a value the API returns (M, F, 男, 女)"),
    CodeInfo("resident_type_value", _C, _K, "ResidentType is not a value the API returns"),
    CodeInfo("symbol_format", _C, _K, "Symbol has letters outside A B C D N S M F"),
    CodeInfo("symbol_sex_mismatch", _C, _K, "Symbol's M/F letter disagrees with Sex"),
    CodeInfo(
        "no_expiry_under_60",
        _C,
        _K,
        "ValidityPeriod is not a date but the holder was under 60 when the card was issued",
    ),
    CodeInfo("sides_identical", _C, _K, "the same image was sent as front and back"),
)

BY_CODE: Final[dict[str, CodeInfo]] = {info.code: info for info in CATALOGUE}
DEFAULTS: Final[dict[str, Effect]] = {info.code: info.default for info in CATALOGUE}
CHECK_CODES: Final = tuple(i.code for i in CATALOGUE if i.source is Source.check)
WARNING_POLICY_CODES: Final = tuple(i.code for i in CATALOGUE if i.source is Source.warning)


def policy_key(code: str) -> str:
    """The policy entry that governs a reason code (`unknown_-9105` → `unknown_warning`)."""
    if code not in BY_CODE and code.startswith(UNKNOWN_WARNING_PREFIX):
        return UNKNOWN_WARNING
    return code


def is_reason_code(code: str) -> bool:
    """Whether `code` can appear in a job's reasons (for filters: a typo is an error)."""
    if code in BY_CODE:
        return True
    rest = code.removeprefix(UNKNOWN_WARNING_PREFIX)
    return rest != code and rest.lstrip("-").isdigit()
