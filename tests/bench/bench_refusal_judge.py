"""The embedded judge's A/B refusal question on all of tests/data/refusal_labeled.jsonl, both
orders: its agreement with the hand labels and with the refusal classifier. Prints figures;
the suite runs the same path on every 4th row as a mechanics test (the 135M judge is weak,
so the figure is reported, not held to a bar)."""

from cai import models
from cai.engine import LocalEngine
from cai.refusal import agreement, detect, judge_refusals
from tests.conftest import DATA
from tests.test_evaluate import jsonl


def test_bench_refusal_judge_agreement():
    rows = jsonl(DATA / "refusal_labeled.jsonl")
    engine = LocalEngine(*models.load("smollm2-135m"))
    p = judge_refusals(engine, [([{"role": "user", "content": r["prompt"]}], r["response"]) for r in rows])
    with_truth, n = agreement([r["label"] for r in rows], p)
    with_rule, _ = agreement([detect(r["response"]) for r in rows], p)
    print(f"\nBENCH refusal judge (smollm2-135m, both orders): valid {n}/{len(rows)}; agreement with the hand labels "
          f"{with_truth}/{n}; with the classifier {with_rule}/{n}")
