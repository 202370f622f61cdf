"""The one narrow door from the `cai` command into the queue: everything the CLI asks of
Redis, the service and the workers goes through here, so `cai` imports nothing else of
`workers` (and nothing of celery until a queue command runs).

Knows which workers module does what; holds no logic of its own.
"""

from __future__ import annotations

from workers import keys, local, progress, service
from workers.settings import ping, safe_url, settings

QUEUES = keys.QUEUES
status = progress.status
list_rounds = progress.list_rounds
cancel = service.cancel
resume = service.resume
redis_answers = local.redis_answers
start_redis = local.start_redis
start_worker = local.start_worker
wait_ready = local.wait_ready
stop = local.stop

__all__ = ["QUEUES", "status", "list_rounds", "cancel", "resume", "submit", "ping", "redis_url", "safe_url",
           "run_worker", "redis_answers", "start_redis", "start_worker", "wait_ready", "stop"]


def submit(cfg, force: bool = False) -> str:
    """Validate a RoundConfig, write the round into the store and queue it; its id. `force`
    lets a gated round be the parent."""
    return service.submit(cfg, force=force)


def redis_url() -> str:
    return settings().redis_url


def run_worker(queues: list[str], concurrency: int, hostname: str, loglevel: str) -> None:
    """`celery worker` with cai's app, in this process (returns when the worker stops)."""
    from workers.app import app

    app.worker_main(["worker", "--queues", ",".join(queues), "--concurrency", str(concurrency), "--pool", "prefork",
                     "--loglevel", loglevel, "--hostname", hostname])
