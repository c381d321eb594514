"""The emulator's credentials and behaviour knobs.

Knobs can be set at start (CLI flags / MACAO_OCR_EMULATOR_* variables) and changed at
runtime through POST /__emulator__/config; `apply_knobs` is the one validator for both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CREDENTIAL_ENV_ID = "TENCENTCLOUD_SECRET_ID"
CREDENTIAL_ENV_KEY = "TENCENTCLOUD_SECRET_KEY"
KNOB_ENV_PREFIX = "MACAO_OCR_EMULATOR_"  # + the knob name in capitals

FAULT_KINDS = ("ocr_failed", "download_error", "internal_error", "reset", "http_502")


@dataclass
class Knobs:
    """Runtime behaviour. Probabilities are in [0, 1]; 0 everywhere means a well-behaved API."""

    latency_median_ms: float = 0.0
    latency_sigma: float = 0.0
    latency_tail_prob: float = 0.0
    latency_tail_mult: float = 10.0
    # Accepted calls per SecretId per 1-second window (int(time.time())); 0 = unlimited.
    quota_per_s: int = 0
    ocr_failed: float = 0.0
    download_error: float = 0.0
    internal_error: float = 0.0
    reset: float = 0.0
    http_502: float = 0.0
    # P(FailedOperation.DownLoadError) for a call that carries an image URL, answered before
    # downloading it (Tencent could not fetch the URL); base64-only calls are unaffected.
    url_download_error: float = 0.0
    # Every call that passes all checks answers this error code instead of a result.
    force_error_code: str | None = None
    # The account has no warning service: every result carries WarnCardInfos [-9109].
    warning_service_disabled: bool = False
    # When False, RetImage stays empty even if Config asks for the portrait.
    portrait_enabled: bool = True
    # Answer `application/json; charset=utf-8` (the SDK then misses errors) instead of
    # Tencent's plain `application/json`.
    json_charset: bool = False
    download_timeout_s: float = 3.0
    timestamp_skew_s: int = 300

    def public(self) -> dict[str, Any]:
        """The knobs as JSON (no secrets live here)."""
        return dataclasses.asdict(self)


_PROBABILITIES = frozenset({*FAULT_KINDS, "latency_tail_prob", "url_download_error"})
_NON_NEGATIVE = frozenset(
    {
        "latency_median_ms",
        "latency_sigma",
        "latency_tail_mult",
        "quota_per_s",
        "download_timeout_s",
        "timestamp_skew_s",
    }
)


class KnobError(ValueError):
    """A knob name or value is not acceptable; the message names it."""


def _coerce(name: str, target: type[Any] | str, value: Any) -> Any:
    kind = str(target)
    if value is None and "None" in kind:
        return None
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        }:
            return value.lower() in {"1", "true", "yes", "on"}
        raise KnobError(f"knob {name} must be a boolean, got {value!r}")
    if kind.startswith("int"):
        if isinstance(value, bool):
            raise KnobError(f"knob {name} must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise KnobError(f"knob {name} must be an integer, got {value!r}") from None
    if kind.startswith("float"):
        if isinstance(value, bool):
            raise KnobError(f"knob {name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise KnobError(f"knob {name} must be a number, got {value!r}") from None
    if isinstance(value, str):
        return value or None
    raise KnobError(f"knob {name} must be a string, got {value!r}")


def apply_knobs(knobs: Knobs, changes: Mapping[str, Any]) -> Knobs:
    """A copy of `knobs` with `changes` applied; raises KnobError naming a bad knob."""
    types = {f.name: f.type for f in dataclasses.fields(Knobs)}
    updates: dict[str, Any] = {}
    for name, raw in changes.items():
        if name not in types:
            raise KnobError(f"unknown knob {name!r}; known: {', '.join(sorted(types))}")
        value = _coerce(name, types[name], raw)
        if name in _PROBABILITIES and not 0.0 <= value <= 1.0:
            raise KnobError(f"knob {name} is a probability in [0, 1], got {value!r}")
        if name in _NON_NEGATIVE and value < 0:
            raise KnobError(f"knob {name} must be >= 0, got {value!r}")
        updates[name] = value
    return dataclasses.replace(knobs, **updates)


def parse_credential(text: str) -> tuple[str, str]:
    """`ID:KEY` → (ID, KEY). The error never repeats the key."""
    secret_id, sep, secret_key = text.strip().partition(":")
    if not sep or not secret_id or not secret_key:
        raise ValueError("a credential is written SECRET_ID:SECRET_KEY (both non-empty)")
    return secret_id, secret_key


def load_credentials(
    *,
    environ: Mapping[str, str],
    pairs: Iterable[str] = (),
    files: Iterable[Path] = (),
) -> dict[str, str]:
    """SecretId → SecretKey from the environment pair, `ID:KEY` strings and credential files."""
    creds: dict[str, str] = {}
    env_id, env_key = environ.get(CREDENTIAL_ENV_ID), environ.get(CREDENTIAL_ENV_KEY)
    if env_id and env_key:
        creds[env_id] = env_key
    for text in pairs:
        sid, key = parse_credential(text)
        creds[sid] = key
    for path in files:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                sid, key = parse_credential(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
            creds[sid] = key
    if not creds:
        raise ValueError(
            f"no credentials: set {CREDENTIAL_ENV_ID} and {CREDENTIAL_ENV_KEY}, "
            "or pass --credential ID:KEY or --credentials-file FILE"
        )
    return creds


# The control endpoints (/__emulator__/config, counters, reset) answer only a request that
# carries this header with the token the emulator was started with.
CONTROL_TOKEN_HEADER = "X-Emulator-Token"  # noqa: S105  (a header's name)
CONTROL_TOKEN_ENV = "MACAO_OCR_EMULATOR_TOKEN"  # noqa: S105  (a variable's name)


@dataclass
class EmulatorConfig:
    """Everything `create_app` needs. `credentials` maps SecretId → SecretKey."""

    credentials: dict[str, str]
    knobs: Knobs = field(default_factory=Knobs)
    # Seed for fault/latency draws (None: unpredictable).
    seed: int | None = None
    # None: the control endpoints are closed to everyone.
    control_token: str | None = None

    def __repr__(self) -> str:
        return f"EmulatorConfig(secret_ids={sorted(self.credentials)}, knobs={self.knobs!r})"
