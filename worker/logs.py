"""Structured logs: one JSON object per line, personal data redacted as defence in depth.

`configure_logging(settings)` routes structlog events AND stdlib records (Celery's, the
transport's, aiohttp's) through one formatter, so every line has the same shape and passes the same
redaction. Code logs with `structlog.get_logger(__name__)` and keyword fields (job_id, attempt,
outcome_code, request_id, latency_ms). The first guarantee is that code never logs personal
data; the redactor exists for the mistakes: it masks personal and secret keys, strips URL query
strings and passwords, and scrubs Macao ID numbers and card dates from any string.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

if TYPE_CHECKING:
    from worker.settings import Settings

REDACTED = "[REDACTED]"
CELERY_LOGGING_UID = "macao_ocr.configure_logging"
_MAX_DEPTH = 4


def _norm(key: str) -> str:
    return key.lower().replace("_", "").replace("-", "")


# Keys (compared lowercased, without _ and -) whose values are masked whole.
PERSONAL_KEYS = frozenset(
    _norm(k)
    for k in (
        # names, in the API's spelling and ours
        "name",
        "names",
        "full_name",
        "first_name",
        "last_name",
        "surname",
        "given_name",
        "cn_name",
        "en_name",
        "cn_first_name",
        "cn_last_name",
        "en_first_name",
        "en_last_name",
        "first_name_code",
        "last_name_code",
        "holder",
        "holder_name",
        # the number and the other card fields
        "id_number",
        "id_num",
        "id_no",
        "card_number",
        "card_no",
        "resident_id",
        "birthday",
        "birth_date",
        "date_of_birth",
        "dob",
        "sex",
        "height",
        "symbol",
        # whole bodies may carry any of the above
        "body",
        "payload",
        "request_body",
        "response_body",
        "raw_response",
    )
)
# Substrings of keys whose values are masked whole.
SECRET_KEY_PARTS = (
    "secret",
    "password",
    "passwd",
    "authorization",
    "token",
    "credential",
    "cookie",
    "signature",
    "portrait",
    "retimage",
    "birthday",
)
# The API's own field for the card number is `ID`; `id`, `job_id`... are ours and harmless.
CASE_SENSITIVE_KEYS = frozenset({"ID"})

# Macao resident ID numbers: 1234567(8) on smart cards, 1/234567/8 on older ones, and the
# bare 8 digits a careless normalisation would make.
_ID_PATTERNS = (
    re.compile(r"(?<![0-9A-Za-z])[157]\d{6}\s?[(\uff08]\s?[0-9A-Za-z]\s?[)\uff09]"),
    re.compile(r"(?<![0-9A-Za-z])[157]\s?/\s?\d{6}\s?/\s?[0-9A-Za-z](?![0-9A-Za-z])"),
    re.compile(r"(?<![0-9A-Za-z.-])[157]\d{7}(?![0-9A-Za-z.-])"),
)
# The card's date format (DD-MM-YYYY, and its / and . spellings). Our own timestamps are ISO
# (YYYY-MM-DD), which this does not touch.
_CARD_DATE = re.compile(r"(?<!\d)[0-3]\d[-/.][01]\d[-/.](?:19|20)\d\d(?!\d)")
# A URL's query string (presigned URLs carry credentials there) and its userinfo password.
_URL_QUERY = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#\"']+)\?[^\s#\"']*")
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@\"']*:)[^\s/@\"']+@")
# Every pattern above that needs a digit needs one of these (\d is Unicode-aware).
_DIGIT = re.compile(r"\d")


def scrub_text(text: str) -> str:
    """Mask ID numbers, card dates, URL query strings and URL passwords in free text."""
    if "://" in text:
        text = _URL_QUERY.sub(r"\1?" + REDACTED, text)
        text = _URL_PASSWORD.sub(r"\1" + REDACTED + "@", text)
    if _DIGIT.search(text):
        for pattern in _ID_PATTERNS:
            text = pattern.sub(REDACTED, text)
        text = _CARD_DATE.sub(REDACTED, text)
    return text


@functools.lru_cache(maxsize=4096)
def is_sensitive_key(key: str) -> bool:
    """True when a field named `key` must never be logged (cached: keys repeat, every event
    asks for each of its keys, and the answer was a third of a log line's CPU)."""
    if key in CASE_SENSITIVE_KEYS:
        return True
    norm = _norm(key)
    if norm in PERSONAL_KEYS or any(part in norm for part in SECRET_KEY_PARTS):
        return True
    # Image bytes or base64 (`image`, `image_base64`, `front_image`); image ids are fine.
    return "image" in norm and not norm.endswith("id")


def redact_value(value: Any, depth: int = 0) -> Any:
    """A copy of `value` safe to log (containers are walked a few levels deep)."""
    if isinstance(value, str):
        return scrub_text(value)
    if value is None or isinstance(value, bool | int | float | dt.datetime):
        return value
    if isinstance(value, dt.date):
        # A bare date in this domain is a card date (birthday, issue, validity).
        return REDACTED
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if depth >= _MAX_DEPTH:
        return REDACTED
    if isinstance(value, Mapping):
        return {
            str(k): (REDACTED if is_sensitive_key(str(k)) else redact_value(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(v, depth + 1) for v in value]
    # Anything else (exceptions, objects) is logged by its text, scrubbed.
    return scrub_text(str(value))


def redact_event(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask sensitive keys and scrub every value."""
    for key in list(event_dict):
        if key.startswith("_"):  # structlog/ProcessorFormatter internals (_record, ...)
            continue
        if is_sensitive_key(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = redact_value(event_dict[key])
    return event_dict


def _add_pid(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    event_dict.setdefault("pid", os.getpid())
    return event_dict


# The loggers of Celery's per-task INFO lines (strategy: received; trace: succeeded/failed).
CELERY_PER_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


def _level_number(level: int | str) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"MACAO_OCR_LOG_LEVEL: unknown log level {level!r}")
    return number


def build_formatter(*, json: bool, colors: bool = False) -> structlog.stdlib.ProcessorFormatter:
    """The one formatter for structlog events and stdlib records alike."""
    renderer: Processor
    if json:
        # ensure_ascii=False keeps text greppable (an escaped name would hide a leak).
        renderer = structlog.processors.JSONRenderer(ensure_ascii=False, default=str)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            # Last before rendering, so nothing added earlier escapes it.
            redact_event,
            renderer,
        ],
    )


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_pid,
    ]


def configure_logging(
    settings: Settings, *, level: int | str | None = None, stream: TextIO | None = None
) -> None:
    """Send every log record, structlog's and stdlib's, through one redacting renderer.

    `level` overrides settings.log_level (Celery passes its --loglevel). Safe to call again.
    """
    level_no = _level_number(level if level is not None else settings.log_level)
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)
    handler.setFormatter(build_formatter(json=settings.log_json, colors=out.isatty()))

    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_no)
    # Celery's loggers must not keep handlers of their own or set propagate off.
    for name in ("celery", "celery.task", "celery.redirected", "celery.worker"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True
    # Celery's own two lines per task ("received", "succeeded in") repeat our api_call and
    # job_* events and cost a worker about as much CPU as ours: shown at DEBUG only.
    per_task = level_no if level_no <= logging.DEBUG else max(level_no, logging.WARNING)
    for name in CELERY_PER_TASK_LOGGERS:
        logging.getLogger(name).setLevel(per_task)
    logging.captureWarnings(True)
    # The Logging HOWTO's "Optimization": our format uses none of the caller's file and line,
    # thread or process names (the pid is added above), and looking them up cost about a
    # quarter of each line's CPU on a busy worker.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a later configure_logging (Celery's setup_logging hook, a test's
        # capture_logs) must reach loggers that were already used.
        cache_logger_on_first_use=False,
    )


def install_celery_logging(settings: Settings) -> None:
    """Make Celery use `configure_logging` instead of its own handlers.

    Connecting `setup_logging` tells Celery not to touch logging at all; call this when the
    Celery app is created (before the worker starts).
    """
    from celery.signals import setup_logging

    def _setup(loglevel: int | str | None = None, **_kwargs: Any) -> None:
        configure_logging(settings, level=loglevel or None)

    # The latest app's settings win (celery keeps the first receiver of a dispatch_uid).
    setup_logging.disconnect(dispatch_uid=CELERY_LOGGING_UID)
    setup_logging.connect(_setup, weak=False, dispatch_uid=CELERY_LOGGING_UID)


def bind_job(**fields: Any) -> None:
    """Bind fields (job_id, attempt) to every event this thread or task logs next."""
    structlog.contextvars.bind_contextvars(**fields)


def clear_job() -> None:
    """Forget fields bound with `bind_job` (at task end)."""
    structlog.contextvars.clear_contextvars()
