"""`cai round run` end to end on the embedded model, and bad input refused before loading."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cai.feedback import TRL_COLUMNS
from tests.conftest import TEST_RECIPE
from tests.test_constitution import GOOD

CAI = [sys.executable, "-m", "cai.cli"]


def run(args, **kw):
    return subprocess.run(CAI + args, capture_output=True, text=True, **kw)




@pytest.mark.e2e
def test_round_run_every_stage_on_embedded_model(tmp_path, embedded_dir):
    import datasets
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "round"
    r = run(["round", "run", "--prompts", "sample", "--limit", "6", "--passes", "1", "--max-new-tokens", "32",
             "--revision-candidates", "4", "--set", "critique.fit_kind=false",  # the 135M's own revisions rarely fit
             "--shard-size", "3", "--min-margin", "0", "--principles-per-pair", "2",
             "--stages", "respond,critique,train-sft,pairs,label,train-rm,train-policy,train-rl,evaluate",  # DPO and RL both
             "--recipe", str(TEST_RECIPE), "--eval-limit", "1", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads((out / "manifest.json").read_text())
    assert man["finished"], man["stages"]
    assert set(man["stages"]) == {"respond", "critique", "train-sft", "pairs", "label", "train-rm", "train-policy", "train-rl",
                                  "evaluate"}
    assert man["stages"]["evaluate"]["units"] == 4 and (out / "report" / "index.html").exists()  # 1 slice x (base, sft, policy, rl)
    assert man["stages"]["respond"]["units"] == 2
    assert man["constitution"]["hash"].startswith("sha256:") and man["versions"]["transformers"]
    counts = man["counts"]
    assert counts["prompts"] == 6 and counts["critique_passes"] == 6
    assert counts["revisions_accepted"] + sum(counts["revisions_degenerate"].values()) == 6
    assert counts["sft_rows"] + counts["sft_dropped_no_accepted_revision"] == 6
    assert counts["pairs_by_source"]["samples"] + counts["pairs_identical_skipped"] == 6
    assert counts["pairs_by_source"].get("revision", 0) == counts["sft_rows"] - sum(  # one per accepted revision
        1 for x in (out / "datasets" / "sft.jsonl").read_text().splitlines() if json.loads(x)["revisions_accepted"] == 0)
    judge = counts["judge"]
    # the 135M judge answers by position: it fails its self-check, so its samples stay unlabeled and the
    # round's preference data comes from the revisions, better by construction
    check = judge["self_check"]
    assert not check["passed"] and check["items"] >= 40 and 0 <= check["position_consistency"] < 0.5
    print("\nEMBEDDED JUDGE SELF-CHECK:", json.dumps(check))
    assert judge["pairs_unlabeled_judge_failed"] == counts["pairs_by_source"]["samples"]
    assert judge["pairs_labeled"] == counts["pairs_by_source"]["revision"] >= 1
    assert judge["kept_by_source"] == {"revision": counts["pairs_by_source"]["revision"]}
    assert (out / "constitution.yaml").read_text().startswith("name: harmless-helpful")
    crit = [json.loads(x) for x in (out / "datasets" / "critiques.jsonl").read_text().splitlines()]
    assert len(crit) == 6 and all(c["provenance"]["constitution_hash"] == man["constitution"]["hash"] for c in crit)
    sft = datasets.load_dataset("json", data_files=str(out / "datasets" / "sft.jsonl"), split="train")
    assert sft[0]["messages"][-1]["role"] == "assistant" and sft[0]["provenance"]["round"] == man["round_id"]
    prefs = datasets.load_dataset("json", data_files=str(out / "datasets" / "preferences.jsonl"), split="train")
    row = prefs[0]
    assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert row["p_chosen"] == 1.0 and row["provenance"]["judge"] == "smollm2-135m"
    assert row["source"] == "revision" and row["label_source"] == "construction"
    assert not set(prefs.column_names) & TRL_COLUMNS
    pairs = [json.loads(x) for x in (out / "datasets" / "pairs.jsonl").read_text().splitlines()]
    assert all(p["provenance"]["policy_adapter"] == "adapters/sft" for p in pairs)  # sampled from the SFT policy
    for name in ("sft", "reward", "policy", "rl"):
        card = json.loads((out / "adapters" / name / "cai.json").read_text())
        assert card["round"] == man["round_id"] and card["base_model"] == "smollm2-135m"
        assert man["training"][name]["train"]["steps"] == 2
    rl = json.loads((out / "adapters" / "rl" / "cai.json").read_text())  # against this round's reward model, watched
    assert rl["kind"] == "RL policy" and rl["watch"]["curves"] and "reward" in rl["watch"]["curves"][0]
    print("\nRL WATCH CURVES:", json.dumps(rl["watch"]["curves"]))
    metrics = json.loads((out / "report" / "metrics.json").read_text())["metrics"]
    assert {"base", "sft", "policy", "rl"} <= set(metrics)  # evaluate treats the RL policy like the DPO one
    assert json.loads((out / "adapters" / "policy" / "cai.json").read_text())["train"]["reference"] == "sft adapter"
    assert "heldout_pairs" in man["training"]["reward"]["metrics"]  # one preference row here: nothing held out
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_dir), out / "adapters" / "policy")


def _cons(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BAD_ROUND = {
    "bad_constitution": (lambda t: ["--constitution", str(_cons(t, GOOD.replace("weight: 2", "weight: 0"))), "--prompts", "sample"], "c.yaml:7:13"),
    "malformed_prompts_line": (lambda t: ["--prompts", str(_write(t / "p.jsonl", '{"prompt": "a"}\n{oops\n'))], "p.jsonl:2: malformed JSON"),
    "empty_prompt_set": (lambda t: ["--prompts", str(_write(t / "p.jsonl", "\n"))], "prompt set is empty"),
    "missing_model": (lambda t: ["--prompts", "sample", "--model", str(t / "no-such-model")], "no-such-model': not found"),
    "unknown_stage": (lambda t: ["--prompts", "sample", "--stages", "respond,critque"], "unknown stage critque"),
    "bad_recipe": (lambda t: ["--prompts", "sample", "--recipe", str(_write(t / "r.yaml", "name: r\nsft: {lr: 1}\n"))], "r.yaml:2:7: sft.lr: unknown key 'lr'"),
    "label_without_pairs": (lambda t: ["--prompts", "sample", "--stages", "label"], "label needs pairs"),
    "no_preference_question": (lambda t: ["--constitution", str(_cons(t, GOOD)), "--prompts", "sample", "--stages", "respond,critique,pairs,label"], "honest have no preference_question"),
}


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


@pytest.mark.parametrize("kind", sorted(BAD_ROUND))
def test_round_run_refuses_bad_input_before_loading(kind, tmp_path):
    make, expect = BAD_ROUND[kind]
    out = tmp_path / "out"
    r = run(["round", "run", *make(tmp_path), "--out", str(out)])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert expect in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()  # nothing written


def test_round_run_refuses_non_empty_out(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    r = run(["round", "run", "--prompts", "sample", "--out", str(tmp_path)])
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_label_alone_on_an_existing_responses_file(tmp_path, tiny_model_dir):
    signal = Path(__file__).parent / "data" / "signal_pairs.jsonl"
    out = tmp_path / "labels"
    r = run(["round", "run", "--stages", "label", "--pairs", str(signal), "--model", str(tiny_model_dir),
             "--principles-per-pair", "2", "--min-margin", "0", "--shard-size", "4", "--skip-check", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads((out / "manifest.json").read_text())
    assert man["finished"] and man["stages"]["label"]["units"] == 3
    labels = [json.loads(x) for x in (out / "datasets" / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 10 and man["counts"]["judge"]["pairs_labeled"] == 10
    # a random-weight judge puts almost no mass on A/B: its labels are recorded invalid, not used
    assert man["counts"]["judge"]["pairs_invalid"] == sum(not x["valid"] for x in labels)
    kept = (out / "datasets" / "preferences.jsonl").read_text().splitlines()
    assert len(kept) == man["counts"]["judge"]["pairs_kept"]
    bad = tmp_path / "bad_pairs.jsonl"
    bad.write_text('{"prompt": "x", "responses": ["only one"]}\n')
    r = run(["round", "run", "--stages", "label", "--pairs", str(bad), "--model", str(tiny_model_dir), "--out", str(tmp_path / "o2")])
    assert r.returncode == 2 and "bad_pairs.jsonl:1: needs 'responses'" in r.stderr
