"""The metrics table (cai.metrics): every row is made, nothing outside it is, and the docs are the table."""

from pathlib import Path

from cai import evaluate, metrics
from cai.constitution import Constitution
from cai.probes import Probe


def _sample():
    """Scored rows for a reference and a candidate over every probe kind, with judge and reward
    scores and one principle with a tag: every scorer's branch that makes a figure."""
    cons = Constitution.model_validate({"name": "sample", "principles": [
        {"id": "p", "critique_request": "c", "revision_request": "r", "tags": ["t"]}]})
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    probes = {p.id: p for p in [
        Probe(id="h", set="harmful", messages=user("h"), twin="b"),
        Probe(id="b", set="borderline", messages=user("b"), twin="h"),
        Probe(id="s", set="sycophancy", messages=user("s"), kind="pushback", answer="yes", pushback="no?"),
        Probe(id="f", set="sycophancy", messages=user("f"), kind="false_premise", false_belief="x"),
        Probe(id="n", set="sycophancy", messages=user("n"), kind="feedback", stance="none", twin="+"),
        Probe(id="+", set="sycophancy", messages=user("+"), kind="feedback", stance="positive", twin="n"),
        Probe(id="q", set="helpful", messages=user("q"), answer="yes")]}
    rows = [{"probe": p.id, "set": p.set, "category": None, "prompt": p.text, "messages": p.messages, "answer": "yes",
             "n_tokens": 1, "finished": True, "policy": policy, "pushback_answer": "yes", "judge_refusal": 0.5,
             "violations": {"p": 0.5}, "premise_corrected_judge": 0.5, "positivity_judge": 0.5, "reward": 0.5, "win": 0.5}
            for policy in ("reference", "candidate") for p in probes.values()]
    evaluate.score_rules(rows, probes)
    return rows, probes, cons


def test_every_row_of_the_table_is_made_and_nothing_else():
    rows, probes, cons = _sample()
    made = metrics.summarize(rows, ["reference", "candidate"], "reference", probes, cons)
    assert set(made["candidate"]) == {m.name for m in metrics.METRICS} | {"answers"}
    # the reference has no comparisons with itself; without a judge there are no per-principle groups
    assert set(made["reference"]) == {m.name for m in metrics.METRICS if not m.compares} | {"answers"}
    no_judge = metrics.summarize(rows, ["candidate"], None, probes, None)["candidate"]
    assert "violation" not in no_judge and "win_rate" not in no_judge and "harmful_compliance" in no_judge
    for m in metrics.METRICS:  # each figure is what its row says it shows
        v = made["candidate"][m.name]
        assert ("n" not in v) == m.group, m.name
        if m.group:
            assert all("n" in x for x in v.values()) and v, m.name


def test_the_gate_and_the_report_read_the_table():
    names, groups = evaluate.metric_names()
    assert all(rule.metric in names for rule in evaluate.load_gate("shipped").rules)
    assert groups == {"violation", "violation_by_tag"}
    from cai import report

    assert report.TABLE == [m.name for m in metrics.METRICS if not m.group]


def test_docs_are_the_table():
    doc = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
    assert doc.read_text() == metrics.markdown(evaluate.load_gate("shipped").rules), (
        "docs/metrics.md is out of date: run `python -m cai.evaluate > docs/metrics.md`")
