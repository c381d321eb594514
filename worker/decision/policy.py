"""The warning policy: which codes reject, which send to a person, which are ignored.

A tenant's policy is layers of overrides on the documented defaults
(`worker.reason_codes.DEFAULTS`): MACAO_OCR_WARNING_POLICY for the tenant `default`, then what
`macao-ocr tenants policy` stored for the tenant. Only overrides are stored, so a check added
later starts at its default everywhere. Their text and stored forms are read by
`worker.policy_text`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from worker.reason_codes import BY_CODE, DEFAULTS, Effect, policy_key

DEFAULT_TENANT: Final = "default"


@dataclass(frozen=True)
class Policy:
    """A tenant's effective policy: defaults, then each layer of overrides in order."""

    env: Mapping[str, Effect] = field(default_factory=dict)
    stored: Mapping[str, Effect] = field(default_factory=dict)

    def effect(self, code: str) -> Effect:
        """The effect of a reason code (unknown warnings share `unknown_warning`)."""
        key = policy_key(code)
        found = self.stored.get(key) or self.env.get(key) or DEFAULTS.get(key)
        # A code we do not know (never produced by us): a person looks.
        return found or Effect.consider

    def source(self, code: str) -> str:
        """Where the code's effect comes from: tenant, env or default."""
        if code in self.stored:
            return "tenant"
        if code in self.env:
            return "env"
        return "default"

    def table(self) -> list[dict[str, str]]:
        """Every code with its effect and where that comes from (`tenants policy`)."""
        return [
            {
                "code": info.code,
                "source": info.source.value,
                "effect": self.effect(info.code).value,
                "default": info.default.value,
                "set_by": self.source(info.code),
            }
            for info in BY_CODE.values()
        ]


def policy_for(
    tenant: str, stored: Mapping[str, Effect] | None, env: Mapping[str, Effect] | None
) -> Policy:
    """The tenant's policy: MACAO_OCR_WARNING_POLICY applies to the tenant `default` only."""
    applied_env = dict(env or {}) if tenant == DEFAULT_TENANT else {}
    return Policy(env=applied_env, stored=dict(stored or {}))
