"""Rounds through Celery and Redis: real redis-server processes on loopback (AOF on), real
`cai worker` processes, the tiny random model. Faults that can't be caused otherwise
(a unit that kills its worker, a unit slow enough to be caught mid-shard) come from the
CAI_FAULT_* variables read by workers.faults.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import CAI, SMALL, TEST_RECIPE, Cluster, free_port, wait_for
from tests.test_constitution import DEFAULT, GOOD

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- helpers


def status(round_id: str) -> dict:
    from workers import progress

    return progress.status(round_id)


def wait_status(round_id: str, want: set[str], timeout: float) -> dict:
    def check():
        try:
            st = status(round_id)
        except Exception:  # Redis restarting
            return None
        return st if st["status"] in want else None

    return wait_for(check, timeout, f"round {round_id} to be {'/'.join(sorted(want))}")


def events(round_id: str, kind: str | None = None, unit: str | None = None) -> list[dict]:
    from workers import service

    return [e for e in service.events(round_id) if (kind is None or e["event"] == kind) and (unit is None or e.get("unit") == unit)]


def assert_each_unit_committed_once(round_id: str, rd: Path) -> None:
    from cai import rounds

    cfg = rounds.load_config(rd)
    committed = [e["unit"] for e in events(round_id, "committed")]
    units = [u.key for s in cfg.stages for u in rounds.units_of(rd, s, cfg)]
    assert sorted(committed) == sorted(units), committed
    assert not events(round_id, "error")  # no attempt raised: faults here are deaths and duplicates, not bugs


def assert_rows_once(rd: Path, n: int) -> None:
    ids = [json.loads(x)["prompt_id"] for x in (rd / "datasets" / "responses.jsonl").read_text().splitlines()]
    assert len(ids) == n and len(set(ids)) == n, ids  # no row lost, none duplicated


def submit_py(c: Cluster, *, stages: str, limit: int, recipe: Path | None = None, parent: str | None = None) -> str:
    """Submit a round config with settings that fit the random tiny model (it never ends a
    revision and puts no mass on A/B, so keep degenerate revisions and every label)."""
    cfg = {"constitution": str(DEFAULT), "prompts": "sample", "model": str(c.model), "limit": limit, "shard_size": 2,
           "recipe": str(recipe or "cpu-tiny"), "sampling": {"max_new_tokens": 8},
           "critique": {"passes": 1, "drop_degenerate": False},
           "label": {"min_mass": 0, "min_margin": 0, "principles_per_pair": 1, "skip_check": True},
           "evaluate": {"limit": 1, "principles_per_answer": 1}}
    if stages:
        cfg["stages"] = stages.split(",")
    path = c.root / f"round-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    r = c.cli("round", "submit", "--config", path, *(["--parent", parent] if parent else []))
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def messages_of(c: Cluster, round_id: str) -> list[str]:
    """Messages of a round still waiting in a queue or held unacknowledged."""
    from workers import keys

    raw = [m for q in keys.QUEUES for m in c.redis.client.lrange(q, 0, -1)] + list(c.redis.client.hvals("unacked"))
    found = []
    for m in raw:
        msg = json.loads(m)
        msg = msg[0] if isinstance(msg, list) else msg  # unacked holds [message, exchange, routing key]
        body = msg.get("body", "")
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body).decode("utf-8", "replace")
        if round_id in body:
            found.append(body)
    return found


# ---------------------------------------------------------------- a full round


@pytest.fixture(scope="module")
def full_round(shared, tmp_path_factory):
    """Every stage, training included, on the tiny model through the shared worker."""
    recipe = TEST_RECIPE
    with pytest.MonkeyPatch.context() as mp:
        shared.activate(mp)
        t = time.time()
        round_id = submit_py(shared, stages="", limit=4, recipe=recipe)
        st = wait_status(round_id, {"succeeded", "failed", "cancelled"}, 240)
    return round_id, st, time.time() - t


def test_full_round_end_to_end_through_the_queue(on_shared, full_round, tmp_path):
    import datasets

    round_id, st, seconds = full_round
    assert st["status"] == "succeeded", (st["error"], (on_shared.root / "w0.log").read_text()[-3000:])
    assert set(st["stages"]) == {"respond", "critique", "train-sft", "pairs", "label", "train-rm", "train-policy", "evaluate"}
    assert all(s["status"] == "done" for s in st["stages"].values())
    rd = on_shared.round_dir(round_id)
    assert_rows_once(rd, 4)
    assert_each_unit_committed_once(round_id, rd)
    # watch on a finished round: bars, then exit 0
    w = on_shared.cli("round", "watch", round_id)
    assert w.returncode == 0 and "succeeded" in w.stderr
    s = on_shared.cli("round", "status", round_id, "--json")
    assert s.returncode == 0 and json.loads(s.stdout)["status"] == "succeeded"
    # pull: the user-facing folder, not work/ or inputs/
    dest = tmp_path / "pulled"
    p = on_shared.cli("round", "pull", round_id, "--to", dest)
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in dest.iterdir()) == ["adapters", "constitution.yaml", "datasets", "manifest.json", "recipe.yaml",
                                                      "report", "round.yaml"]
    assert sorted(x.name for x in (dest / "adapters").iterdir()) == ["policy", "reward", "sft"]
    man = json.loads((dest / "manifest.json").read_text())
    assert man["status"] == "succeeded" and man["finished"] and man["round_id"] == round_id
    prefs = datasets.load_dataset("json", data_files=str(dest / "datasets" / "preferences.jsonl"), split="train")
    assert len(prefs) == 4 and {"prompt", "chosen", "rejected"} <= set(prefs.column_names)
    # a second pull into the now non-empty folder is refused
    again = on_shared.cli("round", "pull", round_id, "--to", dest)
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr
    print(f"\nfull round through the queue: {seconds:.1f} s")


def test_parent_round_lineage_and_model_cards(on_shared, full_round):
    parent, _, _ = full_round
    child = submit_py(on_shared, stages="respond,critique,train-sft", limit=2, parent=parent)
    st = wait_status(child, {"succeeded", "failed", "cancelled"}, 120)
    assert st["status"] == "succeeded", st["error"]
    assert st["parent"] == parent
    rd = on_shared.round_dir(child)
    assert (rd / "inputs" / "parent_policy" / "adapter_config.json").exists()
    card = json.loads((rd / "adapters" / "sft" / "cai.json").read_text())
    assert card["parent_round"] == parent and card["init_adapter"].endswith("inputs/parent_policy")
    assert json.loads((rd / "manifest.json").read_text())["parent_round"] == parent
    rows = {r["round_id"]: r for r in json.loads(on_shared.cli("round", "list", "--json").stdout)}
    assert rows[child]["lineage"] == [child, parent] and rows[parent]["status"] == "succeeded"
    text = on_shared.cli("round", "list")
    assert text.returncode == 0 and child in text.stdout
    # the child's policy for a next round is the adapter of its last policy-making stage (the rows say which)
    from cai import plan, stages

    child_dir = on_shared.store / "rounds" / child
    made = stages.next_policy(child_dir, plan.load_config(child_dir).stages)
    assert made is not None and (child_dir / made / "adapter_config.json").exists()
    unknown = on_shared.cli("round", "submit", "--model", on_shared.model, "--prompts", "sample", "--parent", "r-nope")
    assert unknown.returncode == 2 and "r-nope: no such round" in unknown.stderr


def test_same_shard_message_delivered_twice_gives_one_output(on_shared):
    from celery import Celery

    round_id = on_shared.submit("--prompts", "sample", "--limit", "2", "--shard-size", "2", "--stages", "respond", *SMALL)
    sender = Celery(broker=on_shared.redis.url)
    sender.conf.update(task_serializer="json")
    for _ in range(2):  # the same message twice more: three deliveries in all
        sender.send_task("cai.shard", args=[round_id, "respond", 0], queue="generate")
    sender.close()
    wait_status(round_id, {"succeeded"}, 60)
    wait_for(lambda: len(events(round_id, "done-already", "respond/0000")) >= 2, 30, "the duplicates to be delivered")
    rd = on_shared.round_dir(round_id)
    assert_each_unit_committed_once(round_id, rd)
    assert_rows_once(rd, 2)


def test_pickle_message_is_refused_and_runs_nothing(on_shared, tmp_path):
    import pickle

    from kombu import Connection

    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.makedirs, (str(sentinel),))

    task_id = str(uuid.uuid4())
    body = pickle.dumps(((Evil(),), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}))
    with Connection(on_shared.redis.url) as conn:
        conn.Producer().publish(body, exchange="generate", routing_key="generate", content_type="application/x-python-serialize",
                                content_encoding="binary", headers={"task": "cai.shard", "id": task_id, "lang": "py", "argsrepr": "",
                                                                    "kwargsrepr": "", "origin": "test"})
    log = on_shared.root / "w0.log"
    wait_for(lambda: "pickle" in log.read_text() and on_shared.redis.client.llen("generate") == 0, 30, "the worker to refuse it")
    assert "ContentDisallowed" in log.read_text() or "Refusing to deserialize" in log.read_text()
    assert not sentinel.exists()
    # and the worker still works
    round_id = on_shared.submit("--prompts", "sample", "--limit", "2", "--shard-size", "2", "--stages", "respond", *SMALL)
    wait_status(round_id, {"succeeded"}, 60)


# ---------------------------------------------------------------- faults


def test_sigkill_of_the_whole_worker_mid_shard_then_a_new_worker(cluster):
    c = cluster()
    old = c.worker("doomed", CAI_FAULT_SLOW_UNIT="respond/0001=60")
    round_id = c.submit("--prompts", "sample", "--limit", "6", "--shard-size", "2", "--stages", "respond,critique", *SMALL)
    from workers import keys

    wait_for(lambda: c.redis.client.exists(keys.lease(round_id, "respond/0001")), 60, "respond/0001 to be running")
    os.killpg(old.pid, signal.SIGKILL)  # the main process and its pool child, mid-shard
    old.wait()
    c.worker("fresh")
    st = wait_status(round_id, {"succeeded", "failed"}, 120)
    assert st["status"] == "succeeded", st["error"]
    rd = c.round_dir(round_id)
    assert_rows_once(rd, 6)
    assert_each_unit_committed_once(round_id, rd)
    attempts = json.loads((rd / "work" / "attempts" / "respond-0001.json").read_text())
    assert attempts["attempts"] == 2 and "ended" not in attempts["history"][0]
    assert len((rd / "datasets" / "critiques.jsonl").read_text().splitlines()) == 6


def test_task_outliving_a_short_visibility_timeout_commits_once(cluster):
    c = cluster()
    short = {"CAI_VISIBILITY_TIMEOUT": "2", "CAI_ALLOW_SHORT_VISIBILITY_TIMEOUT": "1", "CAI_FAULT_SLOW_UNIT": "respond/0000=8"}
    c.worker("a", **short)
    c.worker("b", **short)
    round_id = c.submit("--prompts", "sample", "--limit", "2", "--shard-size", "2", "--stages", "respond", *SMALL)
    st = wait_status(round_id, {"succeeded", "failed"}, 90)
    assert st["status"] == "succeeded", st["error"]
    deliveries = events(round_id, unit="respond/0000")
    busy = [e for e in deliveries if e["event"] == "busy"]
    assert busy, deliveries  # Redis handed the running task to a second delivery...
    assert len(events(round_id, "committed", "respond/0000")) == 1  # ...and only one output was committed
    assert not events(round_id, "error")
    assert len(events(round_id, "started", "respond/0000")) == 1
    assert_rows_once(c.round_dir(round_id), 2)


def test_task_that_always_kills_its_worker_fails_the_round_and_drains(cluster):
    c = cluster()
    c.worker("k", CAI_FAULT_KILL_UNIT="respond/0000", CAI_MAX_ATTEMPTS="3")
    round_id = c.submit("--prompts", "sample", "--limit", "4", "--shard-size", "2", "--stages", "respond,critique", *SMALL)
    st = wait_status(round_id, {"failed", "succeeded"}, 120)
    assert st["status"] == "failed"
    assert "respond/0000: gave up after 3 attempts" in st["error"] and "died" in st["error"]
    rd = c.round_dir(round_id)
    rec = json.loads((rd / "work" / "attempts" / "respond-0000.json").read_text())
    assert rec["attempts"] == 4 and [("ended" in h) for h in rec["history"]] == [False, False, False, True]
    # Redis says failed first, the store right after (set_status): wait for the manifest, don't race it
    man = wait_for(lambda: (m := json.loads((rd / "manifest.json").read_text()))["status"] == "failed" and m, 10,
                   "the manifest to say failed")
    assert "gave up" in man["error"]
    wait_for(lambda: not messages_of(c, round_id), 30, "the round's queued work to drain")
    w = c.cli("round", "watch", round_id)
    assert w.returncode == 1 and "gave up after 3 attempts" in w.stderr


def test_redis_restart_mid_round_then_resume_completes(cluster):
    c = cluster()
    c.worker("r", CAI_FAULT_SLOW_UNIT="respond/0001=4")
    round_id = c.submit("--prompts", "sample", "--limit", "6", "--shard-size", "2", "--stages", "respond,critique", *SMALL)
    from workers import keys

    wait_for(lambda: c.redis.client.exists(keys.lease(round_id, "respond/0001")), 60, "respond/0001 to be running")
    c.redis.stop()
    time.sleep(1)
    c.redis.start()
    r = wait_for(lambda: (x := c.cli("round", "resume", round_id)).returncode == 0 and x, 30, "resume to answer")
    assert "units queued" in r.stdout
    st = wait_status(round_id, {"succeeded", "failed"}, 120)
    assert st["status"] == "succeeded", st["error"]
    rd = c.round_dir(round_id)
    assert_rows_once(rd, 6)
    assert_each_unit_committed_once(round_id, rd)


# ---------------------------------------------------------------- bad input and clear errors


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


BAD_SUBMIT = {
    "bad_constitution": (lambda t: ["--constitution", _write(t / "c.yaml", GOOD.replace("weight: 2", "weight: 0")), "--prompts", "sample", "--stages", "respond"], "c.yaml:7:13"),
    "malformed_prompts": (lambda t: ["--prompts", _write(t / "p.jsonl", '{"prompt": "a"}\n{oops\n'), "--stages", "respond"], "p.jsonl:2: malformed JSON"),
    "missing_model": (lambda t: ["--prompts", "sample", "--model", t / "no-such-model", "--stages", "respond"], "no-such-model': not found"),
    "bad_recipe": (lambda t: ["--prompts", "sample", "--recipe", _write(t / "r.yaml", "name: r\nsft: {lr: 1}\n")], "r.yaml:2:7: sft.lr: unknown key 'lr'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_SUBMIT))
def test_submit_refuses_bad_input_and_queues_nothing(on_shared, kind, tmp_path):
    make, expect = BAD_SUBMIT[kind]
    before = sorted(p.name for p in (on_shared.store / "rounds").iterdir())
    queued_before = on_shared.redis.client.llen("generate")
    r = on_shared.cli("round", "submit", *make(tmp_path))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert expect in r.stderr and "Traceback" not in r.stderr and r.stdout == ""
    assert sorted(p.name for p in (on_shared.store / "rounds").iterdir()) == before  # nothing left, not even a temp folder
    assert on_shared.redis.client.llen("generate") == queued_before


def test_unknown_round_escaping_ids_and_links_are_refused(on_shared, tmp_path):
    for args in (["round", "status", "r-nope"], ["round", "watch", "r-nope"], ["round", "resume", "r-nope"],
                 ["round", "cancel", "r-nope"], ["round", "pull", "r-nope", "--to", tmp_path / "x"]):
        r = on_shared.cli(*args)
        assert r.returncode == 2 and "r-nope: no such round" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = on_shared.cli("round", "pull", "../../etc", "--to", tmp_path / "x")
    assert r.returncode == 2 and "not a round id" in r.stderr
    round_id = on_shared.submit("--prompts", "sample", "--limit", "2", "--shard-size", "2", "--stages", "respond", *SMALL)
    wait_status(round_id, {"succeeded"}, 60)
    (on_shared.round_dir(round_id) / "datasets" / "escape.jsonl").symlink_to("/etc/hostname")
    r = on_shared.cli("round", "pull", round_id, "--to", tmp_path / "y")
    assert r.returncode == 2 and "escape.jsonl: is a link" in r.stderr
    assert not (tmp_path / "y").exists() or not any((tmp_path / "y").iterdir())


def test_redis_not_answering_is_one_line_exit_2(tmp_path, tiny_model_dir):
    env = {**os.environ, "CAI_REDIS_URL": f"redis://:secret@127.0.0.1:{free_port()}/0", "CAI_STORE": str(tmp_path / "store")}
    for args in (["round", "submit", "--prompts", "sample", "--model", tiny_model_dir, "--stages", "respond"],
                 ["round", "status", "r-x"], ["worker"]):
        r = subprocess.run(CAI + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=60)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "not answering" in lines[0], (args, r.stderr)
        assert "secret" not in r.stderr
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("round.json"))


def test_cancel_stops_a_round(cluster):
    c = cluster()
    c.worker("x", CAI_FAULT_SLOW_UNIT="respond/0000=30")
    round_id = c.submit("--prompts", "sample", "--limit", "4", "--shard-size", "2", "--stages", "respond", *SMALL)
    from workers import keys

    wait_for(lambda: c.redis.client.exists(keys.lease(round_id, "respond/0000")), 60, "respond/0000 to be running")
    r = c.cli("round", "cancel", round_id)
    assert r.returncode == 0 and "cancelled" in r.stdout
    assert status(round_id)["status"] == "cancelled"
    wait_for(lambda: not messages_of(c, round_id) and not c.redis.client.exists(keys.lease(round_id, "respond/0000")),
             30, "the round's work to stop")
    assert not (c.round_dir(round_id) / "work" / "respond" / "0000.json").exists()
    # resume starts it again with fresh attempts; the slow unit is still slow, so just see it queued or running
    r = c.cli("round", "resume", round_id)
    assert r.returncode == 0 and status(round_id)["status"] in ("queued", "running")
    c.cli("round", "cancel", round_id)


# ---------------------------------------------------------------- settings and leases


def test_settings_refuse_a_visibility_timeout_below_the_hard_limit():
    from workers.settings import WorkerSettings

    with pytest.raises(ValueError, match="must exceed the longest hard time limit"):
        WorkerSettings(visibility_timeout=100, shard_time_limit=200, shard_soft_time_limit=150)
    s = WorkerSettings()
    assert s.effective_visibility_timeout > max(s.shard_time_limit, s.train_time_limit)


def test_celery_configuration_is_json_only_and_late_acking(shared):
    code = ("import json; from workers.app import app; c = app.conf\n"
            "print(json.dumps({k: c[k] for k in ('accept_content', 'task_serializer', 'result_accept_content', 'task_acks_late',"
            " 'task_reject_on_worker_lost', 'worker_prefetch_multiplier', 'worker_cancel_long_running_tasks_on_connection_loss',"
            " 'broker_transport_options', 'result_backend_transport_options')}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=shared.env)
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)
    assert c["accept_content"] == ["json"] and c["result_accept_content"] == ["json"] and c["task_serializer"] == "json"
    assert c["task_acks_late"] and c["task_reject_on_worker_lost"] and c["worker_prefetch_multiplier"] == 1
    assert c["worker_cancel_long_running_tasks_on_connection_loss"] is False
    assert c["broker_transport_options"]["visibility_timeout"] == c["result_backend_transport_options"]["visibility_timeout"] > 6 * 3600


def test_lease_fencing(on_shared):
    from workers.lease import Lease

    r = on_shared.redis.client
    a = Lease.acquire(r, "r-lease", "respond/0000", "w1", "t1", ttl=0.5)
    assert a and Lease.acquire(r, "r-lease", "respond/0000", "w2", "t2", ttl=0.5) is None
    assert a.current()
    time.sleep(0.7)  # expired, nobody newer: the old holder's token is still the newest
    assert a.current()
    time.sleep(0.7)
    b = Lease.acquire(r, "r-lease", "respond/0000", "w2", "t2", ttl=5)
    assert b and b.token == a.token + 1
    assert not a.current(tries=1) and b.current()  # the stale holder may not commit
    a.release()
    assert b.current()
    b.release()
    assert not r.exists("cai:lease:r-lease:respond/0000")
