"""Worker and client settings, read from CAI_* environment variables (pydantic-settings),
and the Redis connection made from them.

Knows time limits, lease timing and attempt limits; knows nothing about stages or
Celery's API (the app turns these values into Celery configuration).
"""

from __future__ import annotations

import os
from functools import lru_cache

from pydantic import Field, field_validator, model_validator
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
    store: str | None = Field(None, description="CAI_STORE: the shared store's root (cai.store reads it); absolute.")

    @field_validator("store")
    @classmethod
    def _absolute_store(cls, v: str | None) -> str | None:
        """A relative CAI_STORE names a different folder in every process started elsewhere (a
        worker's folder is not the client's), so rounds would be written where workers never look."""
        if v and not os.path.isabs(os.path.expanduser(v)):
            raise ValueError(f"{v!a} is a relative path; the client and every worker must name the same store "
                             "from wherever they start, so give an absolute path (e.g. /mnt/cai-store)")
        return v

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


REDIS_SCHEMES = ("redis", "rediss")


@lru_cache(maxsize=1)
def settings() -> WorkerSettings:
    from pydantic import ValidationError

    try:
        s = WorkerSettings()
    except ValidationError as e:
        raise InputError([f"worker settings: {('CAI_' + str(x['loc'][0]).upper()) if x['loc'] else 'CAI_*'}: "
                          f"{x['msg'].removeprefix('Value error, ')}" for x in e.errors()]) from None
    scheme = s.redis_url.split("://", 1)[0] if "://" in s.redis_url else ""
    if scheme not in REDIS_SCHEMES:  # Celery (kombu) and redis-py both take these two, nothing else in common
        shown = f"scheme {scheme!a}" if scheme.isascii() and scheme.replace("+", "").isalnum() and len(scheme) < 20 else "scheme"
        raise InputError(f"worker settings: CAI_REDIS_URL: not a Redis URL ({shown if scheme else 'no scheme'}); "
                         "write redis://[:PASSWORD@]HOST:PORT/DB (or rediss:// for TLS)")
    return s


_HIDDEN_URL = "(redis URL not shown: it may hold the password)"


def safe_url(url: str) -> str:
    """The URL as it may be shown: kombu's sanitizer (password masked, query dropped).

    Kombu returns a string without '://' unchanged, and parses an unencoded '/', '#', '?'
    or '@' in a password differently from redis-py; so what it gives back is checked for
    every piece of text that could be the password, and then shown without credentials,
    or not at all."""
    from kombu.utils.url import as_url, maybe_sanitize_url, url_to_parts

    if not isinstance(url, str) or "://" not in url:
        return _HIDDEN_URL
    secrets = _url_secrets(url)

    def clean(shown: str) -> bool:
        from urllib.parse import unquote

        return not any(s in shown or s in unquote(shown) for s in secrets)

    try:
        shown = maybe_sanitize_url(url)
        if clean(shown):
            return shown
        p = url_to_parts(url)
        shown = as_url(p.scheme, p.hostname, p.port, path=p.path)  # no user, no password, no query
        return shown if clean(shown) else _HIDDEN_URL
    except Exception:  # a URL kombu can't even parse: show no part of it
        return _HIDDEN_URL


def _url_secrets(url: str) -> set[str]:
    """Every text in url that could be (part of) a password, raw and %-decoded: the
    userinfo after its first ':' (all of it when there is no ':', a password written
    where the user goes), ?password= values, redis-py's reading, and their pieces
    between the characters that cut an unencoded password apart."""
    import re
    from urllib.parse import unquote

    rest = url.split("://", 1)[1]
    found: set[str] = set()
    if "@" in rest:
        userinfo = rest.rsplit("@", 1)[0]
        found.add(userinfo.split(":", 1)[1] if ":" in userinfo else userinfo)
    found.update(m.group(1) for m in re.finditer(r"(?i)password=([^&]*)", url))
    try:
        from redis.connection import parse_url

        found.add(parse_url(url).get("password") or "")
    except Exception:  # noqa: BLE001 - redis-py can't read it: the raw pieces above stand
        pass
    for s in list(found):
        found.add(unquote(s))
        found.update(piece for piece in re.split(r"[/#?@:&=]", s) if len(piece) >= 3)
    return {s for s in found if s}


_clients: dict = {}


def redis_client():
    """One client per process (a forked pool child makes its own)."""
    import redis

    key = (os.getpid(), settings().redis_url)
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(settings().redis_url, socket_connect_timeout=5, socket_timeout=30,
                                             health_check_interval=30, decode_responses=True)
    return _clients[key]


_AUTH_MARKS = ("NOAUTH", "WRONGPASS", "invalid password", "Authentication required", "invalid username-password",
               "without any password configured", "no password is set")


def _refusal(url: str, timeout: float) -> tuple[str, str] | None:
    """None when Redis at url answers a PING, else (kind, why): kind is "url" (unparseable,
    no text of it shown: it may hold the password), "auth" or "down"."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout * 2)
    except Exception as e:  # noqa: BLE001 - ValueError/TypeError/...; their text can quote the password
        return "url", type(e).__name__
    try:
        client.ping()
        return None
    except redis.RedisError as e:
        text = str(e).splitlines()[0][:120] if str(e) else ""
        for secret in sorted(_url_secrets(url), key=len, reverse=True):  # e.g. a host read out of an unencoded password
            text = text.replace(secret, "**")
        auth = isinstance(e, redis.AuthenticationError) or any(m.lower() in text.lower() for m in _AUTH_MARKS)
        return ("auth" if auth else "down"), f"{e.__class__.__name__}: {text}"
    except ValueError as e:  # e.g. a db number redis-py only checks when it connects
        return "url", type(e).__name__
    finally:
        client.close()


def answers(url: str, timeout: float = 2.0) -> str | None:
    """None when Redis at url answers a PING, else why not (one line, no secrets)."""
    refused = _refusal(url, timeout)
    return refused and refused[1]


def ping() -> None:
    """Raise InputError (one line) when Redis doesn't answer, saying what to fix."""
    url = settings().redis_url
    refused = _refusal(url, 2.0)
    if refused is None:
        return
    kind, why = refused
    if kind == "url":
        raise InputError(f"CAI_REDIS_URL: not a valid Redis URL ({why}); write redis://[:PASSWORD@]HOST:PORT/DB "
                         "with any '/', '#', '?' or '@' in the password %-encoded")
    if kind == "auth":
        raise InputError(f"redis at {safe_url(url)}: refused the login ({why}); the password in CAI_REDIS_URL is wrong "
                         "or missing (or set where the server has none): set CAI_REDIS_URL=redis://:PASSWORD@HOST:PORT/DB")
    raise InputError(f"redis at {safe_url(url)}: not answering ({why}); start redis-server or set CAI_REDIS_URL")
