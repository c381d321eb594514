"""parse_response: every API field into OcrResult, and malformed values never crash it."""

from __future__ import annotations

import base64
from datetime import date
from decimal import Decimal
from typing import Any

import pytest
import structlog

from worker.tencent.response import parse_response, warning_name
from worker.tencent.types import WARNING_NAMES, CardWarning

PORTRAIT = b"\xff\xd8\xffportrait-jpeg"

FULL: dict[str, Any] = {
    "CnLastName": "陳",
    "EnLastName": "CHAN",
    "LastNameCode": "7115",
    "CnFirstName": "大文",
    "EnFirstName": "TAI MAN",
    "FirstNameCode": "1129 2429",
    "ID": "1234567(8)",
    "Birthday": "05-03-1990",
    "Sex": "M",
    "FirstIssueDate": "01-02-2008",
    "CurrentIssueDate": "15-06-2020",
    "ValidityPeriod": "15-06-2030",
    "Symbol": "ASM",
    "Height": "1.64",
    "RetImage": base64.b64encode(PORTRAIT).decode(),
    "Angle": -1.25,
    "ResidentType": "Permanent Resident Identity Card",
    "WarnCardInfos": [-9101, -9104],
    "RequestId": "0d7c-req",
}


_DROP = object()


def _with(**changes: Any) -> dict[str, Any]:
    resp = dict(FULL)
    for key, value in changes.items():
        if value is _DROP:
            resp.pop(key)
        else:
            resp[key] = value
    return resp


def test_every_field() -> None:
    r = parse_response(FULL)
    assert (r.cn_last_name, r.en_last_name, r.last_name_code) == ("陳", "CHAN", "7115")
    assert (r.cn_first_name, r.en_first_name, r.first_name_code) == ("大文", "TAI MAN", "1129 2429")
    assert r.id_number == "1234567(8)"
    assert r.birthday == date(1990, 3, 5)
    assert r.sex == "M"
    assert r.first_issue_date == date(2008, 2, 1)
    assert r.current_issue_date == date(2020, 6, 15)
    assert r.validity_period == date(2030, 6, 15)
    assert r.validity_period_text == "15-06-2030"
    assert not r.validity_not_a_date
    assert r.symbol == "ASM"
    assert r.height_m == Decimal("1.64") and isinstance(r.height_m, Decimal)
    assert r.angle == -1.25
    assert r.resident_type == "Permanent Resident Identity Card"
    assert r.portrait == PORTRAIT
    assert r.warnings == (CardWarning(-9101, "covered"), CardWarning(-9104, "tampered"))
    assert r.warning_service_disabled is False
    assert r.request_id == "0d7c-req"


def test_repr_has_no_personal_data() -> None:
    text = repr(parse_response(FULL))
    for value in ("CHAN", "1234567", "1990", "陳"):
        assert value not in text


@pytest.mark.parametrize("text", ["永久有效", "PERMANENT", "--"])
def test_validity_not_a_date_kept_as_text(text: str) -> None:
    with structlog.testing.capture_logs() as logs:
        r = parse_response(_with(ValidityPeriod=text))
    assert r.validity_period is None
    assert r.validity_period_text == text
    assert r.validity_not_a_date
    # An expected case, not a malformed field.
    assert logs == []


def test_absent_validity() -> None:
    r = parse_response(_with(ValidityPeriod=_DROP))
    assert r.validity_period is None and r.validity_period_text is None
    assert not r.validity_not_a_date


@pytest.mark.parametrize(
    ("field", "value", "attr"),
    [
        ("Birthday", "31-02-1990", "birthday"),
        ("Birthday", "1990-03-05", "birthday"),
        ("FirstIssueDate", "garbage", "first_issue_date"),
        ("CurrentIssueDate", 20200615, "current_issue_date"),
        ("Height", "tall", "height_m"),
        ("Height", "-1", "height_m"),
        ("Angle", "sideways", "angle"),
        ("RetImage", "***not base64***", "portrait"),
        ("EnLastName", ["CHAN"], "en_last_name"),
    ],
)
def test_malformed_field_is_none_and_logged_by_name(field: str, value: Any, attr: str) -> None:
    with structlog.testing.capture_logs() as logs:
        r = parse_response(_with(**{field: value}))
    assert getattr(r, attr) is None
    assert [e["field"] for e in logs] == [field]
    assert all(e["log_level"] == "warning" for e in logs)
    # The value itself never reaches the log.
    assert str(value) not in repr(logs)
    # Other fields are untouched.
    assert r.id_number == "1234567(8)"


@pytest.mark.parametrize(
    "field",
    ["CnLastName", "LastNameCode", "FirstNameCode", "Height", "Angle", "RetImage", "Birthday"],
)
def test_empty_or_missing_is_none(field: str) -> None:
    attr = {
        "CnLastName": "cn_last_name",
        "LastNameCode": "last_name_code",
        "FirstNameCode": "first_name_code",
        "Height": "height_m",
        "Angle": "angle",
        "RetImage": "portrait",
        "Birthday": "birthday",
    }[field]
    for resp in (_with(**{field: ""}), _with(**{field: _DROP}), _with(**{field: None})):
        assert getattr(parse_response(resp), attr) is None


def test_height_variants() -> None:
    assert parse_response(_with(Height="1.7")).height_m == Decimal("1.7")
    assert parse_response(_with(Height=" 1.58m")).height_m == Decimal("1.58")
    assert parse_response(_with(Height=1.81)).height_m == Decimal("1.81")


def test_angle_as_string_number() -> None:
    assert parse_response(_with(Angle="90")).angle == 90.0


def test_service_disabled_is_not_a_warning() -> None:
    r = parse_response(_with(WarnCardInfos=[-9109]))
    assert r.warnings == ()
    assert r.warning_service_disabled is True
    r = parse_response(_with(WarnCardInfos=[-9108, -9109]))
    assert r.warnings == (CardWarning(-9108, "blurry"),)
    assert r.warning_service_disabled is True


@pytest.mark.parametrize(("code", "name"), sorted(WARNING_NAMES.items()))
def test_known_warning_names(code: int, name: str) -> None:
    assert parse_response(_with(WarnCardInfos=[code])).warnings == (CardWarning(code, name),)


def test_unknown_warning_kept_with_code_in_name() -> None:
    r = parse_response(_with(WarnCardInfos=[-9105, "-9107"]))
    assert r.warnings == (CardWarning(-9105, "unknown_-9105"), CardWarning(-9107, "glare"))
    assert warning_name(-9199) == "unknown_-9199"


def test_no_warnings() -> None:
    for value in ([], None, _DROP):
        r = parse_response(_with(WarnCardInfos=value))
        assert r.warnings == () and not r.warning_service_disabled


def test_bad_warning_list_is_logged() -> None:
    with structlog.testing.capture_logs() as logs:
        r = parse_response(_with(WarnCardInfos=[-9101, "x"]))
    assert r.warnings == (CardWarning(-9101, "covered"),)
    assert [e["field"] for e in logs] == ["WarnCardInfos"]


def test_missing_request_id_does_not_crash() -> None:
    with structlog.testing.capture_logs() as logs:
        r = parse_response(_with(RequestId=_DROP))
    assert r.request_id == ""
    assert [e["field"] for e in logs] == ["RequestId"]
