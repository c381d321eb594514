"""The text and stored forms of a warning policy's overrides: parsed and checked against the
code catalogue, and written back.

Text form (MACAO_OCR_WARNING_POLICY): `reject=tampered,photocopy;consider=glare;ignore=blurry`
— effects separated by `;`, codes by `,`, spaces allowed, every code at most once. Stored form
(a tenant's row): a JSON object code → effect.

A leaf below `worker.settings` (which checks the variable at load, so a bad value names it);
the policy model that applies overrides is `worker.decision.policy`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from worker.reason_codes import BY_CODE, Effect


class PolicyError(ValueError):
    """A policy that names an unknown code or effect, or gives a code two effects."""


def _known_codes() -> str:
    return ", ".join(BY_CODE)


def _code(text: str) -> str:
    code = text.strip()
    if code not in BY_CODE:
        raise PolicyError(f"unknown code {code[:60]!r}: use one of {_known_codes()}")
    return code


def overrides_from(groups: Mapping[Effect, Iterable[str]]) -> dict[str, Effect]:
    """{effect: codes} → {code: effect}; each item may itself be `a,b`. A code given two
    effects is an error, never a silent last-one-wins."""
    result: dict[str, Effect] = {}
    for effect, items in groups.items():
        for item in items:
            for part in item.split(","):
                if not part.strip():
                    continue
                code = _code(part)
                if result.get(code, effect) is not effect:
                    raise PolicyError(f"{code} is given two effects: {result[code]} and {effect}")
                result[code] = effect
    return result


def parse_policy_text(text: str) -> dict[str, Effect]:
    """`reject=a,b;consider=c;ignore=d` → {code: effect} (empty text: no overrides)."""
    groups: dict[Effect, list[str]] = {}
    for clause in text.split(";"):
        if not clause.strip():
            continue
        name, sep, codes = clause.partition("=")
        if not sep:
            raise PolicyError(
                f"{clause.strip()[:60]!r} is not EFFECT=CODE[,CODE...] "
                "(e.g. reject=tampered,photocopy;consider=glare)"
            )
        try:
            effect = Effect(name.strip().lower())
        except ValueError:
            raise PolicyError(
                f"unknown effect {name.strip()[:30]!r}: use reject, consider or ignore"
            ) from None
        if effect in groups:
            raise PolicyError(f"{effect} is given twice: list its codes once, comma-separated")
        groups[effect] = [codes]
    return overrides_from(groups)


def policy_text(overrides: Mapping[str, Effect]) -> str:
    """The text form of overrides (what parse_policy_text reads back)."""
    parts = []
    for effect in Effect:
        codes = [c for c in BY_CODE if overrides.get(c) is effect]
        if codes:
            parts.append(f"{effect}={','.join(codes)}")
    return ";".join(parts)


def stored_overrides(raw: object) -> dict[str, Effect]:
    """Overrides as stored (a JSON object code → effect), checked like user input."""
    if not isinstance(raw, dict):
        raise PolicyError("a stored policy must be a JSON object of code: effect")
    groups: dict[Effect, list[str]] = {}
    for code, effect in raw.items():
        try:
            groups.setdefault(Effect(str(effect)), []).append(str(code))
        except ValueError:
            raise PolicyError(f"stored effect {str(effect)[:30]!r} is unknown") from None
    return overrides_from(groups)
