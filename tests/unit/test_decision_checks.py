"""Every card check of worker.decision.checks, and property-based tests of formats and dates."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.decision.checks import (
    CHECKS,
    ID_NUMBER,
    CardFacts,
    Limits,
    age_on,
    run_checks,
    sex_of,
)
from worker.reason_codes import CHECK_CODES

DAY = date(2026, 12, 3)
LIMITS = Limits()


def good_card(**changes: object) -> CardFacts:
    """A card that passes every check on DAY."""
    card = CardFacts(
        id_number="1234567(8)",
        cn_last_name="陳",
        en_last_name="CHAN",
        cn_first_name="大文",
        en_first_name="TAI MAN",
        birthday=date(1990, 5, 17),
        sex="M",
        first_issue_date=date(2008, 1, 2),
        current_issue_date=date(2020, 3, 4),
        validity_period=date(2030, 3, 4),
        validity_period_text="04-03-2030",
        symbol="ASM",
        resident_type="Permanent Resident Identity Card",
    )
    return replace(card, **changes)  # type: ignore[arg-type]


def codes(card: CardFacts, day: date = DAY, limits: Limits = LIMITS) -> list[str]:
    return [code for code, _ in run_checks(card, day, limits)]


def test_a_good_card_passes_every_check() -> None:
    assert codes(good_card()) == []


# (changes, expected codes): one or more per check code.
CASES: list[tuple[dict[str, object], list[str]]] = [
    ({"id_number": None}, ["field_missing"]),
    ({"sex": None, "resident_type": None}, ["field_missing"]),
    (
        {"cn_last_name": None, "en_last_name": None, "cn_first_name": None, "en_first_name": None},
        ["field_missing"],
    ),
    ({"validity_period": None, "validity_period_text": None}, ["field_missing"]),
    ({"id_number": "9234567(8)"}, ["id_number_format"]),
    ({"id_number": "123456(7)"}, ["id_number_format"]),
    ({"id_number": "1234567"}, ["id_number_format"]),
    ({"birthday": None, "unreadable": ("birthday",)}, ["date_unreadable"]),
    ({"first_issue_date": date(1980, 1, 1)}, ["dates_out_of_order"]),
    ({"current_issue_date": date(2007, 1, 1)}, ["dates_out_of_order"]),
    ({"validity_period": date(2019, 1, 1)}, ["dates_out_of_order", "card_expired"]),
    ({"current_issue_date": DAY + timedelta(days=1)}, ["dates_out_of_order"]),
    ({"validity_period": DAY - timedelta(days=1)}, ["card_expired"]),
    ({"validity_period": DAY + timedelta(days=30)}, ["card_expiring"]),
    ({"birthday": date(1900, 1, 1)}, ["age_impossible"]),
    ({"birthday": DAY + timedelta(days=1)}, ["dates_out_of_order", "age_impossible"]),
    ({"sex": "X"}, ["sex_value"]),
    ({"sex": "男 F"}, ["sex_value"]),
    ({"resident_type": "Tourist"}, ["resident_type_value"]),
    ({"symbol": "AZM"}, ["symbol_format"]),
    ({"symbol": "ASF"}, ["symbol_sex_mismatch"]),
    ({"symbol": "AMF"}, ["symbol_sex_mismatch"]),
    ({"validity_period": None, "validity_period_text": "永久有效"}, ["no_expiry_under_60"]),
    ({"sides_identical": True}, ["sides_identical"]),
]


@pytest.mark.parametrize(("changes", "expected"), CASES)
def test_each_check_trips_on_its_defect(changes: dict[str, object], expected: list[str]) -> None:
    assert codes(good_card(**changes)) == expected


def test_every_check_code_is_tripped_by_some_case() -> None:
    tripped = {c for _, expected in CASES for c in expected}
    tripped |= {"age_below_minimum"}  # needs a limit: below
    assert tripped == set(CHECK_CODES)
    assert len(CHECKS) >= 11


def test_minimum_age_is_a_setting() -> None:
    teen = good_card(birthday=date(2010, 1, 1), first_issue_date=date(2015, 1, 1))
    assert codes(teen) == []
    assert codes(teen, limits=Limits(min_age=18)) == ["age_below_minimum"]


def test_expiry_warning_days_is_a_setting_and_zero_switches_it_off() -> None:
    card = good_card(validity_period=DAY + timedelta(days=45))
    assert codes(card) == []
    assert codes(card, limits=Limits(expiry_warning_days=60)) == ["card_expiring"]
    last_day = good_card(validity_period=DAY)
    assert codes(last_day, limits=Limits(expiry_warning_days=0)) == []
    assert codes(last_day) == ["card_expiring"]  # valid through its last day


def test_no_expiry_text_is_fine_for_a_holder_60_or_older_at_issue() -> None:
    elder = good_card(
        birthday=date(1950, 1, 1),
        first_issue_date=date(1990, 1, 1),
        current_issue_date=date(2015, 6, 1),
        validity_period=None,
        validity_period_text="永久有效",
    )
    assert codes(elder) == []
    # Issued at 59, 60 on the day of reading: the card should carry a date.
    issued_at_59 = replace(elder, current_issue_date=date(2009, 6, 1))
    assert codes(issued_at_59) == ["no_expiry_under_60"]


@pytest.mark.parametrize("value", ["M", "F", "男", "女", "男 M", "女/F", "男M", "Female", " m "])
def test_sex_values_of_either_language(value: str) -> None:
    assert sex_of(value) in ("M", "F")


@pytest.mark.parametrize(
    "value",
    [
        "Permanent Resident Identity Card",
        "Non-permanent Resident Identity Card",
        "non-permanent resident identity card",
        "永久性居民身份證",
        "非永久性居民身份證",
        "澳門特別行政區永久性居民身份證",
        "非永久性居民身份证",
    ],
)
def test_resident_types_of_either_language(value: str) -> None:
    assert codes(good_card(resident_type=value)) == []


def test_details_carry_no_personal_data() -> None:
    card = good_card(
        id_number="9999999(9)",
        validity_period=DAY - timedelta(days=400),
        birthday=date(1899, 2, 3),
        symbol="AF",
    )
    findings = run_checks(card, DAY, LIMITS)
    assert {c for c, _ in findings} >= {"id_number_format", "card_expired", "age_impossible"}
    for _, detail in findings:
        assert "9999999" not in detail
        assert "1899" not in detail and "03-02" not in detail and "1899-02-03" not in detail
        assert str((DAY - timedelta(days=400)).year) not in detail


# -- properties


digit = st.integers(0, 9).map(str)
six = st.text("0123456789", min_size=6, max_size=6)


@given(st.sampled_from("157"), six, digit, st.booleans())
def test_every_macao_number_of_either_layout_is_accepted(
    x: str, body: str, check: str, smart: bool
) -> None:
    number = f"{x}{body}({check})" if smart else f"{x}/{body}/{check}"
    assert ID_NUMBER.fullmatch(number)
    assert codes(good_card(id_number=number)) == []


@given(st.sampled_from("0234689"), six, digit)
def test_a_number_not_starting_1_5_7_is_refused(x: str, body: str, check: str) -> None:
    assert codes(good_card(id_number=f"{x}{body}({check})")) == ["id_number_format"]


@given(st.text(min_size=1, max_size=12))
def test_any_other_text_is_refused_unless_it_is_the_format(text: str) -> None:
    found = codes(good_card(id_number=text))
    assert (found == []) == bool(ID_NUMBER.fullmatch(text.strip()))


dates = st.dates(min_value=date(1900, 1, 1), max_value=date(2100, 12, 31))


@given(st.lists(dates, min_size=4, max_size=4))
def test_dates_in_order_never_trip_the_order_check(four: list[date]) -> None:
    birth, first, current, validity = sorted(four)
    card = good_card(
        birthday=birth, first_issue_date=first, current_issue_date=current, validity_period=validity
    )
    day = max(current, DAY)
    assert "dates_out_of_order" not in codes(card, day=day)


@given(st.lists(dates, min_size=4, max_size=4, unique=True), st.permutations(range(4)))
def test_dates_out_of_order_always_trip_it(four: list[date], order: list[int]) -> None:
    ordered = sorted(four)
    shuffled = [ordered[i] for i in order]
    card = good_card(
        birthday=shuffled[0],
        first_issue_date=shuffled[1],
        current_issue_date=shuffled[2],
        validity_period=shuffled[3],
    )
    day = date(2101, 1, 1)  # nothing issued after the reading
    tripped = "dates_out_of_order" in codes(card, day=day)
    assert tripped == (shuffled != ordered)


@given(dates, dates)
def test_age_on_agrees_with_the_calendar(birthday: date, day: date) -> None:
    years = age_on(birthday, day)
    if day >= birthday:
        assert years >= 0

        # The birthday of year `years` has passed, that of `years + 1` has not.
        def anniversary(n: int) -> date:
            try:
                return birthday.replace(year=birthday.year + n)
            except ValueError:
                return date(birthday.year + n, 3, 1)

        assert anniversary(years) <= day or birthday.year + years > 9999
        if birthday.year + years + 1 <= 9999:
            assert anniversary(years + 1) > day
    else:
        assert years < 0 or (years == 0 and day < birthday)


@given(dates, st.integers(-400, 400))
def test_expired_exactly_when_validity_is_before_the_reading(validity: date, offset: int) -> None:
    try:
        day = validity + timedelta(days=offset)
    except OverflowError:
        return
    card = good_card(
        birthday=None, first_issue_date=None, current_issue_date=None, validity_period=validity
    )
    found = codes(card, day=day)
    assert ("card_expired" in found) == (validity < day)
    assert ("card_expiring" in found) == (0 <= (validity - day).days <= 30)
