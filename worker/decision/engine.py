"""The decision: every finding (warnings, then our checks) weighed by the tenant's policy.

Pure: the same result fields, warnings, policy, day of reading and limits always give the
same decision, so `macao-ocr decide` can recompute stored decisions with no API call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Final

from worker.decision.checks import CardFacts, Limits, run_checks
from worker.decision.policy import Policy
from worker.reason_codes import WARNING_SERVICE_DISABLED, Effect, Outcome, Source

# Macao's civil day decides whether a card expired (UTC+8, no daylight saving).
MACAO_TZ: Final = timezone(timedelta(hours=8), "Asia/Macau")


@dataclass(frozen=True)
class Reason:
    """One finding that counts under the policy. `detail` holds no personal data."""

    code: str
    source: Source
    detail: str
    effect: Effect

    def to_dict(self) -> dict[str, str]:
        """The public JSON shape: code, source, detail."""
        return {"code": self.code, "source": self.source.value, "detail": self.detail}


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reasons: tuple[Reason, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"decision": self.outcome.value, "reasons": [r.to_dict() for r in self.reasons]}


def reading_day(read_at: datetime) -> date:
    """The day of reading in Macao."""
    return read_at.astimezone(MACAO_TZ).date()


def decide(
    card: CardFacts,
    warnings: Sequence[tuple[int, str]],
    *,
    warning_service_disabled: bool,
    policy: Policy,
    read_at: datetime,
    limits: Limits,
) -> Decision:
    """Reject if any reason rejects, consider if any sends to a person, else clear.

    `warnings`: (WarnCardInfos code, stable name) in the API's order. Findings whose effect
    is `ignore` are not reasons (the warnings themselves stay listed with the result)."""
    findings: list[tuple[str, Source, str]] = [
        (name, Source.warning, f"WarnCardInfos {code}") for code, name in warnings
    ]
    if warning_service_disabled:
        findings.append(
            (WARNING_SERVICE_DISABLED, Source.warning, "WarnCardInfos -9109: no warnings checked")
        )
    day = reading_day(read_at)
    findings += [(code, Source.check, detail) for code, detail in run_checks(card, day, limits)]
    reasons = []
    for code, source, detail in findings:
        effect = policy.effect(code)
        if effect is not Effect.ignore:
            reasons.append(Reason(code, source, detail, effect))
    if any(r.effect is Effect.reject for r in reasons):
        outcome = Outcome.reject
    elif reasons:
        outcome = Outcome.consider
    else:
        outcome = Outcome.clear
    return Decision(outcome, tuple(reasons))
