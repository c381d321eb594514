"""The warning policy (defaults, layers, parsing), the engine's rules, and the policy cache."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.decision.checks import CardFacts, Limits
from worker.decision.engine import decide, reading_day
from worker.decision.policy import Policy, policy_for
from worker.decision.store import PolicyCache
from worker.errors import ConfigError
from worker.policy_text import PolicyError, overrides_from, parse_policy_text, policy_text
from worker.reason_codes import BY_CODE, CATALOGUE, DEFAULTS, Effect, Outcome, Source
from worker.settings import load_settings

READ_AT = datetime(2026, 12, 3, 4, 0, tzinfo=UTC)
GOOD = CardFacts(
    id_number="1234567(8)",
    en_last_name="CHAN",
    birthday=date(1990, 5, 17),
    sex="M",
    first_issue_date=date(2008, 1, 2),
    current_issue_date=date(2020, 3, 4),
    validity_period=date(2030, 3, 4),
    validity_period_text="04-03-2030",
    symbol="ASM",
    resident_type="Permanent Resident Identity Card",
)


def run(
    warnings: list[tuple[int, str]] = (),  # type: ignore[assignment]
    card: CardFacts = GOOD,
    policy: Policy | None = None,
    disabled: bool = False,
) -> tuple[str, list[str]]:
    d = decide(
        card,
        list(warnings),
        warning_service_disabled=disabled,
        policy=policy or Policy(),
        read_at=READ_AT,
        limits=Limits(),
    )
    return d.outcome.value, [r.code for r in d.reasons]


def test_documented_defaults() -> None:
    assert DEFAULTS["tampered"] is Effect.reject
    assert DEFAULTS["photocopy"] is Effect.reject
    for code in ("screen_recapture", "covered", "glare", "blurry", "unknown_warning"):
        assert DEFAULTS[code] is Effect.consider
    assert DEFAULTS["warning_service_disabled"] is Effect.ignore
    assert DEFAULTS["card_expired"] is Effect.reject


def test_clear_consider_reject_by_default() -> None:
    assert run() == ("clear", [])
    assert run([(-9107, "glare")]) == ("consider", ["glare"])
    assert run([(-9107, "glare"), (-9102, "photocopy")]) == ("reject", ["glare", "photocopy"])
    assert run([(-9104, "tampered")])[0] == "reject"
    assert run([(-9105, "unknown_-9105")]) == ("consider", ["unknown_-9105"])


def test_warning_service_disabled_is_not_a_defect_by_default() -> None:
    assert run(disabled=True) == ("clear", [])
    strict = Policy(stored={"warning_service_disabled": Effect.consider})
    assert run(disabled=True, policy=strict) == ("consider", ["warning_service_disabled"])


def test_checks_are_overridable_like_warnings() -> None:
    expired = replace(GOOD, validity_period=date(2026, 1, 1))
    assert run(card=expired)[0] == "reject"
    lenient = Policy(stored={"card_expired": Effect.consider, "dates_out_of_order": Effect.ignore})
    assert run(card=expired, policy=lenient) == ("consider", ["card_expired"])
    assert run(card=expired, policy=Policy(stored={"card_expired": Effect.ignore}))[0] in (
        "clear",
        "consider",
    )


def test_ignored_findings_are_not_reasons_and_reasons_keep_their_source() -> None:
    policy = Policy(stored={"glare": Effect.ignore})
    assert run([(-9107, "glare")], policy=policy) == ("clear", [])
    d = decide(
        replace(GOOD, sides_identical=True),
        [(-9102, "photocopy")],
        warning_service_disabled=False,
        policy=Policy(),
        read_at=READ_AT,
        limits=Limits(),
    )
    assert [(r.code, r.source) for r in d.reasons] == [
        ("photocopy", Source.warning),
        ("sides_identical", Source.check),
    ]
    assert d.to_dict()["reasons"][0] == {
        "code": "photocopy",
        "source": "warning",
        "detail": "WarnCardInfos -9102",
    }


def test_layers_tenant_over_env_over_default_and_env_only_for_default_tenant() -> None:
    env = {"glare": Effect.reject, "blurry": Effect.ignore}
    stored = {"glare": Effect.ignore}
    default_tenant = policy_for("default", stored, env)
    assert default_tenant.effect("glare") is Effect.ignore
    assert default_tenant.source("glare") == "tenant"
    assert default_tenant.effect("blurry") is Effect.ignore
    assert default_tenant.source("blurry") == "env"
    other = policy_for("acme", None, env)
    assert other.effect("blurry") is Effect.consider
    assert other.source("blurry") == "default"


def test_parse_policy_text() -> None:
    text = " reject = tampered, photocopy ; consider=glare;ignore=blurry,warning_service_disabled;"
    assert parse_policy_text(text) == {
        "tampered": Effect.reject,
        "photocopy": Effect.reject,
        "glare": Effect.consider,
        "blurry": Effect.ignore,
        "warning_service_disabled": Effect.ignore,
    }
    assert parse_policy_text("") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("reject=tampred", "unknown code 'tampred'"),
        ("deny=tampered", "unknown effect 'deny'"),
        ("tampered", "is not EFFECT=CODE"),
        ("reject=glare;consider=glare", "two effects"),
        ("reject=glare;reject=blurry", "given twice"),
    ],
)
def test_bad_policy_text_names_the_problem(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy_text(text)


def test_cli_lists_accept_repeats_and_commas_and_refuse_conflicts() -> None:
    got = overrides_from({Effect.reject: ["glare,blurry", "covered"], Effect.ignore: []})
    assert got == {c: Effect.reject for c in ("glare", "blurry", "covered")}
    with pytest.raises(PolicyError, match="two effects"):
        overrides_from({Effect.reject: ["glare"], Effect.consider: ["glare"]})


@given(st.dictionaries(st.sampled_from(sorted(BY_CODE)), st.sampled_from(list(Effect))))
def test_policy_text_round_trips(overrides: dict[str, Effect]) -> None:
    assert parse_policy_text(policy_text(overrides)) == overrides


def test_setting_names_the_variable_on_a_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MACAO_OCR_WARNING_POLICY", "reject=nonsense")
    with pytest.raises(ConfigError, match=r"MACAO_OCR_WARNING_POLICY: .*unknown code 'nonsense'"):
        load_settings()
    monkeypatch.setenv("MACAO_OCR_WARNING_POLICY", "ignore=glare")
    monkeypatch.setenv("MACAO_OCR_EXPIRY_WARNING_DAYS", "7")
    monkeypatch.setenv("MACAO_OCR_MIN_AGE", "18")
    settings = load_settings()
    assert settings.warning_policy_overrides == {"glare": Effect.ignore}
    assert (settings.expiry_warning_days, settings.min_age) == (7, 18)
    monkeypatch.setenv("MACAO_OCR_MIN_AGE", "-1")
    with pytest.raises(ConfigError, match="MACAO_OCR_MIN_AGE"):
        load_settings()


def test_reading_day_is_macao_civil_day() -> None:
    # 17:00 UTC is 01:00 the next day in Macao.
    assert reading_day(datetime(2026, 12, 3, 17, 0, tzinfo=UTC)) == date(2026, 12, 4)
    assert reading_day(datetime(2026, 12, 3, 15, 59, tzinfo=UTC)) == date(2026, 12, 3)


def test_every_code_is_documented_in_the_readme() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Decisions") :]
    for info in CATALOGUE:
        assert f"`{info.code}`" in section, info.code


class FakeLoader:
    def __init__(self) -> None:
        self.calls = 0
        self.rules: dict[str, Effect] = {}
        self.fail = False

    def __call__(self, tenant: str) -> dict[str, Effect]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("database down")
        return dict(self.rules)


def test_policy_cache_reads_once_per_ttl_and_serves_the_last_known_on_failure() -> None:
    now = [0.0]
    loader = FakeLoader()
    cache = PolicyCache(loader, {}, ttl_s=30.0, clock=lambda: now[0])
    for _ in range(100):
        assert cache("acme").effect("glare") is Effect.consider
    assert loader.calls == 1
    loader.rules = {"glare": Effect.reject}
    now[0] = 29.0
    assert cache("acme").effect("glare") is Effect.consider
    now[0] = 31.0
    assert cache("acme").effect("glare") is Effect.reject
    assert loader.calls == 2
    loader.fail = True
    now[0] = 62.0
    assert cache("acme").effect("glare") is Effect.reject  # last known
    with pytest.raises(RuntimeError):
        cache("never-seen")


def test_decision_outcome_is_the_worst_effect() -> None:
    # Property over every subset of warnings: reject iff a rejecting one, else consider iff any.
    warnings = [(-9101, "covered"), (-9102, "photocopy"), (-9104, "tampered"), (-9108, "blurry")]
    for mask in range(16):
        chosen = [w for i, w in enumerate(warnings) if mask >> i & 1]
        outcome, _ = run(chosen)
        names = {n for _, n in chosen}
        if names & {"photocopy", "tampered"}:
            assert outcome == Outcome.reject
        elif names:
            assert outcome == Outcome.consider
        else:
            assert outcome == Outcome.clear


def test_no_expiry_is_judged_at_issue_not_today() -> None:
    card = replace(
        GOOD,
        birthday=READ_AT.date() - timedelta(days=365 * 70),
        first_issue_date=date(1990, 1, 1),
        current_issue_date=READ_AT.date() - timedelta(days=365 * 5),
        validity_period=None,
        validity_period_text="永久有效",
    )
    assert run(card=card) == ("clear", [])
