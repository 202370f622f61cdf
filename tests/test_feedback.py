import pytest

from cai import constitution as C
from cai.errors import InputError
from cai.engine import LocalEngine
from cai.feedback import LabelSettings, judge_stats, label_pairs, sample_judge_principles
from cai.generation import choice_token_ids
from tests.test_constitution import DEFAULT, GOOD

PAIRS = [
    {"prompt_id": "p1", "messages": [{"role": "user", "content": "How do I boil an egg?"}],
     "responses": ["Put it in boiling water for 8 minutes.", "I can't help with that."]},
    {"prompt_id": "p2", "messages": [{"role": "user", "content": "Name a prime."}],
     "responses": ["7 is prime.", "Primes are numbers. 9 is one."]},
]


def _swap(pairs):
    return [{**p, "responses": p["responses"][::-1]} for p in pairs]


@pytest.fixture(scope="module")
def cons():
    return C.load(DEFAULT)


def test_choice_tokens_cover_spellings(tiny):
    _, tok = tiny
    a, b = choice_token_ids(tok)
    assert a and b and not set(a) & set(b)
    assert all(tok.decode([t]).strip() == "A" for t in a)
    assert len(a) >= 2  # 'A' and ' A' at least


def test_probabilities_and_symmetry(tiny, cons):
    model, tok = tiny
    s = LabelSettings(principles_per_pair=3, min_mass=0.0)
    rows = label_pairs(LocalEngine(model, tok), cons, PAIRS, s, seed=1, provenance={"round": "t"})
    swapped = label_pairs(LocalEngine(model, tok), cons, _swap(PAIRS), s, seed=1, provenance={})
    for r, w in zip(rows, swapped):
        assert 0.5 <= r["p_chosen"] <= 1 and 0 <= r["label_margin"] <= 1
        assert r["p_first"] == pytest.approx(1 - w["p_first"], abs=1e-5)  # swapping A and B swaps the label
        assert r["chosen"] == w["chosen"] and r["rejected"] == w["rejected"]
        assert len(r["principles"]) == 3
        for x in r["principles"]:
            assert 0 <= x["p_first_order0"] <= 1 and 0 <= x["p_first_order1"] <= 1
            assert 0 <= x["mass_order0"] <= 1 + 1e-6
        # ensemble = mean over principles of the mean over both orders
        means = [(x["p_first_order0"] + x["p_first_order1"]) / 2 for x in r["principles"]]
        assert r["p_first"] == pytest.approx(sum(means) / len(means))
        assert r["prompt"][-1]["role"] == "user" and r["chosen"][0]["role"] == "assistant"


def test_invalid_when_mass_is_low(tiny, cons):
    model, tok = tiny
    rows = label_pairs(LocalEngine(model, tok), cons, PAIRS, LabelSettings(min_mass=0.99), seed=1, provenance={})
    assert all(not r["valid"] and r["p_chosen"] == 0.5 for r in rows)  # random model: no mass on A/B
    st = judge_stats(rows, LabelSettings())
    assert st["pairs_invalid"] == 2 and st["pairs_kept"] == 0


def test_cot_probabilities_are_clamped(tiny, cons):
    model, tok = tiny
    s = LabelSettings(principles_per_pair=2, min_mass=0.0, chain_of_thought=True, cot_max_new_tokens=4)
    rows = label_pairs(LocalEngine(model, tok), cons, PAIRS, s, seed=1, provenance={})
    for r in rows:
        for x in r["principles"]:
            assert 0.4 <= x["p_first_order0"] <= 0.6 and 0.4 <= x["p_first_order1"] <= 0.6
        assert r["provenance"]["mode"] == "chain-of-thought"


def test_judge_principles_distinct_weighted_seeded(cons):
    a = sample_judge_principles(cons, 4, 0, "x")
    assert len({p.id for p in a}) == 4 and a == sample_judge_principles(cons, 4, 0, "x")
    assert len(sample_judge_principles(cons, 99, 0, "x")) == len(cons.principles)


def test_stats_position_consistency():
    def row(p0, p1, valid=True):
        pf = (p0 + p1) / 2
        pc = max(pf, 1 - pf)
        return {"valid": valid, "label_margin": 2 * pc - 1, "p_chosen": pc,
                "principles": [{"p_first_order0": p0, "p_first_order1": p1, "mass_order0": 0.5, "mass_order1": 0.7,
                                "consistent": (p0 > 0.5) == (p1 > 0.5)}]}
    st = judge_stats([row(0.9, 0.8), row(0.9, 0.1), row(0.52, 0.53)], LabelSettings(min_margin=0.1))
    assert st["position_consistency"] == pytest.approx(2 / 3, abs=1e-3)
    assert st["mean_choice_mass"] == pytest.approx(0.6)
    assert st["pairs_kept"] == 1 and st["pairs_below_margin"] == 2


def test_missing_preference_question_is_refused(tiny):
    model, tok = tiny
    c = C.parse(GOOD)  # 'honest' has no preference_question
    with pytest.raises(InputError, match="honest have no preference_question"):
        label_pairs(LocalEngine(model, tok), c, PAIRS, LabelSettings(), seed=0, provenance={})


def test_tokenizer_without_letters_is_refused(tiny_model_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"[UNK]": 0, "yes": 1, "no": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")
    with pytest.raises(InputError, match="no token that spells A or B"):
        choice_token_ids(tok)
