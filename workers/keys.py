"""Every queue name, task name and Redis key the service uses, in one place.

Knows names only: what a key holds is documented here, how it is used lives in
`lease` and `service`. Kombu's own keys (the queue lists named below, `unacked`,
`unacked_index`, `_kombu.binding.*`) and Celery's result keys (`celery-task-meta-*`)
sit beside ours in the same Redis database.
"""

from __future__ import annotations

# ---- queues, by resource (each stage's row in cai.stages names its queue)
GENERATE = "generate"  # needs the accelerator: generating stages' shards
TRAIN = "train"        # needs the accelerator: training stages
CPU = "cpu"            # the rest; a worker may consume it
QUEUES = (GENERATE, TRAIN, CPU)


# ---- task names (the client sends by name and never imports the task module)
TASK_SHARD = "cai.shard"          # (round_id, stage, shard): a unit of a sharded stage
TASK_TRAIN = "cai.train"          # (round_id, stage): a whole-stage unit (training)

# ---- Redis keys (all ours start with "cai:")
ACTIVE = "cai:active"          # set of round ids that are neither finished nor failed nor cancelled
RECONCILER = "cai:reconciler"  # lock (SET NX EX) so one worker in the cluster reconciles per interval


def round_state(round_id: str) -> str:
    """Hash {status, error, updated, durable}: mirror of the round's durable status
    (work/status.json); also {store, store_id}: the store it was submitted to (its root as
    the submitter saw it, and its identity); {stalled, merge_failures}: why merging its
    finished stages fails now (a full disk) and how often it did; {broken}: why the
    reconciler could not read it."""
    return f"cai:round:{round_id}"


def unseen(round_id: str) -> str:
    """String with a TTL: a worker could not find the round in its store (a CAI_STORE that
    is not the submitter's): what it said, shown by `round status` and `watch`."""
    return f"cai:unseen:{round_id}"


def waiting(round_id: str, unit: str) -> str:
    """String: what the unit's holder is waiting on (a server request, since when), with the lease's TTL."""
    return f"cai:waiting:{round_id}:{unit}"


def lease(round_id: str, unit: str) -> str:
    """String "<token>|<worker>|<task id>|<started>" with a TTL, renewed by the holder's heartbeat."""
    return f"cai:lease:{round_id}:{unit}"


def fence(round_id: str, unit: str) -> str:
    """Counter (INCR) issuing the unit's fencing tokens; the highest token is the current one."""
    return f"cai:fence:{round_id}:{unit}"


def queued(round_id: str, unit: str) -> str:
    """Marker (SET NX EX) that a message for the unit was sent and not yet picked up."""
    return f"cai:queued:{round_id}:{unit}"


def attempts(round_id: str) -> str:
    """Hash unit -> attempts started (mirrored in the round folder's work/attempts/)."""
    return f"cai:attempts:{round_id}"


def manifest_lock(round_id: str) -> str:
    """Mutex (SET NX PX) around read-modify-write of the round's manifest.json and status."""
    return f"cai:lock:{round_id}:manifest"


def events(round_id: str) -> str:
    """List of JSON events (submitted, started, busy, committed, discarded, error, failed...), capped."""
    return f"cai:events:{round_id}"

