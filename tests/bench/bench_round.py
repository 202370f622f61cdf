"""The headline: does a teacher round make the embedded student better? One run, figures
printed (and written to $CAI_BENCH_OUT/bench_round.json when set); asserts nothing about time.

A round on the shipped training mix (`train`: harmful, helpful, safe-but-scary and pushback
prompts interleaved, none of them a probe; pushback: the user disputes a right answer) with the embedded SmolLM2-135M as the student and the
embedded Qwen2.5-Coder-0.5B as its critic, answering under the constitution's principles
(principle-driven), its texts kept only where they fit the prompt's kind; SFT on them
(recipe cpu-student); then the student before (base) and after (sft) on the shipped
probes (harmful, borderline = safe-but-scary, sycophancy), read by cai's refusal
classifier, figures with Wilson 95% intervals.

Run: python -m pytest tests/bench/bench_round.py -s -p no:cacheprovider --override-ini addopts=""
Knobs (env): CAI_BENCH_PROMPTS (default 280 prompts of the mix, 70 of each kind), CAI_BENCH_CANDIDATES (answers the
teacher may write per prompt, default 3: the 2 extra only where the first did not fit), CAI_BENCH_PROBES (probes
per set, default 100), CAI_BENCH_RL (1: after SFT, train the round's reward model on its pairs by construction and
run train-rl from the SFT adapter with the recipe's rule terms, kind_fit included; "after" is then the RL policy).
"""

import json
import os
import time
from pathlib import Path

from cai import rounds, store
from cai.config import RoundConfig
from cai.critique import CritiqueSettings
from cai.evaluate import EvalSettings
from cai.generation import Sampling
from cai.pairs import PairSettings

HEADLINE = ["harmful_compliance", "harmful_degenerate", "over_refusal", "sycophancy_flip", "mean_tokens"]


def _fmt(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    if m.get("lo") is None:
        return f"{m['value']:.3f}"
    return f"{m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}] (n={m.get('n')})"


def test_bench_round_teacher_moves_the_student(tmp_path):
    n_prompts = int(os.environ.get("CAI_BENCH_PROMPTS", "280"))
    n_probes = int(os.environ.get("CAI_BENCH_PROBES", "100"))
    with_rl = os.environ.get("CAI_BENCH_RL", "0") == "1"
    rl_stages = ["pairs", "label", "train-rm", "train-rl"] if with_rl else []
    cfg = RoundConfig(
        prompts="train", limit=n_prompts, model="smollm2-135m", critic="qwen2.5-0.5b",
        stages=["respond", "critique", "train-sft", *rl_stages, "evaluate"], shard_size=120, recipe="cpu-student",
        pairs=PairSettings(sources=["revision"]),
        sampling=Sampling(max_new_tokens=80, temperature=0.7, batch_size=24),
        critique=CritiqueSettings(mode="principle-driven", revision_candidates=int(os.environ.get("CAI_BENCH_CANDIDATES", "3"))),
        evaluate=EvalSettings(probes="harmful,borderline,sycophancy", limit=n_probes, judge=False,
                              max_new_tokens=64, batch_size=24, shard_size=128),
    )
    t0 = time.time()
    rd = tmp_path / "round"
    rounds.prepare(rd, cfg)
    rounds.run_in_process(rd)
    seconds = round(time.time() - t0, 1)
    man = store.read_json(rd / "manifest.json")
    m = store.read_json(rd / "report" / "metrics.json")["metrics"]
    before, after = m["base"], m["rl" if with_rl else "sft"]
    fig = {"seconds": seconds, "stages": {k: v["seconds"] for k, v in man["stages"].items()},
           "prompts": n_prompts, "probes_per_set": n_probes,
           "sft_rows": man["counts"].get("sft_rows"), "dropped": man["counts"].get("revisions_degenerate"),
           "before": {k: before.get(k) for k in HEADLINE}, "after": {k: after.get(k) for k in HEADLINE},
           "sft": {k: m["sft"].get(k) for k in HEADLINE}, "after_policy": "rl" if with_rl else "sft"}
    if with_rl:
        rl_card = store.read_json(rd / "adapters" / "rl" / "cai.json")
        fig["rl_watch"] = {"flag": rl_card["watch"]["flag"], "kept_step": rl_card["watch"]["kept_step"],
                           "curves": [{k: pt.get(k) for k in ("step", "reward", "kl", "length", "judge", "refusal_harmful",
                                                               "refusal_benign")} for pt in rl_card["watch"]["curves"]]}
    print("\nBENCH round (teacher qwen2.5-0.5b -> student smollm2-135m), seconds:", seconds)
    sft_rows = store.read_jsonl(rd / "datasets" / "sft.jsonl")
    fig["sft_rows_by_kind"] = {c: sum(1 for r in sft_rows if r["category"] == c) for c in sorted({r["category"] for r in sft_rows})}
    print(f"  SFT rows kept: {fig['sft_rows']} of {n_prompts} {fig['sft_rows_by_kind']}; dropped: {fig['dropped']}")
    for k in HEADLINE:
        print(f"  {k:20s} before {_fmt(before.get(k)):38s} sft {_fmt(m['sft'].get(k)):38s}"
              + (f" rl {_fmt(after.get(k))}" if with_rl else ""))
    rows = [r for r in store.read_jsonl(rd / "report" / "rows.jsonl")]
    by = {}
    for r in rows:
        by.setdefault(r["probe"], {})[r["policy"]] = r
    shown, last = 0, fig["after_policy"]
    for pid, pr in by.items():
        if shown < 6 and {"base", last} <= set(pr) and pr["base"]["answer"] != pr[last]["answer"]:
            print(f"\n  [{pid}] {pr['base']['prompt'][:100]}\n    before: {pr['base']['answer'][:160]!r}\n"
                  f"    after:  {pr[last]['answer'][:160]!r}")
            shown += 1
    print("\nBENCH round:", json.dumps(fig))
    if os.environ.get("CAI_BENCH_OUT"):
        store.write_json(Path(os.environ["CAI_BENCH_OUT"]) / "bench_round.json", fig)
        store.write_jsonl(Path(os.environ["CAI_BENCH_OUT"]) / "bench_round_sft.jsonl", sft_rows)
