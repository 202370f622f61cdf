"""Worker and client settings, read from CAI_* environment variables (pydantic-settings),
and the Redis connection made from them.

Knows time limits, lease timing and attempt limits; knows nothing about stages or
Celery's API (the app turns these values into Celery configuration).
"""

from __future__ import annotations

import os
from functools import lru_cache
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cai.errors import InputError


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAI_", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Broker, result backend and lease store.")
    max_attempts: int = Field(3, ge=1, description="Attempts per unit before the round is marked failed.")
    lease_ttl: float = Field(60.0, gt=0, description="Seconds a lease lives without a heartbeat.")
    shard_soft_time_limit: float = Field(3600.0, gt=0)
    shard_time_limit: float = Field(3900.0, gt=0, description="Hard limit: the pool kills the child.")
    train_soft_time_limit: float = Field(6 * 3600.0, gt=0)
    train_time_limit: float = Field(6 * 3600.0 + 900, gt=0)
    visibility_timeout: float | None = Field(None, description="Default: the longest hard time limit + 15 minutes.")
    allow_short_visibility_timeout: bool = Field(False, description="Fault tests only: allow a visibility timeout below a hard time limit.")
    unacked_restore_interval: int = Field(10, ge=1, description="Kombu's sweep for messages past the visibility timeout.")
    unacked_restore_throttle: int = Field(10, ge=1)
    reconcile_interval: float = Field(60.0, gt=0, description="Seconds between a worker's checks for lost work.")
    requeue_after: float = Field(3600.0, gt=0, description="A queued unit not picked up within this is sent again.")
    busy_retry_max: float = Field(300.0, gt=0, description="Longest wait before re-checking a unit another worker holds.")
    error_retry_delay: float = Field(5.0, ge=0, description="Wait before retrying a unit that raised.")
    soft_shutdown_timeout: float = Field(60.0, ge=0, description="On a second Ctrl-C/TERM, seconds running tasks get before a cold shutdown.")

    @property
    def heartbeat(self) -> float:
        return max(0.2, self.lease_ttl / 3)

    @property
    def effective_visibility_timeout(self) -> float:
        longest = max(self.shard_time_limit, self.train_time_limit)
        return self.visibility_timeout if self.visibility_timeout is not None else longest + 900

    @model_validator(mode="after")
    def _limits(self) -> "WorkerSettings":
        if self.shard_soft_time_limit >= self.shard_time_limit or self.train_soft_time_limit >= self.train_time_limit:
            raise ValueError("soft time limits must be below the hard time limits")
        longest = max(self.shard_time_limit, self.train_time_limit)
        if self.effective_visibility_timeout <= longest and not self.allow_short_visibility_timeout:
            raise ValueError(f"CAI_VISIBILITY_TIMEOUT ({self.effective_visibility_timeout:g}s) must exceed the longest hard "
                             f"time limit ({longest:g}s), or Redis hands running tasks to a second worker")
        return self


@lru_cache(maxsize=1)
def settings() -> WorkerSettings:
    from pydantic import ValidationError

    try:
        return WorkerSettings()
    except ValidationError as e:
        raise InputError([f"worker settings: {('CAI_' + str(x['loc'][0]).upper()) if x['loc'] else 'CAI_*'}: "
                          f"{x['msg'].removeprefix('Value error, ')}" for x in e.errors()]) from None


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


_clients: dict = {}


def redis_client():
    """One client per process (a forked pool child makes its own)."""
    import redis

    key = (os.getpid(), settings().redis_url)
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(settings().redis_url, socket_connect_timeout=5, socket_timeout=30,
                                             health_check_interval=30, decode_responses=True)
    return _clients[key]


def ping() -> None:
    """Raise InputError (one line) when Redis doesn't answer."""
    import redis

    url = settings().redis_url
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5).ping()
    except redis.RedisError as e:
        raise InputError(f"redis at {redacted(url)}: not answering ({e.__class__.__name__}: {str(e).splitlines()[0][:120]}); "
                         "start redis-server or set CAI_REDIS_URL") from None
