"""The worker's unit logic (`workers.service.work`) driven in this process by the
InProcessWorker harness (conftest) against a real loopback redis-server and the tiny
random model: the messages are the ones `submit` and `advance` really sent to the Celery
queues in Redis, delivered one at a time, so each rule of a delivery is seen on its own:
a duplicate changes nothing, a held lease answers busy, a forged message is rejected,
and the round drains to its end with every unit committed once."""

from __future__ import annotations

import json

from tests.conftest import InProcessWorker


def test_in_process_deliveries_duplicate_busy_forged_then_the_round_drains(cluster, tiny_model_dir):
    from cai import plan, store
    from cai.config import RoundConfig
    from workers import keys, service
    from workers.lease import Lease

    c = cluster()
    worker = InProcessWorker(c)
    cfg = RoundConfig(prompts="sample", limit=2, shard_size=1, model=str(tiny_model_dir), stages=["respond", "evaluate"],
                      sampling={"max_new_tokens": 2}, evaluate={"limit": 1, "judge": False})
    rid = service.submit(cfg)
    rd = c.round_dir(rid)
    sent = [worker.take() for _ in range(3)]  # submit queued what needs nothing: both respond shards, evaluate (base)
    assert worker.take() is None
    assert [(q, m["task"], m["args"]) for q, _, m in sent] == [(keys.GENERATE, keys.TASK_SHARD, [rid, s, n]) for s, n in
                                                               (("respond", 0), ("respond", 1), ("evaluate", 0))]
    first, second = sent[0][2], sent[1][2]

    assert worker.deliver(first["args"]).result == "committed"
    out = plan.unit_output(rd, plan.Unit(stage="respond", shard=0))
    shard0 = out.read_bytes()
    assert worker.deliver(first["args"]).result == "done"  # the same message again: nothing changes
    assert out.read_bytes() == shard0

    other = Lease.acquire(c.redis.client, rid, "respond/0001", "someone-else", "t9", 30)
    busy = worker.deliver(second["args"])
    assert busy.result == "busy" and busy.retry_in and busy.retry_in > 1  # the live lease's time left
    other.release()

    assert worker.deliver([rid, "no-such-stage", 0]).result == "dropped"
    assert worker.deliver([rid, "respond", 7]).result == "dropped"

    for q, raw, _ in sent[1:]:  # the busy one and the one not yet delivered back on their queue, as a retry would be
        c.redis.client.lpush(q, raw)
    delivered = worker.drain()
    assert sorted(k for k, r in delivered if r == "committed") == ["evaluate/0000", "respond/0000", "respond/0001"]
    man = store.read_json(rd / "manifest.json")
    assert man["finished"] and json.loads(c.cli("round", "status", rid, "--json").stdout)["status"] in ("succeeded", "gated")
    kinds = [e["event"] for e in service.events(rid)]
    assert {"done-already", "busy", "rejected", "committed"} <= set(kinds)
    assert kinds.count("committed") == 3  # every unit once
