"""The same small round in process and through the queue with one worker, one run each.

Run: make bench (or python -m pytest tests/bench/bench_queue.py -s -p no:cacheprovider
--override-ini addopts=""). Prints queue wall time / in-process wall time (goal: <= 1.10);
asserts nothing about time. Embedded model, a real redis-server on loopback, one
`cai worker` started and ready before the clock starts (a service's workers are up before
rounds arrive). Both sides are timed from the `cai round ...` command to the finished
round folder, so both include the CLI's start, validation and the model load. Also
printed: the seconds spent inside units on each side and the rest (what the queue adds
is in `queue_other_s`), and CPU seconds on each side (the worker's process group plus
the submit command), steadier than wall time when the machine is shared: back-to-back
identical runs here differed by up to 15% in wall time.
"""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from cai import plan, store
from tests.conftest import FAST, Cluster, wait_for

ROUND = ["--prompts", "sample", "--stages", "respond,critique", "--shard-size", "4", "--max-new-tokens", "32",
         "--passes", "1", "--model", "smollm2-135m"]


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the command: state ppid pgrp ... utime(12) stime(13)
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def test_bench_queue_vs_in_process(tmp_path, embedded_dir):
    t, c0 = time.perf_counter(), children_cpu()
    r = subprocess.run([sys.executable, "-m", "cai.cli", "round", "run", *ROUND, "--out", str(tmp_path / "in-process")],
                       capture_output=True, text=True)
    in_process, in_process_cpu = time.perf_counter() - t, children_cpu() - c0
    assert r.returncode == 0, r.stderr[-2000:]

    c = Cluster(tmp_path / "queue", embedded_dir)
    for k in FAST:  # the service's own defaults, not the fault tests' fast sweeps
        c.env.pop(k)
    try:
        worker = c.worker("bench")
        time.sleep(5)  # let the idle worker finish its start-up imports before the clock starts
        t, c0, w0 = time.perf_counter(), children_cpu(), group_cpu(worker.pid)
        s = c.cli("round", "submit", *ROUND)
        assert s.returncode == 0, s.stderr[-2000:]
        rd = c.round_dir(s.stdout.strip().splitlines()[-1])
        last = rd / "datasets" / "sft.jsonl"  # the last stage's merged output: a cheap check to poll
        wait_for(last.exists, 1800, "the queued round", every=0.05)
        queued = time.perf_counter() - t
        queued_cpu = children_cpu() - c0 + group_cpu(worker.pid) - w0
    finally:
        c.close()

    units = [u for st in ("respond", "critique") for u in plan.units_of(rd, st)]
    work_in_process = sum(store.read_json(plan.unit_output(tmp_path / "in-process", u))["meta"]["seconds"] for u in units)
    work_queued = sum(store.read_json(plan.unit_output(rd, u))["meta"]["seconds"] for u in units)
    fig = {"prompts": 12, "stages": "respond,critique", "units": len(units), "max_new_tokens": 32,
           "in_process_s": round(in_process, 1), "queue_s": round(queued, 1), "ratio": round(queued / in_process, 3),
           "in_process_cpu_s": round(in_process_cpu, 1), "queue_cpu_s": round(queued_cpu, 1),
           "cpu_ratio": round(queued_cpu / in_process_cpu, 3),
           # time inside the units (model load + generation) vs the rest (CLI, validation, queue, merges)
           "in_process_units_s": round(work_in_process, 1), "queue_units_s": round(work_queued, 1),
           "in_process_other_s": round(in_process - work_in_process, 1), "queue_other_s": round(queued - work_queued, 1)}
    print("\nBENCH queue:", json.dumps(fig))
