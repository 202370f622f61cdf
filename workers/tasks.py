"""Celery tasks and the worker's reconcile thread: thin wrappers that turn a message (round id, stage, shard) into a call to
workers.service.work, and its answer into a return value or a retry.

Each pool process keeps one ModelCache for its life, so consecutive units with the same
model spec don't reload it, and imports torch and transformers when it starts. Time
limits are per task (shards vs training).
"""

from __future__ import annotations

import logging
import threading

from celery import signals

from cai.models import ModelCache
from cai.plan import Unit
from workers import keys, service
from workers.app import S, app

CACHE = ModelCache()
log = logging.getLogger("cai.worker")


@signals.worker_ready.connect
def _start_reconciler(sender=None, **_) -> None:
    """Every reconcile_interval, re-queue lost work of active rounds (one worker per interval)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(S.reconcile_interval):
            try:
                sent = {k: v for k, v in service.reconcile_all().items() if v}
                if sent:
                    log.warning("reconciler re-queued %s", sent)
            except Exception as e:  # Redis away, a round folder half-written...: try again next time
                log.warning("reconciler: %s: %s", type(e).__name__, e)

    threading.Thread(target=loop, name="cai-reconciler", daemon=True).start()
    signals.worker_shutting_down.connect(lambda **_: stop.set(), weak=False)


_warming: threading.Thread | None = None


@signals.worker_process_init.connect
def _warm_up(**_) -> None:
    """Import the heavy libraries in the background as soon as a pool process starts, so
    the first unit doesn't wait for them (not in the parent: torch must not be imported
    before the fork). A unit waits for this to finish: two threads importing one package
    at once can see it half-initialized."""
    global _warming

    def imports() -> None:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
            from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (transformers imports lazily)
        except ImportError:
            pass  # the unit that needs them will say so

    _warming = threading.Thread(target=imports, name="cai-warm-up", daemon=True)
    _warming.start()


def _run(task, round_id: str, unit: Unit) -> dict:
    if _warming is not None:
        _warming.join()
    out = service.work(round_id, unit, CACHE, worker=task.request.hostname or "?", task_id=task.request.id or "")
    if out.retry_in is not None:
        raise task.retry(countdown=out.retry_in)
    return {"round": round_id, "unit": unit.key, "result": out.result}


@app.task(name=keys.TASK_SHARD, bind=True, max_retries=None,
          soft_time_limit=S.shard_soft_time_limit, time_limit=S.shard_time_limit)
def run_shard(self, round_id: str, stage: str, shard: int) -> dict:
    return _run(self, round_id, Unit(stage=stage, shard=shard))


@app.task(name=keys.TASK_TRAIN, bind=True, max_retries=None,
          soft_time_limit=S.train_soft_time_limit, time_limit=S.train_time_limit)
def run_train(self, round_id: str, stage: str) -> dict:
    return _run(self, round_id, Unit(stage=stage))
