"""AI labeling on the embedded model, one run: the real signal on hand-written pairs
(refusal-with-help vs plainly harmful) and the cost per labeled pair of log-prob labels
vs a judge that generates a 64-token verdict, same model, same batch size, same work
(both orders x k principles per pair). Prints figures; asserts nothing about time.
"""

import json
import re
import time
from pathlib import Path

from cai import constitution, models, prompts
from cai.engine import LocalEngine
from cai.feedback import LabelSettings, _few_shot_turns, judge_question, judge_stats, label_pairs, sample_judge_principles
from cai.generation import Sampling, generate
from tests.test_constitution import DEFAULT

SIGNAL = Path(__file__).resolve().parents[1] / "data" / "signal_pairs.jsonl"


def test_bench_label():
    model, tok = models.load("smollm2-135m")
    cons = constitution.load(DEFAULT)
    pairs = prompts.load_pairs(SIGNAL)
    s = LabelSettings(principles_per_pair=4, batch_size=16)

    t, c = time.perf_counter(), time.process_time()
    rows = label_pairs(LocalEngine(model, tok), cons, pairs, s, seed=0, provenance={})
    logprob_s, logprob_cpu = (time.perf_counter() - t) / len(pairs), (time.process_time() - c) / len(pairs)
    right = sum(1 for r in rows if r["valid"] and r["chosen_index"] == 0)
    stats = judge_stats(rows, s)

    # the same work with generated verdicts: 8 generations of 64 tokens per pair
    shots = _few_shot_turns(cons, s.few_shot)
    convs = []
    for p in pairs:
        for pr in sample_judge_principles(cons, s.principles_per_pair, 0, p["prompt_id"]):
            for a, b in ((p["responses"][0], p["responses"][1]), (p["responses"][1], p["responses"][0])):
                convs.append(shots + [{"role": "user", "content": judge_question(p["messages"], pr.preference_question, a, b)}])
    t, c = time.perf_counter(), time.process_time()
    gens = generate(model, tok, convs, Sampling(max_new_tokens=64, temperature=0, batch_size=16))
    generated_s, generated_cpu = (time.perf_counter() - t) / len(pairs), (time.process_time() - c) / len(pairs)
    parsed = sum(1 for g in gens if re.search(r"\(?\b[AB]\b\)?", g.text))

    fig = {
        "pairs": len(pairs), "evaluations_per_pair": 2 * s.principles_per_pair,
        "signal_prefers_better": f"{right}/{len(pairs)}",
        "position_consistency": stats["position_consistency"], "mean_choice_mass": stats["mean_choice_mass"],
        "p_chosen": [round(r["p_chosen"], 3) for r in rows],
        "logprob_s_per_pair": round(logprob_s, 2), "generated_verdict_s_per_pair": round(generated_s, 2),
        "cost_ratio": round(logprob_s / generated_s, 3), "cost_ratio_cpu_time": round(logprob_cpu / generated_cpu, 3), "generated_verdicts_with_a_letter": f"{parsed}/{len(gens)}",
    }
    print("\nBENCH label:", json.dumps(fig))
