"""The round service: submit, work on a unit exactly once, advance, reconcile, cancel,
resume. (Reading a round's status is workers.progress.)

Celery over Redis delivers a message at least once; this module makes each unit's output
exactly-once. The store (round folders) is the durable truth: a present output means a
unit is done, and work/status.json says whether a round failed or was cancelled. Redis
holds the messages and what is live: leases with fencing tokens (workers.lease),
attempt counts (mirrored in work/attempts/), markers of what is queued, events.

A unit is worked like this (`work`): drop it if the round is over; skip it if its output
exists; take the lease or, if another holder's lease is live, come back later; count
the attempt and give up on the round after N; run it with a heartbeat, committing only
while the lease is the newest; then `advance` the round: merge finished stages and queue
the units whose inputs are now present. `advance` is also the reconciler: every worker
runs it periodically for the active rounds (re-queueing work whose worker died or whose
message went missing), and `resume` runs it with force. Nothing waits on chords.

Knows the store, cai.rounds, Redis keys and how to send a task by name; does not import
the task module or run a worker.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cai import plan, rounds, server, store
from cai.models import ModelCache
from cai.stages import ROW
from cai.errors import InputError
from cai.manifest import write_manifest
from workers import faults, keys
from workers.lease import Lease, parse
from workers.settings import redis_client, settings

TERMINAL = ("failed", "cancelled")
FINISHED = ("succeeded", "gated")  # gated: every stage done, but the evaluation failed its gate
STATUS_FILE = Path("work") / "status.json"
KEEP_S = 7 * 24 * 3600  # how long a finished round's events and attempt counts stay in Redis


# ---------------------------------------------------------------- durable round status


@contextmanager
def manifest_lock(round_id: str, ttl: float = 30.0, wait: float = 60.0):
    """redis-py's Lock around read-modify-write of a round's manifest and status. After
    `wait` seconds it goes ahead anyway: a stuck holder must not stop the round (its TTL
    would have expired by then)."""
    from redis.exceptions import LockError

    lock = redis_client().lock(keys.manifest_lock(round_id), timeout=ttl, blocking_timeout=wait)
    got = lock.acquire()
    try:
        yield
    finally:
        if got:
            try:
                lock.release()
            except LockError:
                pass  # expired meanwhile: nothing to release


def durable_status(rd: Path) -> dict:
    p = rd / STATUS_FILE
    return store.read_json(p) if p.exists() else {}


def is_over(rd: Path) -> bool:
    """The round failed or was cancelled: in the store, or (when the store could not be
    written, e.g. a full disk) in Redis, where set_status recorded it first."""
    if durable_status(rd).get("status") in TERMINAL:
        return True
    return redis_client().hget(keys.round_state(rd.name), "status") in TERMINAL


def set_status(round_id: str, status: str, error: str | None = None) -> None:
    """Record the round's status in Redis, then in the store (manifest, then the status file:
    whoever sees the status file, the commit point, also sees the manifest).

    A store that can't be written (a full disk) leaves the status in Redis only, flagged
    `durable: 0`, and the round stays active: the reconciler writes it once it can."""
    rd = store.round_path(round_id)
    r = redis_client()
    r.hset(keys.round_state(round_id), mapping={"status": status, "error": error or "", "updated": time.time(), "durable": 0})
    try:
        with manifest_lock(round_id):
            write_manifest(rd, extra={"status": status, "error": error})
            store.write_json(rd / STATUS_FILE, {"status": status, "error": error, "at": time.time()})
    except OSError as e:
        r.sadd(keys.ACTIVE, round_id)
        event(round_id, "status-not-written", status=status, error=f"{type(e).__name__}: {e}")
        return
    r.hset(keys.round_state(round_id), "durable", 1)
    if status in TERMINAL or status in FINISHED:
        r.srem(keys.ACTIVE, round_id)
    else:
        r.sadd(keys.ACTIVE, round_id)
    event(round_id, status, error=error)
    if status in FINISHED:  # every output is in the store: Redis keeps only a week of history
        fences = list(r.scan_iter(keys.fence(round_id, "*")))
        if fences:
            r.delete(*fences)
        for key in (keys.round_state(round_id), keys.attempts(round_id), keys.events(round_id)):
            r.expire(key, KEEP_S)


def _mark_running(round_id: str, rd: Path) -> None:
    """queued -> running, once the first unit starts; never over a status set meanwhile (a
    failure or cancel from another worker), hence the check under the manifest's lock."""
    try:
        with manifest_lock(round_id):
            if durable_status(rd).get("status") != "queued":
                return
            write_manifest(rd, extra={"status": "running", "error": None})
            store.write_json(rd / STATUS_FILE, {"status": "running", "error": None, "at": time.time()})
    except OSError:
        return  # cosmetic: the round runs either way
    redis_client().hset(keys.round_state(round_id), mapping={"status": "running", "updated": time.time(), "durable": 1})


def event(round_id: str, kind: str, **data) -> None:
    r = redis_client()
    r.rpush(keys.events(round_id), json.dumps({"t": round(time.time(), 3), "event": kind, **data}))
    r.ltrim(keys.events(round_id), -2000, -1)


def events(round_id: str) -> list[dict]:
    return [json.loads(x) for x in redis_client().lrange(keys.events(round_id), 0, -1)]


# ---------------------------------------------------------------- submitting and advancing


def submit(cfg, force: bool = False) -> str:
    """Validate and write a new round (a cai.config.RoundConfig) into the store, then queue
    its first units.

    The round is prepared in a hidden temp folder beside its final place and moved in
    only when every input is valid, so bad input leaves nothing in the store or queues.
    """
    from workers.settings import ping

    ping()
    identity = store.store_identity(create=True)
    round_id = store.new_round_id()
    target = store.round_path(round_id, must_exist=False)
    tmp = store.tmp_dir_beside(target)
    try:
        rounds.prepare(tmp, cfg, round_id=round_id, force=force)  # force: a gated parent is allowed
        override = _forced_parent(tmp, cfg, force)
        if not store.commit_dir(tmp, target):
            raise InputError(f"round {round_id}: already in the store")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # which store the round is in, so a worker that can't find it can say it looks in another one
    redis_client().hset(keys.round_state(round_id), mapping={"store": str(store.store_root()), "store_id": identity or ""})
    set_status(round_id, "queued")
    event(round_id, "submitted", parent=cfg.parent, **({"forced_parent": override} if override else {}))
    advance(round_id)
    return round_id


PARENT_OVERRIDE = Path("inputs") / "parent_override.json"  # a gated parent taken with --force


def _forced_parent(rd: Path, cfg, force: bool) -> dict | None:
    """With --force over a parent that ended gated: the override, written into the round
    (inputs/parent_override.json: the parent, why its gate failed, when) and returned."""
    if not (force and cfg.parent):
        return None
    from cai.evaluate import gate_failures

    reasons = gate_failures(store.round_path(cfg.parent))
    if not reasons:
        return None
    override = {"parent": cfg.parent, "forced": True, "parent_gate_failures": reasons, "at": time.time()}
    store.write_json(rd / PARENT_OVERRIDE, override)
    return override


def enqueue(round_id: str, unit: plan.Unit, force: bool = False) -> bool:
    """Send the unit's message unless its lease is live, or (unless forced) one was sent
    recently and not yet picked up."""
    from workers.app import app

    r = redis_client()
    if r.exists(keys.lease(round_id, unit.key)):
        return False
    if not r.set(keys.queued(round_id, unit.key), time.time(), nx=not force, ex=int(settings().requeue_after)):
        return False
    row = ROW[unit.stage]
    queue = plan.queue_of(plan.load_config(store.round_path(round_id)), unit.stage)
    if row.sharded:
        app.send_task(keys.TASK_SHARD, args=[round_id, unit.stage, unit.shard], queue=queue)
    else:
        app.send_task(keys.TASK_TRAIN, args=[round_id, unit.stage], queue=queue)
    return True


def advance(round_id: str, force: bool = False) -> list[str]:
    """Merge the stages whose shards are all present, mark the round succeeded when every
    stage is, else queue the units whose inputs are present and that have no live lease.
    Returns the units queued. With force (`resume`) a unit is re-sent even if one was
    sent recently."""
    rd = store.round_path(round_id)
    cfg = plan.load_config(rd)
    st = redis_client().hgetall(keys.round_state(round_id))
    if st.get("durable") == "0" and st.get("status"):  # the store could not be written then: try again now
        set_status(round_id, st["status"], st.get("error") or None)
    with manifest_lock(round_id):  # merges rewrite the manifest: not while the status changes
        if is_over(rd):
            return []
        stuck = _merge(rd, cfg)
        finished = stuck is None and plan.finished(rd, cfg)
    if stuck is not None:
        return _merge_failed(round_id, *stuck)
    _merged(round_id)
    if finished:
        if durable_status(rd).get("status") not in FINISHED:
            from cai.evaluate import gate_failures

            failed = gate_failures(rd)  # the evaluate stage's gate, when the round has one
            set_status(round_id, "gated" if failed else "succeeded", "; ".join(failed) if failed else None)
        return []
    sent = [u.key for u in plan.runnable(rd, cfg) if enqueue(round_id, u, force=force)]
    if sent:
        event(round_id, "queued", units=sent, force=force)
    return sent


def _merge(rd: Path, cfg) -> tuple[str, OSError] | None:
    """Merge every stage whose shards are all present; (stage, error) when the store refuses
    a write (a full disk, a permission), None when all went through."""
    for stage in cfg.stages:
        try:
            rounds.finalize(rd, stage)
        except OSError as e:
            return stage, e
    return None


def _os_error(e: OSError) -> str:
    """An OSError as one line: 'OSError 28: No space left on device (path)'."""
    where = f" ({e.filename})" if e.filename else ""
    return f"{type(e).__name__} {e.errno}: {e.strerror or e}{where}" if e.errno else f"{type(e).__name__}: {e}{where}"


def _merge_failed(round_id: str, stage: str, e: OSError) -> list[str]:
    """A merge the store refused: shown in status and watch at once (the round's `stalled`),
    counted, and after max_attempts the round fails with the reason, as a unit's would."""
    r = redis_client()
    why = f"merging {stage} failed: {_os_error(e)}"
    n = r.hincrby(keys.round_state(round_id), "merge_failures", 1)
    r.hset(keys.round_state(round_id), "stalled", f"{why} (attempt {n} of {settings().max_attempts})")
    event(round_id, "merge-failed", stage=stage, attempt=n, error=why)
    if n >= settings().max_attempts:
        fail(round_id, f"{why}; gave up after {n} attempts: free space (or fix the store), then `cai round resume {round_id}`")
    return []


def _merged(round_id: str) -> None:
    """The merges went through: what an earlier failed merge or read recorded is no longer true."""
    redis_client().hdel(keys.round_state(round_id), "stalled", "merge_failures", "broken")


UNSEEN_KEEP_S = 300  # a worker's "can't find this round" is shown this long after it last said so


def unseen(round_id: str, by: str) -> str | None:
    """A round that `by` (a worker) can't find in its store. When Redis says it was submitted
    to a store with another identity (the worker's CAI_STORE is not the client's: a relative
    path, a wrong mount), say so where `round status` and `watch` show it and return the
    line; None when it was submitted to this very store (so it was removed from it) or
    never submitted at all (a forged id)."""
    try:
        store.check_round_id(round_id)
    except InputError:
        return None
    r = redis_client()
    root, identity = r.hmget(keys.round_state(round_id), "store", "store_id")
    if root is None:
        return None
    mine = store.store_identity()
    if identity and identity == mine:
        return None
    why = (f"{by} can't find round {round_id} in its store {store.store_root()} "
           f"({'another store' if mine else 'no cai store there'}); it was submitted to the store at {root} "
           "(as the submitter sees it): start every worker with CAI_STORE naming that same store (an absolute path "
           "to the same mount)")
    r.set(keys.unseen(round_id), why, ex=max(UNSEEN_KEEP_S, int(3 * settings().reconcile_interval)))
    event(round_id, "unseen", worker=by, error=why)
    return why


def reconcile_all() -> dict:
    """The periodic check: every active round re-queues work with no output, no live lease
    and no recent message. One worker of the cluster does it per interval."""
    r = redis_client()
    interval = settings().reconcile_interval
    if not r.set(keys.RECONCILER, socket.gethostname(), nx=True, px=int(interval * 1000 * 0.9)):
        return {}
    out: dict = {}
    for round_id in sorted(r.smembers(keys.ACTIVE)):
        try:
            store.round_path(round_id)
        except InputError:
            if unseen(round_id, f"the reconciler on {socket.gethostname()}") is None:
                r.srem(keys.ACTIVE, round_id)  # gone from the store (kept while it is in a store this worker doesn't see)
            continue
        try:
            out[round_id] = advance(round_id)
        except Exception as e:  # one unreadable round (corrupt, unreadable, older schema) must not stop the others
            out[round_id] = []
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if r.hget(keys.round_state(round_id), "broken") != why:
                r.hset(keys.round_state(round_id), "broken", why)
                event(round_id, "broken", error=why)
    return out


# ---------------------------------------------------------------- working on a unit


@dataclass
class Outcome:
    result: str  # committed | done | discarded | busy | error | failed | dropped
    retry_in: float | None = None


def attempts_file(rd: Path, unit: plan.Unit) -> Path:
    return rd / "work" / "attempts" / (unit.key.replace("/", "-") + ".json")


def _count_attempt(round_id: str, rd: Path, unit: plan.Unit, worker: str) -> tuple[int, dict, str | None]:
    """Count an attempt in Redis, then in the round folder; the larger count wins, so losing
    Redis doesn't reset it. Only the lease holder calls this. Returns the attempt number,
    the record, and why the record could not be written (a full disk), if so: the count in
    Redis stands either way, so the attempt limit holds."""
    r = redis_client()
    path = attempts_file(rd, unit)
    rec = store.read_json(path) if path.exists() else {"unit": unit.key, "attempts": 0, "history": []}
    n = r.hincrby(keys.attempts(round_id), unit.key, 1)
    if n <= rec["attempts"]:
        n = rec["attempts"] + 1
        r.hset(keys.attempts(round_id), unit.key, n)
    rec["attempts"] = n
    rec["history"].append({"attempt": n, "worker": worker, "started": time.time()})
    try:
        store.write_json(path, rec)
    except OSError as e:
        return n, rec, f"{type(e).__name__}: {e}"
    return n, rec, None


def _end_attempt(rd: Path, unit: plan.Unit, rec: dict, result: str, error: str | None = None) -> None:
    rec["history"][-1].update({"ended": time.time(), "result": result, **({"error": error} if error else {})})
    try:
        store.write_json(attempts_file(rd, unit), rec)
    except OSError:
        pass  # a full disk: the attempt is counted in Redis and its error is in the events


def check_unit(rd: Path, cfg, unit: plan.Unit) -> str | None:
    """Why a message's unit is not one of this round's planned units, or None."""
    if unit.stage not in cfg.stages:
        return f"stage {unit.stage!r} is not in this round's plan ({', '.join(cfg.stages)})"
    if ROW[unit.stage].sharded != (unit.shard is not None):
        return f"stage {unit.stage} is {'sharded' if ROW[unit.stage].sharded else 'not sharded'}; the message says otherwise"
    if unit.shard is not None and not (0 <= unit.shard < plan.n_shards(rd, cfg, unit.stage)):
        return f"shard {unit.shard} is out of range for {unit.stage} (0..{plan.n_shards(rd, cfg, unit.stage) - 1})"
    return None


def _why_failed(rec: dict) -> str:
    last = rec["history"][-2] if len(rec["history"]) > 1 else {}
    if last.get("error"):
        return last["error"]
    return f"the worker running it ({last.get('worker', '?')}) died without reporting an error (killed, out of memory, or over its hard time limit)"


def work(round_id: str, unit: plan.Unit, cache: ModelCache, worker: str, task_id: str) -> Outcome:
    """One delivery of one unit's message. The caller retries after `retry_in` when set."""
    s = settings()
    r = redis_client()
    try:
        rd = store.round_path(round_id)
    except InputError:  # removed from the store, no id at all, or in a store this worker doesn't see
        if unseen(round_id, worker) is not None:
            r.delete(keys.queued(round_id, unit.key))  # so a worker that sees the round is sent it again
        return Outcome("dropped")
    try:
        cfg = plan.load_config(rd)
    except InputError:
        return Outcome("dropped")  # an unreadable round (the reconciler reports it as broken)
    why = check_unit(rd, cfg, unit)
    if why:  # a forged or stale message: no effect on the round at all
        event(round_id, "rejected", unit=f"{unit.stage}/{unit.shard}"[:80], worker=worker, error=why)
        return Outcome("dropped")
    if is_over(rd):  # (a finished round is immutable: its planned units are all done, so they stop below)
        event(round_id, "dropped", unit=unit.key, worker=worker)
        return Outcome("dropped")
    if plan.is_done(rd, unit):
        r.delete(keys.queued(round_id, unit.key))
        event(round_id, "done-already", unit=unit.key, worker=worker)
        advance(round_id)
        return Outcome("done")
    lease = Lease.acquire(r, round_id, unit.key, worker, task_id, s.lease_ttl)
    if lease is None:
        left = max(0.0, (r.pttl(keys.lease(round_id, unit.key)) or 0) / 1000)
        wait = min(s.busy_retry_max, max(1.0, left + 0.5))
        event(round_id, "busy", unit=unit.key, worker=worker, retry_in=round(wait, 1))
        return Outcome("busy", retry_in=wait)
    r.delete(keys.queued(round_id, unit.key))  # picked up: from here the live lease keeps the reconciler off it
    with lease:
        n, rec, unwritten = _count_attempt(round_id, rd, unit, worker)
        if n > s.max_attempts:
            _end_attempt(rd, unit, rec, "gave-up")
            fail(round_id, f"{unit.key}: gave up after {s.max_attempts} attempts; last: {_why_failed(rec)}", spare=task_id)
            return Outcome("failed")

        def attempt_failed(msg: str) -> Outcome:
            _end_attempt(rd, unit, rec, "error", msg)
            event(round_id, "error", unit=unit.key, worker=worker, attempt=n, error=msg)
            if n >= s.max_attempts:
                fail(round_id, f"{unit.key}: failed {n} attempts; last: {msg}", spare=task_id)
                return Outcome("failed")
            r.set(keys.queued(round_id, unit.key), time.time(), ex=int(s.requeue_after))  # our retry is on its way
            return Outcome("error", retry_in=s.error_retry_delay)

        if unwritten:  # the store can't be written (a full disk): no output could be committed either
            return attempt_failed(f"the round folder can't be written: {unwritten}")
        event(round_id, "started", unit=unit.key, worker=worker, token=lease.token, attempt=n)
        if r.hget(keys.round_state(round_id), "status") == "queued":
            _mark_running(round_id, rd)
        lease.start_heartbeat(s.heartbeat, note=server.waiting_on)
        faults.before_run(unit.key)
        meta = {"runner": "queue", "worker": worker, "task_id": task_id, "token": lease.token, "attempt": n}
        try:
            if not ROW[unit.stage].sharded:  # it reads merged datasets: merge them under the manifest's lock
                with manifest_lock(round_id):
                    for dep in [d for d in ROW[unit.stage].needs + ROW[unit.stage].after if d in cfg.stages]:
                        rounds.finalize(rd, dep)
            committed = rounds.run_unit(rd, unit, cache, meta=meta, guard=lambda: not is_over(rd) and lease.current())
        except InputError as e:  # the round's own data can't go on (e.g. too few rows to train): no retry helps
            msg = "; ".join(e.problems)
            _end_attempt(rd, unit, rec, "error", msg)
            fail(round_id, f"{unit.key}: {msg}", spare=task_id)
            return Outcome("failed")
        except Exception as e:
            return attempt_failed(f"{type(e).__name__}: {str(e)[:500]}")
        result = "committed" if committed else ("done" if plan.is_done(rd, unit) else "discarded")
        _end_attempt(rd, unit, rec, result)
        event(round_id, result, unit=unit.key, worker=worker, token=lease.token, attempt=n)
    advance(round_id)
    return Outcome(result)


# ---------------------------------------------------------------- ending and resuming


def _stop_running(round_id: str, spare: str | None = None) -> list[str]:
    """Ask the workers to terminate the tasks that hold leases on this round's units
    (except `spare`, the caller's own task)."""
    from workers.app import app

    r = redis_client()
    ids = [parse(v)["task_id"] for k in r.scan_iter(keys.lease(round_id, "*")) if (v := r.get(k))]
    ids = [i for i in ids if i and i != spare]
    if ids:
        app.control.revoke(ids, terminate=True, signal="SIGTERM")
    return ids


def fail(round_id: str, error: str, spare: str | None = None) -> None:
    """Mark the round failed. Its queued messages are taken out of the queues (one that a
    worker already holds is dropped when delivered), and running units of it are stopped
    (their outputs would be refused anyway)."""
    set_status(round_id, "failed", error)
    drop_queued(round_id)
    _stop_running(round_id, spare)


def cancel(round_id: str) -> str:
    rd = store.round_path(round_id)
    if plan.finished(rd):
        return durable_status(rd).get("status") or "succeeded"
    status = durable_status(rd).get("status")
    if status in TERMINAL:
        return status
    set_status(round_id, "cancelled", "cancelled by the user")
    drop_queued(round_id)
    _stop_running(round_id)
    return "cancelled"


def _message_round(item: str) -> str | None:
    """The round id of one of our task messages as kombu keeps it in a queue list (a JSON
    envelope, the body base64 JSON [args, kwargs, embed]); None for anything else."""
    import base64

    try:
        env = json.loads(item)
        if env["headers"]["task"] not in (keys.TASK_SHARD, keys.TASK_TRAIN):
            return None
        body = env["body"]
        args = json.loads(base64.b64decode(body) if env["properties"].get("body_encoding") == "base64" else body)[0]
        return args[0] if isinstance(args[0], str) else None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def drop_queued(round_id: str) -> int:
    """Take a round's messages out of the queue lists (one per queue and kombu priority)
    and clear its queued markers, so an ended round's thousands of messages don't keep the
    workers busy dropping them one by one. Returns how many were taken out."""
    from kombu.transport.redis import Channel

    r = redis_client()
    lists = [q if not pri else f"{q}{Channel.sep}{pri}" for q in keys.QUEUES for pri in Channel.priority_steps]
    pipe = r.pipeline(transaction=False)
    for name in lists:
        for item in r.lrange(name, 0, -1):
            if _message_round(item) == round_id:
                pipe.lrem(name, 1, item)
    dropped = sum(pipe.execute())
    markers = list(r.scan_iter(keys.queued(round_id, "*")))
    if markers:
        r.delete(*markers)
    if dropped:
        event(round_id, "dropped-queued", messages=dropped)
    return dropped


def resume(round_id: str) -> list[str]:
    """Re-queue what has no output and no live lease. A failed or cancelled round starts
    again with fresh attempt counts for its unfinished units."""
    rd = store.round_path(round_id)
    r = redis_client()
    live = r.hgetall(keys.round_state(round_id))
    r.hdel(keys.round_state(round_id), "stalled", "merge_failures", "broken")
    if durable_status(rd).get("status") in TERMINAL or (live.get("durable") == "0" and live.get("status") in TERMINAL):
        cfg = plan.load_config(rd)
        for u in [u for stage in cfg.stages for u in plan.units_of(rd, stage, cfg) if not plan.is_done(rd, u)]:
            attempts_file(rd, u).unlink(missing_ok=True)
            r.hdel(keys.attempts(round_id), u.key)
        set_status(round_id, "queued")
    elif not plan.finished(rd):
        redis_client().sadd(keys.ACTIVE, round_id)
    event(round_id, "resumed")
    return advance(round_id, force=True)
