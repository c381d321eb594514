"""Our card checks: pure functions of the read fields and the day of reading, no API call.

Each check returns findings `(code, detail)`; a detail names fields and counts, never a value
read from the card (no names, ID numbers or dates of the holder). The codes and their default
effects are in `worker.reason_codes`.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from typing import Final

# Reference §7: smart cards `XNNNNNN(Y)`, older cards `X/NNNNNN/Y`; X is 1, 5 or 7. The check
# digit's algorithm is not public: any digit is accepted.
ID_NUMBER: Final = re.compile(r"[157]\d{6}\(\d\)|[157]/\d{6}/\d")

MAX_AGE_YEARS: Final = 120
# Reference §7: a card issued to a holder aged 60 or more has no expiry date.
NO_EXPIRY_AGE_YEARS: Final = 60

# Sex as the API writes it: the card's letter (en-US) or character (zh-CN), or both ("男 M").
SEX_TOKENS: Final = {
    "M": "M",
    "F": "F",
    "MALE": "M",
    "FEMALE": "F",
    "男": "M",
    "女": "F",
}
# ResidentType in either language: the API's documented English values, and the card's own
# Chinese titles (traditional, as printed, and simplified, as a zh-CN answer may write them).
RESIDENT_TYPES: Final = frozenset(
    {
        "permanent resident identity card",
        "non-permanent resident identity card",
        "永久性居民身份證",
        "非永久性居民身份證",
        "永久性居民身份证",
        "非永久性居民身份证",
    }
)
_RESIDENT_PREFIXES: Final = ("澳門特別行政區", "澳门特别行政区", "澳門", "澳门", "macao ", "macau ")
# Reference §7: place of birth A B C D N, S birth certificate on file, M/F sex.
SYMBOL_LETTERS: Final = frozenset("ABCDNSMF")

DATE_FIELDS: Final = ("birthday", "first_issue_date", "current_issue_date")


# Not frozen: a frozen dataclass sets each field through object.__setattr__, and this is
# built once per succeeded job; nothing mutates it.
@dataclass(slots=True)
class CardFacts:
    """What the checks read: the stored result's fields (either source: the API's answer or a
    stored row), the fields present but unreadable, and whether both sides were the same."""

    id_number: str | None = None
    cn_last_name: str | None = None
    en_last_name: str | None = None
    cn_first_name: str | None = None
    en_first_name: str | None = None
    birthday: date | None = None
    sex: str | None = None
    first_issue_date: date | None = None
    current_issue_date: date | None = None
    validity_period: date | None = None
    validity_period_text: str | None = None
    symbol: str | None = None
    resident_type: str | None = None
    unreadable: tuple[str, ...] = ()
    sides_identical: bool = False

    def __repr__(self) -> str:
        return "CardFacts(<redacted>)"


@dataclass(frozen=True)
class Limits:
    """The checks' settings (MACAO_OCR_EXPIRY_WARNING_DAYS, MACAO_OCR_MIN_AGE)."""

    expiry_warning_days: int = 30
    min_age: int = 0


Finding = tuple[str, str]


def age_on(birthday: date, day: date) -> int:
    """Whole years from `birthday` to `day` (negative if born after it)."""
    years = day.year - birthday.year
    if (day.month, day.day) < (birthday.month, birthday.day):
        years -= 1
    return years


# The API writes few distinct values: a cache keeps the parsing off the per-job path.
@functools.lru_cache(maxsize=512)
def sex_of(text: str | None) -> str | None:
    """ "M" or "F" when every token of Sex agrees on one; None when it is not a known value."""
    if text is None:
        return None
    tokens = [t for t in re.split(r"[\s/|,]+", text.strip().upper()) if t]
    # "男M" written without a space: split a CJK character from a letter.
    tokens = [p for t in tokens for p in (list(t) if t in ("男M", "女F") else [t])]
    sexes = {SEX_TOKENS.get(t) for t in tokens}
    if not tokens or None in sexes or len(sexes) != 1:
        return None
    return sexes.pop()


def field_missing(card: CardFacts, reading_day: date, limits: Limits) -> Iterator[Finding]:
    """The fields a card always carries: a name, the number, birth, sex, issue and validity."""
    missing = []
    if not (card.cn_last_name or card.en_last_name or card.cn_first_name or card.en_first_name):
        missing.append("name")
    for name, value in (
        ("id_number", card.id_number),
        ("sex", card.sex),
        ("resident_type", card.resident_type),
        ("birthday", card.birthday),
        ("first_issue_date", card.first_issue_date),
        ("current_issue_date", card.current_issue_date),
    ):
        # An unreadable date is reported as such, not as missing as well.
        if not value and name not in card.unreadable:
            missing.append(name)
    if not card.validity_period_text and card.validity_period is None:
        missing.append("validity_period")
    if missing:
        yield "field_missing", "missing: " + ", ".join(missing)


def id_number_format(card: CardFacts, reading_day: date, limits: Limits) -> Iterator[Finding]:
    if card.id_number and not ID_NUMBER.fullmatch(card.id_number.strip()):
        yield "id_number_format", "id_number is not XNNNNNN(Y) or X/NNNNNN/Y with X in 1, 5, 7"


def date_unreadable(card: CardFacts, reading_day: date, limits: Limits) -> Iterator[Finding]:
    bad = [name for name in DATE_FIELDS if name in card.unreadable]
    if bad:
        yield "date_unreadable", "not a DD-MM-YYYY date: " + ", ".join(bad)


def dates_out_of_order(card: CardFacts, reading_day: date, limits: Limits) -> Iterator[Finding]:
    """birth <= first issue <= current issue <= validity, comparing the dates that were read;
    and no issue (or birth) after the day of reading."""
    chain = [
        (name, value)
        for name, value in (
            ("birthday", card.birthday),
            ("first_issue_date", card.first_issue_date),
            ("current_issue_date", card.current_issue_date),
            ("validity_period", card.validity_period),
        )
        if value is not None
    ]
    problems = [
        f"{later} before {earlier}"
        for (earlier, a), (later, b) in itertools.pairwise(chain)
        if b < a
    ]
    problems += [
        f"{name} after the day of reading"
        for name in ("first_issue_date", "current_issue_date")
        if (value := getattr(card, name)) is not None and value > reading_day
    ]
    if problems:
        yield "dates_out_of_order", "; ".join(problems)


def validity(card: CardFacts, reading_day: date, limits: Limits) -> Iterator[Finding]:
    if card.validity_period is None:
        return
    days_left = (card.validity_period - reading_day).days
    if days_left < 0:
        yield "card_expired", f"validity ended {-days_left} day(s) before the reading"
    elif limits.expiry_warning_days > 0 and days_left <= limits.expiry_warning_days:
        yield (
            "card_expiring",
            f"validity ends {days_left} day(s) after the reading "
            f"(threshold {limits.expiry_warning_days})",
        )


def age(card: CardFacts, reading_day: date, limits: Limits) -> Iterator[Finding]:
    if card.birthday is None:
        return
    years = age_on(card.birthday, reading_day)
    if card.birthday > reading_day:
        yield "age_impossible", "born after the day of reading"
    elif years > MAX_AGE_YEARS:
        yield "age_impossible", f"older than {MAX_AGE_YEARS} on the day of reading"
    elif years < limits.min_age:
        yield "age_below_minimum", f"younger than the minimum age {limits.min_age}"


def sex_value(card: CardFacts, reading_day: date, limits: Limits) -> Iterator[Finding]:
    if card.sex and sex_of(card.sex) is None:
        yield "sex_value", "sex is not M, F, 男 or 女"


@functools.lru_cache(maxsize=512)
def _resident_type_known(text: str) -> bool:
    value = " ".join(text.strip().lower().replace("\u2010", "-").split())
    for prefix in _RESIDENT_PREFIXES:
        value = value.removeprefix(prefix)
    return value.strip() in RESIDENT_TYPES


def resident_type_value(card: CardFacts, reading_day: date, limits: Limits) -> Iterator[Finding]:
    if card.resident_type and not _resident_type_known(card.resident_type):
        yield "resident_type_value", "resident_type is not a permanent or non-permanent card"


def symbol(card: CardFacts, reading_day: date, limits: Limits) -> Iterator[Finding]:
    if not card.symbol:
        return
    letters = card.symbol.strip().upper()
    if not letters or set(letters) - SYMBOL_LETTERS:
        yield "symbol_format", "symbol has letters outside A B C D N S M F"
        return
    marked = {ch for ch in letters if ch in "MF"}
    sex = sex_of(card.sex)
    if len(marked) > 1 or (marked and sex is not None and marked != {sex}):
        yield "symbol_sex_mismatch", "symbol's M/F letter disagrees with sex"


def no_expiry_under_60(card: CardFacts, reading_day: date, limits: Limits) -> Iterator[Finding]:
    """A ValidityPeriod that is not a date belongs to a holder aged 60+ (reference §7): at
    the current issue when it was read, else on the day of reading."""
    if card.validity_period is not None or not card.validity_period_text or card.birthday is None:
        return
    when = card.current_issue_date or reading_day
    if age_on(card.birthday, when) < NO_EXPIRY_AGE_YEARS:
        yield "no_expiry_under_60", "validity_period is not a date, holder under 60 at issue"


def sides_identical(card: CardFacts, reading_day: date, limits: Limits) -> Iterator[Finding]:
    if card.sides_identical:
        yield "sides_identical", "front and back are the same image"


Check = Callable[[CardFacts, date, Limits], Iterator[Finding]]

# In the order reasons are listed.
CHECKS: Final[tuple[Check, ...]] = (
    field_missing,
    id_number_format,
    date_unreadable,
    dates_out_of_order,
    validity,
    age,
    sex_value,
    resident_type_value,
    symbol,
    no_expiry_under_60,
    sides_identical,
)


def run_checks(card: CardFacts, reading_day: date, limits: Limits) -> list[Finding]:
    """Every finding of every check, in CHECKS order."""
    return [finding for check in CHECKS for finding in check(card, reading_day, limits)]
