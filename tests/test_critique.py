from collections import Counter

from cai import constitution as C
from cai import prompts as P
from cai.critique import CritiqueSettings, critique_revise, degenerate, respond, sample_principle
from cai.engine import LocalEngine
from cai.generation import Sampling
from tests.test_constitution import DEFAULT


def test_principle_sampling_is_weighted_and_seeded():
    c = C.parse("""
name: w
principles:
  - {id: heavy, critique_request: c, revision_request: r, weight: 9}
  - {id: light, critique_request: c, revision_request: r, weight: 1}
""")
    picks = Counter(sample_principle(c, 0, f"p{i}", 0).id for i in range(2000))
    assert 0.85 < picks["heavy"] / 2000 < 0.95
    assert sample_principle(c, 0, "x", 1).id == sample_principle(c, 0, "x", 1).id


def test_degenerate_kinds():
    assert degenerate("", "a", True) == "empty"
    assert degenerate("Same  text", "same text", True) == "unchanged"
    assert degenerate("new text", "old", False) == "truncated"
    assert degenerate("I am here. " * 20, "old", True) == "repetitive"
    assert degenerate("A proper, different answer.", "old", True) is None
    crit = "The response helps to deceive, as it uses psychological manipulation to create a false narrative."
    assert degenerate(crit, "old", True, crit) == "copies-critique"
    assert degenerate("The response is very safe and will always be the best option.", "old", True, crit) == "meta"
    assert degenerate("The assistant's response is too long.", "old", True) == "meta"
    assert degenerate("The Eiffel Tower is 330 m tall.", "old", True, crit) is None  # an answer, not meta
    # what it would do, in its instructions' words (the 0.5B teacher's, kept once before this check)
    assert degenerate("Given the context and the warning, I would most likely decline brief and offer a safe "
                      "alternative. Blowing up a mailbox is dangerous.", "old", True) == "meta"
    assert degenerate("I would refuse to write that; here is why.", "old", True) == "meta"
    assert degenerate("I'm sorry, but I can't help with that. I would suggest talking to a counselor.", "old", True) is None


def test_critique_revise_on_tiny_model(tiny):
    model, tok = tiny
    cons = C.load(DEFAULT)
    prompts = P.load("sample").prompts[:5]
    s = Sampling(max_new_tokens=12, batch_size=8, seed=3)
    engine = LocalEngine(model, tok)
    responses = respond(engine, prompts, s)
    assert [r["prompt_id"] for r in responses] == [p.id for p in prompts]
    settings = CritiqueSettings(passes=2, few_shot=2, drop_degenerate=False)
    sft, crit = critique_revise(engine, cons, responses, settings, s, {"round": "t"})
    assert len(crit) == 2 * len(prompts) and len(sft) == len(prompts)
    ids = {p.id for p in cons.principles}
    assert all(r["principle"] in ids for r in crit)
    for row in sft:
        assert row["messages"][-1]["role"] == "assistant"
        assert row["messages"][:-1] == next(p.messages for p in prompts if p.id == row["prompt_id"])
        assert row["provenance"]["round"] == "t" and len(row["provenance"]["principles"]) == 2
    # a random-weight model never finishes inside 12 tokens: every revision is flagged truncated
    assert {r["degenerate"] for r in crit} <= {"truncated", "repetitive", "empty", "unchanged"}
    dropped, _ = critique_revise(engine, cons, responses, settings.model_copy(update={"drop_degenerate": True}), s, {})
    assert dropped == []
