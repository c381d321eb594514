"""Structured logs: JSON lines for structlog and stdlib alike, personal data redacted."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
from typing import Any

import pytest
import structlog

from worker.logs import (
    CELERY_LOGGING_UID,
    REDACTED,
    configure_logging,
    install_celery_logging,
    scrub_text,
)
from worker.settings import Settings

NAME_CN = "陳大文"
NAME_EN = "CHAN TAI MAN"
ID_SMART = "1234567(8)"
ID_OLD = "5/123456/7"
BIRTHDAY = "01-02-1990"


@pytest.fixture
def out(restore_logging: None) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(Settings(log_json=True, log_level="DEBUG"), stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text, "nothing was logged"
    return [json.loads(line) for line in text.splitlines()]


def test_structlog_event_is_one_json_line_with_fields(out: io.StringIO) -> None:
    structlog.get_logger("worker.pipeline").info(
        "api_call", job_id="j-1", attempt=2, outcome_code="OK", request_id="r-1", latency_ms=41
    )
    (event,) = lines(out)
    assert event["event"] == "api_call"
    assert event["level"] == "info"
    assert event["logger"] == "worker.pipeline"
    assert (event["job_id"], event["attempt"], event["outcome_code"]) == ("j-1", 2, "OK")
    assert (event["request_id"], event["latency_ms"]) == ("r-1", 41)
    assert dt.datetime.fromisoformat(event["timestamp"]).tzinfo is not None


def test_stdlib_records_share_the_renderer(out: io.StringIO) -> None:
    logging.getLogger("celery.worker.consumer").info("Connected to %s", "redis://x")
    (event,) = lines(out)
    assert event["event"] == "Connected to redis://x"
    assert event["logger"] == "celery.worker.consumer"
    assert event["level"] == "info"


@pytest.mark.parametrize(("level", "shown"), [("INFO", False), ("DEBUG", True)])
def test_celery_per_task_lines_only_at_debug(
    restore_logging: None, level: str, shown: bool
) -> None:
    stream = io.StringIO()
    configure_logging(Settings(log_json=True, log_level=level), stream=stream)
    logging.getLogger("celery.worker.strategy").info("Task %s[%s] received", "t", "abc")
    logging.getLogger("celery.app.trace").info("Task %s[%s] succeeded", "t", "abc")
    logging.getLogger("celery.app.trace").error("Task %s[%s] raised", "t", "abc")
    events = [event["event"] for event in lines(stream)]
    expected = ["Task t[abc] received", "Task t[abc] succeeded"] if shown else []
    assert events == [*expected, "Task t[abc] raised"]


def test_level_filters(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(Settings(log_json=True, log_level="WARNING"), stream=stream)
    structlog.get_logger("x").info("quiet")
    logging.getLogger("y").info("quiet too")
    structlog.get_logger("x").warning("loud")
    assert [e["event"] for e in lines(stream)] == ["loud"]


def test_unknown_level_names_the_variable(restore_logging: None) -> None:
    with pytest.raises(ValueError, match="MACAO_OCR_LOG_LEVEL"):
        configure_logging(Settings(log_level="CHATTY"), stream=io.StringIO())


def test_personal_and_secret_keys_are_masked(out: io.StringIO) -> None:
    structlog.get_logger("x").info(
        "oops",
        job_id="j-2",
        cn_name=NAME_CN,
        en_last_name=NAME_EN,
        CnFirstName=NAME_CN,
        ID=ID_SMART,
        id_number=ID_SMART,
        birthday=BIRTHDAY,
        image=b"\x89PNG....",
        image_base64="aGVsbG8=",
        portrait="aGVsbG8=",
        secret_key="s3cr3t-k3y",
        authorization="TC3-HMAC-SHA256 Credential=AKID/...",
        front_image_id="img-1",
    )
    (event,) = lines(out)
    raw = out.getvalue()
    for value in (NAME_CN, NAME_EN, ID_SMART, BIRTHDAY, "aGVsbG8=", "s3cr3t-k3y", "AKID"):
        assert value not in raw
    for key in (
        "cn_name",
        "en_last_name",
        "CnFirstName",
        "ID",
        "id_number",
        "birthday",
        "image",
        "image_base64",
        "portrait",
        "secret_key",
        "authorization",
    ):
        assert event[key] == REDACTED, key
    # Ids are not personal: they stay readable for operators.
    assert event["job_id"] == "j-2"
    assert event["front_image_id"] == "img-1"


def test_nested_api_response_is_masked(out: io.StringIO) -> None:
    response = {
        "Response": {
            "CnLastName": "陳",
            "EnLastName": "CHAN",
            "ID": ID_SMART,
            "Birthday": BIRTHDAY,
            "RetImage": "aGVsbG8=",
            "RequestId": "req-9",
            "WarnCardInfos": [-9101],
        }
    }
    structlog.get_logger("x").info("response", payload_seen=response)
    (event,) = lines(out)
    inner = event["payload_seen"]["Response"]
    assert inner["CnLastName"] == REDACTED
    assert inner["ID"] == REDACTED
    assert inner["Birthday"] == REDACTED
    assert inner["RetImage"] == REDACTED
    assert inner["RequestId"] == "req-9"
    assert inner["WarnCardInfos"] == [-9101]


def test_free_text_is_scrubbed_in_stdlib_and_structlog(out: io.StringIO) -> None:
    logging.getLogger("celery.app.trace").error("card %s born %s failed", ID_SMART, BIRTHDAY)
    structlog.get_logger("x").warning(f"old card {ID_OLD} / bare 12345678 seen", job_id="j")
    raw = out.getvalue()
    for value in (ID_SMART, ID_OLD, "12345678", BIRTHDAY):
        assert value not in raw
    first, second = lines(out)
    assert first["event"] == f"card {REDACTED} born {REDACTED} failed"
    assert REDACTED in second["event"]


def test_exceptions_are_rendered_and_scrubbed(out: io.StringIO) -> None:
    try:
        raise RuntimeError(f"bad card {ID_SMART}")
    except RuntimeError:
        structlog.get_logger("x").exception("failed", job_id="j-3")
        logging.getLogger("celery").exception("stdlib failed")
    raw = out.getvalue()
    assert ID_SMART not in raw
    a, b = lines(out)
    assert "RuntimeError" in a["exception"] and "RuntimeError" in b["exception"]


def test_url_query_and_password_are_stripped(out: io.StringIO) -> None:
    structlog.get_logger("x").info(
        "fetch",
        front_url="https://bucket.example/cards/a.png?X-Sig=abc123&Expires=9",
        broker="redis://:hunter2@redis.internal:6379/0",
    )
    (event,) = lines(out)
    assert event["front_url"] == f"https://bucket.example/cards/a.png?{REDACTED}"
    assert "hunter2" not in out.getvalue()
    assert event["broker"] == f"redis://:{REDACTED}@redis.internal:6379/0"


def test_ids_that_are_not_card_numbers_survive() -> None:
    # uuids, request ids and our ISO timestamps must stay readable.
    text = "job 15234567-89ab-4def-8123-456789abcdef at 2024-05-01T10:00:00+00:00 took 1234 ms"
    assert scrub_text(text) == text


def test_console_output_is_readable_and_redacted(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(Settings(log_json=False, log_level="INFO"), stream=stream)
    structlog.get_logger("x").info("api_call", job_id="j-4", en_name=NAME_EN)
    text = stream.getvalue()
    assert "api_call" in text and "j-4" in text
    assert NAME_EN not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_celery_setup_logging_signal_uses_our_configuration(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from celery import Celery
    from celery.signals import setup_logging

    install_celery_logging(Settings(log_json=False, log_level="DEBUG"))
    # Installed again (a second app): the latest settings are the ones used.
    install_celery_logging(Settings(log_json=True, log_level="INFO"))
    app = Celery("t", set_as_current=False)
    # What `celery worker` does at start: with a receiver connected, Celery leaves logging alone.
    app.log.already_setup = False  # type: ignore[misc]
    handled = app.log.setup_logging_subsystem(loglevel="INFO")
    assert handled
    logging.getLogger("celery.worker").warning("connected to %s", "redis://:pw@h:1/0")
    err = capsys.readouterr().err.strip().splitlines()
    event = json.loads(err[-1])
    assert event["logger"] == "celery.worker"
    assert "pw" not in event["event"]
    assert logging.getLogger().level == logging.INFO
    setup_logging.disconnect(dispatch_uid=CELERY_LOGGING_UID)
