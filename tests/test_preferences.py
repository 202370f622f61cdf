"""Preference data that survives a weak judge (issue 11): the judge's self-check, the three
pair sources, construction labels, TRL-safe columns, lineage from a parent round."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cai import constitution as C
from cai import pairs as P
from cai.feedback import (TRL_COLUMNS, LabelSettings, calibration_items, check_failed_line, constructed_labels,
                          self_check)
from cai.generation import Generation
from tests.conftest import CAI
from tests.test_constitution import DEFAULT


class KnowingJudge:
    """A judge right by construction: it looks up which shown response is the known better one."""

    def __init__(self, items, position_only: bool = False):
        self.better = {it["better"] for it in items}
        self.position_only = position_only
        self.name = "knowing"

    def choice_mass(self, conversations, prefixes, choices=("A", "B"), *, groups=None, batch_size=16):
        out = []
        for conv in conversations:
            text = conv[-1]["content"]
            a = text.split("Response (A): ", 1)[1].split("\n\nResponse (B): ", 1)[0]
            a_better = True if self.position_only else a in self.better
            out.append([0.9, 0.05] if a_better else [0.05, 0.9])
        return out


@pytest.fixture(scope="module")
def cons():
    return C.load(DEFAULT)


def test_self_check_passes_a_right_judge_and_fails_a_positional_one(cons):
    s = LabelSettings()
    items = calibration_items(cons, s)
    assert len(items) >= 40 and {"few_shot[2]", "few_shot[3]"} <= {it["id"] for it in items}  # examples not in the prompt
    good = self_check(KnowingJudge(items), cons, s)
    assert good["passed"] and good["accuracy"] == 1.0 and good["position_consistency"] == 1.0
    biased = self_check(KnowingJudge(items, position_only=True), cons, s)
    assert not biased["passed"] and biased["position_consistency"] == 0.0 and biased["accuracy"] <= 0.5
    line = check_failed_line("j", biased)
    assert "accuracy 0.00" in line or "accuracy 0.50" in line or "accuracy" in line
    assert "position consistency 0.00 (needs 0.50)" in line and "\n" not in line


def test_self_check_on_the_tiny_random_judge_fails(tiny, cons):
    from cai.engine import LocalEngine

    model, tok = tiny
    check = self_check(LocalEngine(model, tok), cons, LabelSettings(few_shot=0))
    assert not check["passed"] and check["invalid"] == check["items"]  # no mass on A/B: every item invalid


def test_revision_pairs_and_construction_labels():
    sft = [{"prompt_id": "p1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "better"}],
            "category": None, "initial_response": "first", "revisions_accepted": 1, "provenance": {"principles": ["harm"]}},
           {"prompt_id": "p2", "messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "same"}],
            "category": None, "initial_response": "same", "revisions_accepted": 0, "provenance": {"principles": []}}]
    rows = P.revision_pairs(sft)
    assert len(rows) == 1 and rows[0]["responses"] == ["better", "first"] and rows[0]["better"] == 0
    assert rows[0]["messages"] == [{"role": "user", "content": "q"}] and rows[0]["source"] == "revision"
    labels = constructed_labels(rows, LabelSettings(), {"round": "t"})
    assert labels[0]["chosen"][0]["content"] == "better" and labels[0]["rejected"][0]["content"] == "first"
    assert labels[0]["p_chosen"] == 1.0 and labels[0]["label_source"] == "construction"


def test_contrastive_pairs_use_the_principles_prompts(cons):
    class Echo:
        name = "echo"

        def generate(self, conversations, sampling, *, prefixes=None):
            return [Generation(c[0]["content"][:40], 5, True) for c in conversations]

    from cai.prompts import Prompt

    prompts = [Prompt(id=f"p{i}", messages=[{"role": "user", "content": f"q{i}"}]) for i in range(6)]
    from cai.generation import Sampling

    rows, identical = P.contrastive_pairs(Echo(), cons, prompts, Sampling(), seed=0)
    assert identical == 0 and len(rows) == 6
    for r in rows:
        follow, violate = P.contrast_prompts(cons.principle(r["principle"]))
        assert r["responses"] == [follow[:40], violate[:40]] and r["better"] == 0
        assert r["messages"] == [{"role": "user", "content": r["messages"][0]["content"]}]  # trained without the system prompt


def _run(args, **kw):
    return subprocess.run(CAI + [str(a) for a in args], capture_output=True, text=True, **kw)


def test_each_source_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir):
    out = tmp_path / "r"
    r = _run(["round", "run", "--out", out, "--prompts", "sample", "--limit", "4", "--model", tiny_model_dir,
              "--stages", "respond,critique,pairs,label", "--pair-sources", "samples,contrastive,revision",
              "--max-new-tokens", "6", "--passes", "1", "--keep-degenerate", "--min-mass", "0", "--min-margin", "0",
              "--principles-per-pair", "1", "--skip-check"])
    assert r.returncode == 0, r.stderr[-2000:]
    man = json.loads((out / "manifest.json").read_text())
    by = man["counts"]["pairs_by_source"]
    assert by.get("samples", 0) + by.get("contrastive", 0) >= 4  # the random model's samples differ
    labels = [json.loads(x) for x in (out / "datasets" / "labels.jsonl").read_text().splitlines()]
    assert {x["source"] for x in labels} == set(by)
    assert all(x["label_source"] == ("judge" if x["source"] == "samples" else "construction") for x in labels)
    assert not man["counts"]["judge"]["self_check"]["passed"]  # labeled anyway: --skip-check
    assert (out / "datasets" / "judge_check.jsonl").exists()


def test_a_failed_check_stops_a_judge_only_round_with_the_figures(tmp_path, tiny_model_dir):
    signal = Path(__file__).parent / "data" / "signal_pairs.jsonl"
    r = _run(["round", "run", "--out", tmp_path / "o", "--stages", "label", "--pairs", signal, "--model", tiny_model_dir])
    assert r.returncode == 2 and "failed its self-check" in r.stderr and "position consistency" in r.stderr
    assert "Traceback" not in r.stderr and "failed its self-check" in r.stderr.strip().splitlines()[-1]


def test_nothing_to_train_on_names_the_cause(tmp_path, tiny_model_dir):
    from tests.conftest import TEST_RECIPE

    r = _run(["round", "run", "--out", tmp_path / "o", "--prompts", "sample", "--limit", "2", "--model", tiny_model_dir,
              "--stages", "respond,critique,pairs,label,train-rm", "--max-new-tokens", "4", "--passes", "1",
              "--recipe", TEST_RECIPE])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no usable preference pairs" in r.stderr and "self-check accuracy" in r.stderr
    assert "left unlabeled because the judge failed its self-check" in r.stderr


def test_pulled_preferences_train_with_trl_to_the_same_loss(tiny_model_dir, tmp_path):
    """Our extra columns change nothing in TRL's RewardTrainer and DPOTrainer: same loss as on
    prompt/chosen/rejected alone."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from cai import store

    rows = constructed_labels(
        [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"Question {i}?"}], "category": None,
          "responses": [f"A kind answer {i}.", "No."], "source": "revision", "better": 0, "principle": "harm"}
         for i in range(4)], LabelSettings(constructed_p_chosen=0.8), {"round": "t", "judge": "j"})
    store.write_jsonl(tmp_path / "preferences.jsonl", rows)
    full = datasets.load_dataset("json", data_files=str(tmp_path / "preferences.jsonl"), split="train")
    assert not set(full.column_names) & TRL_COLUMNS
    bare = full.select_columns(["prompt", "chosen", "rejected"])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    common = dict(per_device_train_batch_size=4, report_to="none", use_cpu=True, max_steps=1, disable_tqdm=True)

    def first_loss(make, ds):
        torch.manual_seed(0)
        trainer = make(ds)
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch).item()

    def reward(ds):
        torch.manual_seed(0)
        m = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
        m.config.pad_token_id = tok.pad_token_id
        return RewardTrainer(model=m, args=RewardConfig(output_dir=str(tmp_path / "rm"), **common), train_dataset=ds,
                             processing_class=tok)

    def dpo(ds):
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        return DPOTrainer(model=m, args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common), train_dataset=ds,
                          processing_class=tok)

    for make in (reward, dpo):
        assert first_loss(make, full) == pytest.approx(first_loss(make, bare), rel=1e-6), make.__name__


def test_a_child_round_generates_from_its_parents_policy(tmp_path, tiny_model_dir, monkeypatch):
    """respond (and critique, pairs) of a child round start from the parent's policy adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cai import store
    from cai.config import Round

    store_dir = tmp_path / "store"
    env = {"CAI_STORE": str(store_dir)}
    parent = store_dir / "rounds" / "r-parent"
    store.write_json(parent / "round.json", Round(round_id="r-parent", prompts="sample").model_dump(mode="json"))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    for p in model.parameters():
        if p.requires_grad:
            p.data.mul_(40)  # a policy that clearly differs from the base
    model.save_pretrained(parent / "adapters" / "policy")
    import os

    common = ["round", "run", "--prompts", "sample", "--limit", "3", "--model", tiny_model_dir, "--stages", "respond",
              "--max-new-tokens", "6"]
    child = _run([*common, "--out", tmp_path / "child", "--config", _greedy(tmp_path, "r-parent")], env={**os.environ, **env})
    base = _run([*common, "--out", tmp_path / "base", "--config", _greedy(tmp_path, None)], env={**os.environ, **env})
    assert child.returncode == 0 and base.returncode == 0, child.stderr[-2000:] + base.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "child" / "datasets" / "responses.jsonl").read_text().splitlines()]
    plain = [json.loads(x) for x in (tmp_path / "base" / "datasets" / "responses.jsonl").read_text().splitlines()]
    assert all(r["provenance"]["adapter"] == "inputs/parent_policy" for r in rows)
    assert all(r["provenance"]["adapter"] is None for r in plain)
    assert [r["response"] for r in rows] != [r["response"] for r in plain]
    man = json.loads((tmp_path / "child" / "manifest.json").read_text())
    assert man["parent_round"] == "r-parent" and man["models"]["stages"]["respond"]["adapter"] == "inputs/parent_policy"


def _greedy(tmp_path: Path, parent: str | None) -> Path:
    p = tmp_path / f"greedy-{parent}.yaml"
    p.write_text(json.dumps({"sampling": {"temperature": 0}, **({"parent": parent} if parent else {})}))
    return p
