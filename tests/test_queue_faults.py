"""Faults a probe found in the queue (issue 9), on the real parts: a redis-server on
loopback, real `cai worker` processes, the tiny random model, a real full filesystem.

Each test failed on the code before the fix: undecodable messages stopped the worker,
forged messages changed finished rounds, one corrupt round stopped reconciliation and
`round list`, a full disk looped past the attempt limit, `round run` could not resume,
and a trainer that had lost its lease trained on to the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import CAI, SMALL, wait_for
from tests.test_queue import events, status, wait_status


def _round(c, *extra) -> str:
    return c.submit("--prompts", "sample", "--limit", "2", "--shard-size", "2", "--stages", "respond", *SMALL, *extra)


def test_undecodable_messages_are_dropped_and_the_worker_keeps_serving(cluster):
    c = cluster()
    proc = c.worker("w")
    bad = [b"not json", b"42", json.dumps({"body": "!!!not base64", "properties": {"body_encoding": "base64"},
                                          "headers": {}, "content-type": "application/json"}).encode(),
           json.dumps({"properties": "x"}).encode()]
    for item in bad:
        c.redis.client.lpush("generate", item)
    round_id = _round(c)
    st = wait_status(round_id, {"succeeded", "failed"}, 90)
    assert st["status"] == "succeeded", st["error"]
    assert proc.poll() is None, "the worker stopped"
    log = (c.root / "w.log").read_text()
    assert log.count("dropped an undecodable") >= len(bad) - 1 and "Unrecoverable error" not in log


def test_forged_or_stale_messages_have_no_effect_on_a_round(cluster):
    from celery import Celery

    c = cluster()
    c.worker("w")
    round_id = _round(c)
    assert wait_status(round_id, {"succeeded", "failed"}, 90)["status"] == "succeeded"
    rd = c.round_dir(round_id)
    before = sorted(str(p.relative_to(rd)) for p in rd.rglob("*") if "attempts" not in p.parts)
    manifest = (rd / "manifest.json").read_text()
    sender = Celery(broker=c.redis.url)
    forged = [("cai.shard", [round_id, "no-such-stage", 0]), ("cai.shard", [round_id, "critique", 0]),
              ("cai.shard", [round_id, "respond", 99]), ("cai.shard", [round_id, "respond", -1]),
              ("cai.shard", [round_id, "respond", 10**40]), ("cai.train", [round_id, "respond"]),
              ("cai.train", [round_id, "train-sft"])]
    for name, args in forged:
        sender.send_task(name, args=args, queue="generate")
    sender.close()
    wait_for(lambda: len(events(round_id, "rejected")) >= len(forged), 60, "the forged messages to be rejected")
    assert status(round_id)["status"] == "succeeded"
    assert sorted(str(p.relative_to(rd)) for p in rd.rglob("*") if "attempts" not in p.parts) == before
    assert (rd / "manifest.json").read_text() == manifest
    assert {e["error"].split(" ")[0] for e in events(round_id, "rejected")} <= {"stage", "shard"}


def test_one_unreadable_round_does_not_stop_the_others(cluster):
    from workers import keys, service

    c = cluster()
    broken = _round(c)
    fine = _round(c)
    (c.round_dir(broken) / "round.json").write_text("{ not json")
    c.redis.client.delete(keys.RECONCILER)
    for k in c.redis.client.scan_iter(f"cai:queued:{fine}:*"):  # the fine round's message got lost
        c.redis.client.delete(k)
    c.redis.client.delete("generate")
    out = service.reconcile_all()
    assert out[fine] == ["respond/0000"] and out[broken] == []
    assert events(broken, "broken")
    r = c.cli("round", "list")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith(broken))
    assert "broken" in line
    c.worker("w")
    assert wait_status(fine, {"succeeded", "failed"}, 90)["status"] == "succeeded"


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs (root only: CI runs as root)."""
    assert os.geteuid() == 0, "this test mounts a small tmpfs and needs root (CI runs as root)"
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_full_disk_fails_the_unit_with_its_reason_within_the_attempt_limit(cluster, small_fs, monkeypatch):
    from workers import keys

    c = cluster()
    c.store = small_fs / "store"
    c.env["CAI_STORE"] = str(c.store)
    monkeypatch.setenv("CAI_STORE", str(c.store))
    round_id = _round(c)
    filler = _fill(small_fs)
    c.worker("w")
    st = wait_status(round_id, {"failed", "succeeded"}, 120)
    assert st["status"] == "failed" and "No space left on device" in st["error"], st["error"]
    time.sleep(3)  # the reconciler runs every second: no further attempts
    attempts = int(c.redis.client.hget(keys.attempts(round_id), "respond/0000"))
    assert attempts <= 3
    filler.unlink()  # space is back: the failure is written to the store, with its reason
    path = c.round_dir(round_id) / "work" / "status.json"
    wait_for(lambda: json.loads(path.read_text())["status"] == "failed", 30, "the durable status")
    durable = json.loads(path.read_text())
    assert "No space left on device" in durable["error"]
    assert "died without reporting" not in durable["error"]


def test_round_run_resumes_in_its_own_folder_and_refuses_another_round(tmp_path, tiny_model_dir):
    out = tmp_path / "r"
    args = CAI + ["round", "run", "--out", str(out), "--prompts", "sample", "--limit", "4", "--shard-size", "1",
                  "--model", str(tiny_model_dir), "--stages", "respond,critique", "--max-new-tokens", "6", "--passes", "1",
                  "--keep-degenerate"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "work" / "respond" / "0000.json"
    wait_for(first.exists, 120, "the first shard")
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    proc.wait(timeout=60)
    kept = first.read_bytes()
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stderr and first.read_bytes() == kept  # finished shards are kept, not redone
    man = json.loads((out / "manifest.json").read_text())
    assert man["finished"] and len((out / "datasets" / "responses.jsonl").read_text().splitlines()) == 4
    other = subprocess.run([*args[:-3], "--passes", "2", "--keep-degenerate"], capture_output=True, text=True)
    assert other.returncode == 2 and "holds round" in other.stderr and "critique" in other.stderr
    assert "Traceback" not in other.stderr


def test_trainer_that_lost_its_lease_stops_at_the_next_save(tiny_model_dir, tmp_path):
    from cai import store
    from cai.train import common, recipe as R, sft

    rows = [{"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]} for i in range(8)]
    store.write_jsonl(tmp_path / "sft.jsonl", rows)
    rec = R.load("cpu-tiny")
    rec = rec.model_copy(update={"sft": rec.sft.model_copy(update={"max_steps": 8, "save_steps": 2,
                                                                    "per_device_train_batch_size": 1})})
    calls = []

    def guard() -> bool:  # the lease is lost after the first check
        calls.append(1)
        return len(calls) < 2

    card = common.card_base(kind="SFT", base_model="tiny", round_id="r", parent=None, constitution_hash=None, recipe=rec,
                            datasets={})
    committed = sft.train(str(tiny_model_dir), tmp_path / "sft.jsonl", tmp_path / "adapter", tmp_path / "ck", rec, card,
                          guard=guard)
    assert committed is False and not (tmp_path / "adapter").exists()
    assert common.last_complete_checkpoint(tmp_path / "ck").endswith("checkpoint-4")  # stopped at the second save, not step 8
