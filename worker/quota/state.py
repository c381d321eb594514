"""The shared quota state's Redis: how the limiter and the account circuit reach it.

Both fail closed: a Redis that does not answer quickly is treated as down, and the error
raised says what is unreachable without the URL (which may hold a password).
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.errors import StateUnavailable

# Short: a Redis that does not answer within this is treated as down (fail closed).
STATE_SOCKET_TIMEOUT_S = 1.0


def state_redis_kwargs() -> dict[str, Any]:
    """Connection options for limiter/circuit state: short timeouts, one quick retry."""
    return {
        "socket_timeout": STATE_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": STATE_SOCKET_TIMEOUT_S,
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 30,
    }


def state_redis(url: str) -> redis.asyncio.Redis:
    """An asyncio client for the shared state at `url` (settings.state_redis_url)."""
    return redis.asyncio.Redis.from_url(url, **state_redis_kwargs())


def unavailable(exc: BaseException, what: str) -> StateUnavailable:
    """The fail-closed error; names the failure's type only (a URL may hold a password)."""
    return StateUnavailable(f"{what} in Redis is unreachable ({type(exc).__name__})")


STATE_ERRORS = (redis.RedisError, OSError)
