"""Reading rounds: a round's status (what the store holds plus what is live in Redis),
its lineage, and the list of rounds in the store.

Read-only; cheap enough to poll every second (existence checks and one pipelined Redis
round trip, no output files read). `list_rounds` and `lineage` need no Redis at all.
"""

from __future__ import annotations

import time

from cai import plan, store
from workers import keys
from workers.lease import parse
from workers.service import FINISHED, TERMINAL, durable_status
from workers.settings import redis_client


def status(round_id: str) -> dict:
    """The round as the store holds it, plus what is live in Redis. Cheap enough to poll:
    file existence checks and one pipelined round trip, no output files read."""
    rd = store.round_path(round_id)
    cfg = plan.load_config(rd)
    r = redis_client()
    durable = durable_status(rd)
    state_hash = r.hgetall(keys.round_state(round_id))
    if state_hash.get("durable") == "0" and state_hash.get("status") in TERMINAL:  # the store could not be written yet
        durable = {"status": state_hash["status"], "error": state_hash.get("error") or None}
    man = store.read_json(rd / store.MANIFEST) if (rd / store.MANIFEST).exists() else {}
    all_units = [u for stage in cfg.stages for u in plan.units_of(rd, stage, cfg)]
    done = {u.key for u in all_units if plan.is_done(rd, u)}
    pending = [u for u in all_units if u.key not in done]
    pipe = r.pipeline(transaction=False)
    pipe.get(keys.unseen(round_id))
    pipe.hgetall(keys.attempts(round_id))
    for u in pending:
        pipe.get(keys.lease(round_id, u.key))
        pipe.exists(keys.queued(round_id, u.key))
        pipe.get(keys.waiting(round_id, u.key))
    unseen, attempts, *answers = pipe.execute()
    problem = problem_of(state_hash, unseen)
    attempts = {k: int(v) for k, v in attempts.items()}
    live = {u.key: tuple(answers[3 * i : 3 * i + 3]) for i, u in enumerate(pending)}
    now = time.time()
    units = []
    for u in all_units:
        entry: dict = {"unit": u.key, "stage": u.stage, "attempts": attempts.get(u.key, 0)}
        if u.key in done:
            entry["state"] = "done"
        elif (v := live[u.key][0]) is not None:
            lease = parse(v)
            entry.update(state="running", worker=lease["worker"], token=lease["token"],
                         running_s=round(now - lease["started"], 1), waiting_on=live[u.key][2])
        elif live[u.key][1]:
            entry["state"] = "queued"
        elif all(n.key in done for n in plan.needs(rd, u, cfg)):
            entry["state"] = "ready"
        else:
            entry["state"] = "waiting"
        units.append(entry)
    stages = {}
    for stage in cfg.stages:
        mine = [u for u in units if u["stage"] == stage]
        n_done = sum(u["state"] == "done" for u in mine)
        stages[stage] = {
            "status": "done" if plan.stage_done(rd, stage) else ("running" if n_done or any(u["state"] == "running" for u in mine) else "pending"),
            "units_done": n_done, "units": len(mine),
            "running": [u["unit"] for u in mine if u["state"] == "running"],
            "queued": sum(u["state"] == "queued" for u in mine),
            "seconds": man.get("stages", {}).get(stage, {}).get("seconds", 0),  # as of the last merge
        }
    if durable.get("status") in TERMINAL or durable.get("status") in FINISHED:
        state = durable["status"]
    elif any(u["state"] == "running" for u in units) or plan.finished(rd, cfg):  # finished: the last merge is being recorded
        state = "running"
    else:
        state = "queued"
    return {
        "round_id": round_id, "status": state,
        "error": durable.get("error") if state in TERMINAL or state == "gated" else problem,  # ended: why; else what holds it up
        "parent": cfg.parent, "created": cfg.created, "model": cfg.model, "path": str(rd),
        "stages": stages, "units": units,
    }


def problem_of(state: dict, unseen: str | None) -> str | None:
    """What holds up a round that has not ended, in one line, or None: a merge the store
    refuses (a full disk), a worker that can't find the round in its store, a round the
    reconciler can't read."""
    found = [x for x in (state.get("stalled"), unseen, state.get("broken") and f"the reconciler can't read it: {state['broken']}") if x]
    return "; ".join(found) or None


def lineage(round_id: str) -> list[str]:
    """The round and its ancestors, newest first (stops at a parent missing from the store)."""
    chain, seen = [round_id], {round_id}
    while True:
        try:
            parent = plan.load_config(store.round_path(chain[-1])).parent
        except Exception:  # a parent missing from the store, or unreadable: the chain stops there
            return chain
        if not parent or parent in seen:
            return chain
        chain.append(parent)
        seen.add(parent)


def list_rounds() -> list[dict]:
    """Every round in the store, from the store alone (no Redis needed)."""
    rows = []
    for round_id in store.list_round_ids():
        rd = store.round_path(round_id)
        try:
            cfg = plan.load_config(rd)
            durable = durable_status(rd).get("status")
        except Exception as e:  # one unreadable round is shown as broken; the others still list
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            rows.append({"round_id": round_id, "status": "broken", "created": _mtime(rd), "model": "?", "stages": [],
                         "parent": None, "lineage": [round_id], "error": why})
            continue
        state = durable if durable in TERMINAL or durable == "gated" else ("succeeded" if plan.finished(rd, cfg) else "incomplete")
        rows.append({"round_id": round_id, "status": state, "created": cfg.created, "model": cfg.model,
                     "stages": cfg.stages, "parent": cfg.parent, "lineage": lineage(round_id)})
    return sorted(rows, key=lambda x: x["created"])


def _mtime(rd) -> float:
    try:
        return rd.stat().st_mtime
    except OSError:
        return 0.0
