"""The decision of one result, from the API's answer (the worker) or a stored row (`decide`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from worker.decision.checks import Limits
from worker.decision.engine import Decision, decide
from worker.decision.facts import card_facts
from worker.decision.policy import Policy

if TYPE_CHECKING:
    from models import Result, Warning
    from worker.settings import Settings
    from worker.tencent.types import OcrResult


def limits_of(settings: Settings) -> Limits:
    """The checks' settings."""
    return Limits(expiry_warning_days=settings.expiry_warning_days, min_age=settings.min_age)


def decide_answer(
    result: OcrResult,
    policy: Policy,
    *,
    sides_identical: bool,
    read_at: datetime,
    limits: Limits,
) -> Decision:
    """The decision on a fresh answer, read at `read_at`."""
    return decide(
        card_facts(result, unreadable=result.unreadable, sides_identical=sides_identical),
        [(w.code, w.name) for w in result.warnings],
        warning_service_disabled=result.warning_service_disabled,
        policy=policy,
        read_at=read_at,
        limits=limits,
    )


def decide_stored(
    result: Result,
    fields: OcrResult,
    warnings: Sequence[Warning],
    policy: Policy,
    *,
    sides_identical: bool,
    limits: Limits,
) -> Decision:
    """The decision on a stored result, as of the day it was read (its created_at); `fields`:
    its personal fields opened (`Sealer.open_result`)."""
    return decide(
        card_facts(fields, unreadable=result.unreadable_fields, sides_identical=sides_identical),
        [(w.code, w.name) for w in warnings],
        warning_service_disabled=result.warning_service_disabled,
        policy=policy,
        read_at=result.created_at,
        limits=limits,
    )
