"""Specimens carry any field (`fields=`) and can be made valid on a given day (`valid_on=`)."""

from __future__ import annotations

import io
from datetime import date, datetime

import pytest
from PIL import Image

from emulator.specimen import make_specimen, read_embedded


def _day(text: str) -> date:
    return datetime.strptime(text, "%d-%m-%Y").date()


def test_fields_are_answered_as_given() -> None:
    spec = make_specimen(11, fields={"ID": "9234567(8)", "Sex": "X", "WarnCardInfos": [-9105]})
    assert (spec.truth["ID"], spec.truth["Sex"], spec.truth["WarnCardInfos"]) == (
        "9234567(8)",
        "X",
        [-9105],
    )
    embedded = read_embedded(Image.open(io.BytesIO(spec.image)))
    assert embedded is not None and embedded.truth["ID"] == "9234567(8)"
    assert (
        make_specimen(11, fields={"ID": "9234567(8)"}).image
        == make_specimen(11, fields={"ID": "9234567(8)"}).image
    )


def test_an_unknown_field_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown field 'Nmae'"):
        make_specimen(1, fields={"Nmae": "x"})


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("day", [date(2026, 1, 1), date(2026, 12, 31), date(2031, 6, 15)])
def test_valid_on_gives_a_card_valid_and_not_expiring_that_day(seed: int, day: date) -> None:
    truth = make_specimen(seed, valid_on=day).truth
    birthday, first, current, validity = (
        _day(truth[k]) for k in ("Birthday", "FirstIssueDate", "CurrentIssueDate", "ValidityPeriod")
    )
    assert birthday <= first <= current <= day
    assert (validity - day).days > 30
    # The holder's age at issue is kept (a 29 February may move by a day).
    plain = make_specimen(seed).truth
    before = _day(plain["CurrentIssueDate"]) - _day(plain["Birthday"])
    assert abs((current - birthday - before).days) <= 1
