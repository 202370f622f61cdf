import pytest

from cai.generation import Sampling, generate, next_token_mass, render

CONVS = [[{"role": "user", "content": "Hi"}],
         [{"role": "user", "content": "Tell me a long story about a dragon who learns to code in Rust."}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]]


def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tok = tiny
    s = Sampling(max_new_tokens=8, temperature=0, batch_size=8)
    batched = generate(model, tok, CONVS, s)
    single = [generate(model, tok, [c], s)[0] for c in CONVS]
    assert [g.text for g in batched] == [g.text for g in single]  # left padding does not change answers
    assert all(0 < g.n_tokens <= 8 for g in batched)


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    s = Sampling(max_new_tokens=6, temperature=1.0, top_p=1.0, batch_size=2, seed=7)
    a = [g.text for g in generate(model, tok, CONVS, s)]
    b = [g.text for g in generate(model, tok, CONVS, s)]
    c = [g.text for g in generate(model, tok, CONVS, s.model_copy(update={"seed": 8}))]
    assert a == b and a != c


def test_next_token_mass_matches_softmax(tiny):
    import torch

    model, tok = tiny
    texts = [render(tok, c) for c in CONVS]
    cands = [[10, 11], [12]]
    got = next_token_mass(model, tok, texts, cands, batch_size=2)
    for t, row in zip(texts, got):
        ids = tok(t, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            p = torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        assert row[0] == pytest.approx(float(p[10] + p[11]), rel=1e-4)
        assert row[1] == pytest.approx(float(p[12]), rel=1e-4)


def test_shared_prefix_cache_changes_nothing(tiny, monkeypatch):
    from cai import generation

    model, tok = tiny
    shots = [{"role": "user", "content": "Example question about cooking pasta well?"},
             {"role": "assistant", "content": "Boil salted water, cook the pasta until al dente, then drain it."}] * 3
    convs = [shots + c[-1:] for c in CONVS]
    s = Sampling(max_new_tokens=6, temperature=0, batch_size=2)
    enc = [tok(render(tok, c), add_special_tokens=False)["input_ids"] for c in convs]
    assert generation._common_prefix(enc) >= 60
    cached = [g.text for g in generate(model, tok, convs, s)]
    texts = [render(tok, c) for c in convs]
    mass_cached = next_token_mass(model, tok, texts, [[10], [11]], batch_size=2)
    monkeypatch.setattr(generation, "MIN_SHARED", 10**9)
    assert [g.text for g in generate(model, tok, convs, s)] == cached
    plain = next_token_mass(model, tok, texts, [[10], [11]], batch_size=2)
    for a, b in zip(mass_cached, plain):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-9)


def test_grouped_mass_equals_plain_scoring(tiny):
    import torch

    from cai.generation import next_token_mass_grouped

    model, tok = tiny
    shots = render(tok, [{"role": "user", "content": "A shared worked example about kettles and tea."}] * 4, False)
    groups = [(shots + f"Passage number {i}: " + "words " * (3 + 5 * i), [f"Question {j}? Answer: (" for j in range(3 - i % 2)])
              for i in range(4)]
    grouped = next_token_mass_grouped(model, tok, groups, [[10, 11], [12]], batch_size=5)
    for (head, tails), got in zip(groups, grouped):
        for t, a in zip(tails, got):
            ids = tok(head, add_special_tokens=False)["input_ids"] + tok(t, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            assert a == pytest.approx([float(p[10] + p[11]), float(p[12])], rel=1e-4, abs=1e-9)
