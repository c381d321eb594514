"""The one settings class. Built in entry points (CLI, Celery app, emulator) and passed down.

Nothing here reads the environment at import time: `load_settings()` does, when called.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import ConfigError

DEFAULT_ENDPOINT = "https://ocr.intl.tencentcloudapi.com"
ENV_PREFIX = "MACAO_OCR_"

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
    tenant: str = "default"

    # -- the API
    api_endpoint: str = DEFAULT_ENDPOINT
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
    # at most qps x horizon calls still go out at the old rate.
    quota_horizon_s: PositiveFloat = 0.5
    rate_min_fraction: float = Field(default=0.2, gt=0, le=1)

    # -- retries
    max_attempts: PositiveInt = 6
    max_age_s: PositiveFloat = 86_400.0
    backoff_base_s: PositiveFloat = 2.0
    backoff_max_s: PositiveFloat = 300.0
    unknown_code_max_attempts: PositiveInt = 2
    db_write_retry_s: PositiveFloat = 600.0
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

    # -- operations
    log_level: str = "INFO"
    log_json: bool = True
    metrics_port: int = Field(default=9808, ge=0, le=65535)  # 0: no metrics server
    prometheus_multiproc_dir: str | None = None
    flower_user: str = "admin"
    flower_password: SecretStr | None = None
    flower_port: int = Field(default=5555, ge=1, le=65535)

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

    @field_validator("broker_url", "redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// URL")
        return value

    @property
    def state_redis_url(self) -> str:
        """Where the limiter, circuit and counters live."""
        return self.redis_url or self.broker_url

    @property
    def credentials_configured(self) -> bool:
        return self.secret_id is not None and self.secret_key is not None


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
            field = str(err["loc"][0]) if err["loc"] else "?"
            # Never echo the offending value: it may be a secret.
            problems.append(f"{env_name(field)}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
