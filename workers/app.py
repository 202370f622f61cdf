"""The Celery app: Redis broker and result backend from CAI_REDIS_URL, JSON only,
late acks, one message at a time. (The tasks and each worker's reconcile thread are in
workers.tasks, which imports this; this imports nothing of the service.)

Why these settings (checked against celery 5.7 / redis 7, see issue 5): Celery over
Redis delivers at least once. acks_late + reject_on_worker_lost keep a message whose
worker died; the visibility timeout is set above the longest hard time limit so a
running task is not handed to a second worker in normal operation (it can still
happen, and workers.service makes that harmless); cancelling long-running tasks on a
connection loss is pinned off, because with it on a Redis restart left tasks REVOKED
and lost. Knows settings and queue names; the work itself is in workers.service.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from workers import keys
from workers.settings import settings

S = settings()
VISIBILITY_TIMEOUT = S.effective_visibility_timeout

app = Celery("cai", broker=S.redis_url, backend=S.redis_url, include=["workers.tasks"])
app.conf.update(
    broker_transport="workers.transport:Transport",  # kombu's Redis transport that drops undecodable messages
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],         # a pickle (or any other) message is refused before decoding
    result_accept_content=["json"],
    event_serializer="json",
    task_acks_late=True,
    task_reject_on_worker_lost=True,  # the service's attempt counter bounds the re-runs
    task_acks_on_failure_or_timeout=True,  # a task that raised or hit its hard limit: the reconciler re-queues it
    worker_prefetch_multiplier=1,
    task_track_started=True,
    worker_cancel_long_running_tasks_on_connection_loss=False,
    worker_soft_shutdown_timeout=S.soft_shutdown_timeout,
    worker_enable_soft_shutdown_on_idle=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "unacked_restore_interval": S.unacked_restore_interval,
        "unacked_restore_throttle": S.unacked_restore_throttle,
    },
    result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    result_expires=7 * 24 * 3600,
    # each queue its own direct exchange and routing key: a message reaches exactly one queue
    task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in keys.QUEUES],
    task_default_queue=keys.CPU,
    task_default_exchange=keys.CPU,
    task_default_routing_key=keys.CPU,
    worker_send_task_events=True,    # for Flower
    task_send_sent_event=True,
)
