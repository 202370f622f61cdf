"""Critique-and-revise on a shard of 16 prompts: batched vs prompt by prompt, one run.

Run: make bench (or python -m pytest tests/bench/bench_critique.py -s). Prints the ratio
in wall time and in this process's CPU time (steadier when the machine is shared);
asserts nothing about time. Uses the embedded model.
"""

import json
import time

from cai import constitution, models, prompts
from cai.critique import CritiqueSettings, critique_revise, respond
from cai.engine import LocalEngine
from cai.generation import Sampling
from tests.test_constitution import DEFAULT


def test_bench_critique_batched_vs_sequential():
    model, tok = models.load("smollm2-135m")
    cons = constitution.load(DEFAULT)
    ps = prompts.load("all").prompts[::19][:16]
    s = Sampling(max_new_tokens=48, batch_size=16, seed=1)
    settings = CritiqueSettings(passes=1)
    engine = LocalEngine(model, tok)
    responses = respond(engine, ps, s)

    t, c = time.perf_counter(), time.process_time()
    critique_revise(engine, cons, responses, settings, s, {})
    batched, batched_cpu = time.perf_counter() - t, time.process_time() - c

    t, c = time.perf_counter(), time.process_time()
    for r in responses:
        critique_revise(engine, cons, [r], settings, s.model_copy(update={"batch_size": 1}), {})
    sequential, sequential_cpu = time.perf_counter() - t, time.process_time() - c

    fig = {"prompts": 16, "passes": 1, "max_new_tokens": 48, "few_shot": settings.few_shot,
           "batched_s": round(batched, 1), "sequential_s": round(sequential, 1), "speedup": round(sequential / batched, 1),
           "batched_cpu_s": round(batched_cpu, 1), "sequential_cpu_s": round(sequential_cpu, 1),
           "speedup_cpu_time": round(sequential_cpu / batched_cpu, 1)}
    print("\nBENCH critique:", json.dumps(fig))
