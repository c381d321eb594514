"""The code → policy mapping agrees, row by row, with the reference's section-4 table."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from worker import errors
from worker.errors import (
    AccountError,
    ApiError,
    PermanentError,
    ResignError,
    ThrottledError,
    TransientError,
    TransportError,
    UnknownCodeError,
    api_error,
    classify,
)

REFERENCE = Path(__file__).parents[2] / ".." / "shared" / "reference" / "tencent-ocr-api.md"
ROW_CLASS: dict[str, type[ApiError]] = {
    "throttled": ThrottledError,
    "transient": TransientError,
    "re-sign once": ResignError,
    "account-level": AccountError,
    "permanent (the job's input)": PermanentError,
}
# (retryable, spends_budget) as the table's "what the worker does" column puts it.
POLICY = {
    ThrottledError: (True, False),  # reschedule, do not spend the job's failure budget
    TransientError: (True, True),  # backoff, bounded by attempts
    ResignError: (True, False),  # re-sign once
    AccountError: (True, False),  # keep jobs queued, none failed for it
    PermanentError: (False, True),  # fail the job at once
    UnknownCodeError: (True, True),  # transient on a small budget
    TransportError: (True, True),  # non-200, connection errors, timeouts are transient
}


def _reference_text() -> str:
    if not REFERENCE.exists():
        message = f"reference not found at {REFERENCE}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return REFERENCE.read_text(encoding="utf-8")


def _section_4_rows() -> list[tuple[str, list[str]]]:
    """(class label, [codes]) per table row; `.Suffix` codes extend the row's first code."""
    text = _reference_text()
    section = text.split("## 4.", 1)[1].split("\n## ", 1)[0]
    rows: list[tuple[str, list[str]]] = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] in ("class (**policy**)", "") or set(cells[0]) <= {"-"}:
            continue
        label = cells[0].replace("*", "").strip()
        codes: list[str] = []
        for code in re.findall(r"`([^`]+)`", cells[1]):
            if code.startswith(".") and codes:
                code = codes[0] + code
            codes.append(code)
        rows.append((label, codes))
    return rows


def test_table_is_parsed() -> None:
    rows = _section_4_rows()
    assert {label for label, _ in rows} == set(ROW_CLASS)
    codes = [code for _, cs in rows for code in cs]
    assert len(codes) >= 38  # 4 + 9 + 1 + 14 + 10 when this was written
    assert "RequestLimitExceeded.UinLimitExceeded" in codes
    assert "FailedOperation.DownLoadError" in codes and "FailedOperation.OcrFailed" in codes


def test_every_listed_code_maps_to_its_row() -> None:
    wrong = []
    for label, codes in _section_4_rows():
        for code in codes:
            family = code.endswith("*")
            probes = [code[:-1], code[:-1] + ".Anything"] if family else [code]
            for probe in probes:
                got = classify(probe)
                if got is not ROW_CLASS[label]:
                    wrong.append((probe, label, got.__name__))
    assert wrong == []


@pytest.mark.parametrize(
    "code",
    [
        "InvalidParameter",
        "InvalidParameter.ConfigFormatError",
        "InvalidParameter.EngineImageDecodeFailed",
        "InvalidParameterValue",
        "InvalidParameterValue.InvalidParameterValueLimit",
        "InvalidParameterValue.SomethingNew",
    ],
)
def test_invalid_parameter_family_is_permanent(code: str) -> None:
    assert classify(code) is PermanentError


@pytest.mark.parametrize("code", ["RequestLimitExceeded.SomeNewLimit"])
def test_request_limit_family_is_throttled(code: str) -> None:
    assert classify(code) is ThrottledError


@pytest.mark.parametrize(
    "code",
    ["FailedOperation.SomethingNew", "Brand.New", "", "requestlimitexceeded", "LimitExceededX"],
)
def test_unknown_codes(code: str) -> None:
    assert classify(code) is UnknownCodeError


def test_prefix_matching_does_not_swallow_exact_codes() -> None:
    # `LimitExceeded` (account) and `LimitExceeded.TooLargeFileError` (the input) differ.
    assert classify("LimitExceeded") is AccountError
    assert classify("LimitExceeded.TooLargeFileError") is PermanentError


@pytest.mark.parametrize(("cls", "policy"), list(POLICY.items()), ids=lambda v: str(v))
def test_class_policy(cls: type[ApiError], policy: tuple[bool, bool]) -> None:
    assert (cls.retryable, cls.spends_budget) == policy


def test_api_error_builds_the_class_with_request_id() -> None:
    err = api_error("FailedOperation.OcrFailed", "ocr failed", request_id="r-1")
    assert type(err) is TransientError
    assert (err.code, err.message, err.request_id) == (
        "FailedOperation.OcrFailed",
        "ocr failed",
        "r-1",
    )
    assert str(err) == "FailedOperation.OcrFailed: ocr failed"


def test_no_code_is_in_two_sets() -> None:
    sets = [
        errors.THROTTLED_CODES,
        errors.TRANSIENT_CODES,
        errors.RESIGN_CODES,
        errors.ACCOUNT_CODES,
        errors.PERMANENT_CODES,
    ]
    seen: set[str] = set()
    for codes in sets:
        assert not (seen & codes)
        seen |= codes
