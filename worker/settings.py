"""The one settings class. Built in entry points (CLI, Celery app, emulator) and passed down.

Nothing here reads the environment at import time: `load_settings()` does, when called.
"""

from __future__ import annotations

import base64
import ipaddress
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import ConfigError
from worker.policy_text import PolicyError, parse_policy_text

DEFAULT_ENDPOINT = "https://ocr.intl.tencentcloudapi.com"
ENV_PREFIX = "MACAO_OCR_"

LOOKUP_KEY_BYTES = 32
MISSING_KEYS = (
    "no data keys: this process stores or reads personal data encrypted at rest; set "
    "MACAO_OCR_DATA_KEYS (or MACAO_OCR_DATA_KEYS_FILE) to a key ring made with "
    "`macao-ocr keys generate`"
)

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]


def _tc(name: str) -> Any:
    """Tencent's own SDK variable names, read without our prefix."""
    return AliasChoices(f"TENCENTCLOUD_{name}", f"{ENV_PREFIX}{name}")


class Settings(BaseSettings):
    """Every knob of the worker, producer and CLI. Variables are `MACAO_OCR_<FIELD>`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True, frozen=True
    )

    # -- storage and broker
    database_url: str = "sqlite:///macao-ocr.db"
    broker_url: str = "redis://127.0.0.1:6379/0"
    # Limiter, circuit and metrics state; the broker's Redis unless set.
    redis_url: str | None = None
    # The job table's tenant column is 64 characters.
    tenant: str = Field(default="default", min_length=1, max_length=64)

    # -- the API
    api_endpoint: str = DEFAULT_ENDPOINT
    # Plain http:// only to a loopback address (the local emulator) unless this says so:
    # the call carries the card image and the answer its holder's name and ID number.
    allow_insecure_endpoint: bool = False
    api_region: str | None = None
    api_language: str | None = None
    secret_id: SecretStr | None = Field(default=None, validation_alias=_tc("SECRET_ID"))
    secret_key: SecretStr | None = Field(default=None, validation_alias=_tc("SECRET_KEY"))
    session_token: SecretStr | None = Field(default=None, validation_alias=_tc("SESSION_TOKEN"))
    connect_timeout_s: PositiveFloat = 3.0
    # Tencent gives a URL image 3 s to download, then recognition; 30 s bounds a stuck call.
    total_timeout_s: PositiveFloat = 30.0
    max_connections: PositiveInt = 512

    # -- the shared quota
    qps: float = Field(default=5.0, ge=0)  # 0 switches the limiter off
    burst: PositiveInt = 1
    # A job that would wait longer than this for a slot is deferred in the database instead
    # of holding its broker message. Short, because a rate decrease after throttling only
    # affects slots booked after it: slots booked far ahead would keep overshooting.
    max_quota_wait_s: PositiveFloat = 10.0
    # Slots are booked at most this far ahead (worker.quota.horizon): after a throttle,
    # at most qps x horizon calls still go out at the old rate. Also how far ahead a limiter
    # state Redis lost may have booked: a fresh one starts after it (worker.quota.aimd).
    quota_horizon_s: PositiveFloat = 0.5
    # Least time left in a 1-second window after its last slot: a call whose transit runs
    # this much late still lands in its own window (worker.quota.aimd: Schedule). Changes
    # nothing up to qps 10, where even spacing already leaves it.
    quota_edge_margin_s: float = Field(default=0.05, ge=0, lt=0.5)
    rate_min_fraction: float = Field(default=0.2, gt=0, le=1)

    # -- retries
    max_attempts: PositiveInt = 6
    max_age_s: PositiveFloat = 86_400.0
    backoff_base_s: PositiveFloat = 2.0
    backoff_max_s: PositiveFloat = 300.0
    unknown_code_max_attempts: PositiveInt = 2
    db_write_retry_s: PositiveFloat = 600.0
    # A job whose attempts end with its worker lost this many times fails as
    # Internal.WorkerLost (a job that kills its worker must not cycle forever).
    max_worker_lost: PositiveInt = 3

    # FailedOperation.DownLoadError answers a URL job may get (its own budget, inside
    # max_attempts): Tencent could not fetch the URL, and more tries rarely change that.
    download_max_attempts: PositiveInt = 3

    # -- pre-flight and the URL fallback (worker.tencent.preflight, worker.tencent.fetch)
    # Shortest side an image must have. The reference states no pixel limit; a card's
    # smallest print (ID number, dates) needs about 200 px across the card's 54 mm height
    # to be legible at all, so below that a call is bought to be told nothing. 0: off.
    min_image_side_px: int = Field(default=200, ge=0)
    # A URL host name is resolved at submit to refuse one that leads to a private address;
    # a name that does not resolve in this time is accepted (Tencent resolves it, not us).
    url_resolve_timeout_s: PositiveFloat = 2.0
    # After download_max_attempts DownLoadErrors, fetch the URL ourselves and send the image
    # inline once. Off by default: fetching user-supplied URLs from inside the operator's
    # network is the operator's decision.
    url_fallback: bool = False
    url_fallback_timeout_s: PositiveFloat = 10.0
    # TESTS ONLY: lets image URLs and the fallback reach loopback addresses (test servers
    # listen on 127.0.0.1). Every other non-public address stays refused.
    url_allow_loopback: bool = False

    # -- personal data (worker.store.retention): how long each piece is kept
    # A succeeded job's card images and image URLs, after its success (0: at the first sweep).
    image_retention_s: float = Field(default=0.0, ge=0)
    # A failed job's images, URLs and kept answer: until then it can be replayed.
    failed_image_retention_s: float = Field(default=7 * 86_400.0, ge=0)
    # A result's personal fields, lookup hashes and portrait, after it was stored.
    result_retention_s: float = Field(default=90 * 86_400.0, ge=0)

    # -- the worker
    worker_concurrency: PositiveInt = 200
    worker_processes: PositiveInt = 1
    # Above the longest a message is held: quota wait + call + in-process DB retry.
    visibility_timeout_s: PositiveInt = 3_600
    lease_s: PositiveFloat = 120.0
    sweep_interval_s: PositiveFloat = 2.0
    # A queued job with no visible broker message for this long is published again.
    republish_after_s: PositiveFloat = 60.0
    circuit_probe_interval_s: PositiveFloat = 30.0
    # Image bytes (and the request body built from them) one worker process holds at once;
    # jobs wait for room, and a job larger than this runs alone.
    max_inflight_bytes: PositiveInt = 256 * 1024 * 1024
    # An answer larger than this is refused unread (transient): the largest real one is a
    # portrait (at most the 7 MB image, base64) plus a few short fields.
    max_response_bytes: PositiveInt = 16 * 1024 * 1024

    # The broker's Redis transport and Celery's consumer as worker.broker tunes them (fewer Redis
    # client objects, acks riding on the next delivery, task events in batches). False: both
    # as upstream ships them, for measuring what the tweaks buy, or after an upgrade.
    broker_tweaks: bool = True
    # -- decisions (worker.decision)
    # A card valid for at most this many more days on the day of reading is `card_expiring`
    # (0: never).
    expiry_warning_days: int = Field(default=30, ge=0, le=3650)
    # Younger on the day of reading: `age_below_minimum`.
    min_age: int = Field(default=0, ge=0, le=120)
    # The tenant `default`'s policy over the documented defaults, e.g.
    # `reject=tampered,photocopy;consider=glare;ignore=blurry`.
    warning_policy: str = ""
    # -- the HTTP API (`macao-ocr api`)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=1, le=65535)
    # New jobs get 429 when the tenant's backlog would take longer than this at `qps`.
    max_backlog_s: PositiveFloat = 86_400.0
    # A batch body above this is refused before it is read whole (one job's limit follows
    # from the image limits).
    http_max_batch_body_bytes: PositiveInt = 64 * 1024 * 1024
    # A server process remembers a valid API key this long: a revoked key may still be
    # accepted for up to this many seconds (0: looked up on every request).
    http_key_cache_s: float = Field(default=5.0, ge=0, le=60)

    # -- webhooks (worker/webhooks/)
    # Allow receivers on loopback/private/link-local addresses (tests, on-premise receivers).
    webhook_allow_private: bool = False
    webhook_timeout_s: PositiveFloat = 10.0
    # Exponential backoff with full jitter between attempts, for webhook_max_age_s (24 h).
    webhook_backoff_base_s: PositiveFloat = 5.0
    webhook_backoff_max_s: PositiveFloat = 3_600.0
    webhook_max_age_s: PositiveFloat = 86_400.0
    # Threads of the worker process that sends webhooks (its own queue and process).
    webhook_concurrency: PositiveInt = 16

    # -- operations
    log_level: str = "INFO"
    log_json: bool = True
    metrics_port: int = Field(default=9808, ge=0, le=65535)  # 0: no metrics server
    # Loopback unless opened on purpose (0.0.0.0 in a container, behind its network).
    metrics_host: str = "127.0.0.1"
    prometheus_multiproc_dir: str | None = None
    flower_user: str = "admin"
    flower_password: SecretStr | None = None
    flower_port: int = Field(default=5555, ge=1, le=65535)

    # -- personal data at rest (worker/privacy/)
    # The key ring `id1:base64key,id2:base64key` (first encrypts, all decrypt), or a file
    # holding it. Every process that stores or reads personal data needs one of them.
    data_keys: SecretStr | None = None
    data_keys_file: str | None = None
    # Base64 of 32 bytes: the HMAC key of `result.id_number_hash`. Unset: no lookup by ID
    # number (and no hash written). Several, comma-separated, while rotating: the first
    # hashes, all are searched (`keys rotate` hashes old rows again under the first).
    lookup_key: SecretStr | None = None

    @field_validator("api_endpoint")
    @classmethod
    def _endpoint_is_http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _database_url_known(cls, value: str) -> str:
        if not value.startswith(("postgresql", "sqlite")):
            raise ValueError("must be a postgresql:// or sqlite:/// URL")
        if value.startswith("postgresql://"):
            # psycopg 3 is the driver we ship.
            value = "postgresql+psycopg://" + value.removeprefix("postgresql://")
        return value

    @field_validator("warning_policy")
    @classmethod
    def _warning_policy_parses(cls, value: str) -> str:
        try:
            parse_policy_text(value)
        except PolicyError as exc:
            raise ValueError(str(exc)) from None
        return value

    @property
    def warning_policy_overrides(self) -> dict[str, Any]:
        """MACAO_OCR_WARNING_POLICY parsed (checked at load): code → Effect."""
        return dict(parse_policy_text(self.warning_policy))

    @field_validator("broker_url", "redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// URL")
        return value

    @model_validator(mode="after")
    def _endpoint_is_private_or_tls(self) -> Self:
        if self.allow_insecure_endpoint or not self.api_endpoint.startswith("http://"):
            return self
        if not is_loopback(urlsplit(self.api_endpoint).hostname or ""):
            raise ValueError(
                f"{env_name('api_endpoint')} is plain http:// to a host that is not loopback: "
                "card images and personal data would cross the network unencrypted; use "
                f"https:// or set {env_name('allow_insecure_endpoint')}=true"
            )
        return self

    @field_validator("lookup_key")
    @classmethod
    def _lookup_keys_are_32_bytes(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        for n, item in enumerate(value.get_secret_value().split(","), start=1):
            where = f"key {n}: " if "," in value.get_secret_value() else ""
            try:
                raw = base64.b64decode(item.strip(), validate=True)
            except ValueError:
                raise ValueError(f"{where}must be base64 (of 32 random bytes)") from None
            if len(raw) != LOOKUP_KEY_BYTES:
                raise ValueError(
                    f"{where}must be base64 of {LOOKUP_KEY_BYTES} bytes, not {len(raw)}"
                )
        return value

    @property
    def data_keys_configured(self) -> bool:
        return self.data_keys is not None or self.data_keys_file is not None

    def data_key_ring_text(self) -> str:
        """The key ring's text, from MACAO_OCR_DATA_KEYS or the file MACAO_OCR_DATA_KEYS_FILE
        names. ConfigError (one line naming both variables) when neither is set."""
        if self.data_keys is not None and self.data_keys.get_secret_value().strip():
            return self.data_keys.get_secret_value()
        if self.data_keys_file:
            try:
                with open(self.data_keys_file, encoding="utf-8") as handle:
                    text = handle.read()
            except OSError as err:
                raise ConfigError(
                    f"{env_name('data_keys_file')}: cannot read {self.data_keys_file} "
                    f"({err.strerror or type(err).__name__})"
                ) from None
            if text.strip():
                return text
            raise ConfigError(f"{env_name('data_keys_file')}: {self.data_keys_file} is empty")
        raise ConfigError(MISSING_KEYS)

    def lookup_key_bytes(self) -> bytes | None:
        """The current lookup key's 32 bytes (the first listed), or None (lookup off)."""
        keys = self.lookup_keys_bytes()
        return keys[0] if keys else None

    def lookup_keys_bytes(self) -> tuple[bytes, ...]:
        """Every lookup key, the current one first; empty when lookup by ID number is off."""
        if self.lookup_key is None:
            return ()
        text = self.lookup_key.get_secret_value()
        return tuple(base64.b64decode(item.strip()) for item in text.split(","))

    @property
    def state_redis_url(self) -> str:
        """Where the limiter, circuit and counters live."""
        return self.redis_url or self.broker_url

    @property
    def credentials_configured(self) -> bool:
        return self.secret_id is not None and self.secret_key is not None


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def env_name(field: str) -> str:
    """The environment variable a user sets for a field."""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the environment; errors name the variable to fix."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            # Never echo the offending value: it may be a secret.
            if not err["loc"]:
                # A check across fields: its message names the variables itself.
                problems.append(str(err["msg"]).removeprefix("Value error, "))
                continue
            problems.append(f"{env_name(str(err['loc'][0]))}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
