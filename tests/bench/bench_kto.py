"""An experiment, not a stage: does a refusal decision taught with negatives (KTO, Ethayarajh et
al. 2024: unpaired desirable / undesirable answers) separate harmful from safe-but-scary prompts
where SFT on the teacher's kept texts does not?

SFT only ever raises the likelihood of what it is shown: a benign prompt's answer barely pushes
a refusal down while the refusal is still unlikely there, so the refusals learned on harmful
prompts spread to safe-but-scary ones (bench_round). KTO also pushes down what is marked
undesirable. From a finished teacher round (`CAI_BENCH_KTO_ROUND`, e.g. bench_round's with
--basetemp): desirable = its kept SFT rows (the teacher's refusals of harmful prompts, its real
answers to benign ones); undesirable = a refusal (one of the round's kept ones, in turn) as the
answer to each of its helpful and safe-but-scary prompts, and the student's first answer to each
harmful prompt it complied with. LoRA from the base (recipe cpu-student's LoRA and SFT
settings, 1 epoch unless CAI_BENCH_KTO_EPOCHS), then `cai eval` on the shipped probes as the
round's evaluate stage does (greedy, 64 tokens, 100 per set). Prints figures.

Measured once (bench_round's round of 155 kept rows; 155 desirable, 209 undesirable; 46 steps, 12.5 min):
no refusal left on any probe (harmful compliance 72% -> 96%, over-refusal 5% -> 0%): the negatives on
benign prompts outweighed the same texts' positives on harmful ones. Not shipped.

`CAI_BENCH_KTO_DECISION=1`: the refusal decision on every prompt of the `train` mix (its labels are free:
the prompt's kind), balanced: a kept refusal (in turn) desirable as the answer to each of the mix's 300
harmful prompts and undesirable for each of its 300 safe-but-scary ones, beside the round's kept rows
(desirable) and the student's compliance with the round's harmful prompts (undesirable). Measured once
(a rerun of bench_round's round, 152 kept rows; 452 desirable, 369 undesirable; 103 steps, 1026 s):
harmful compliance 72% -> 57% [47, 66], over-refusal 5% -> 17% [11, 26], flips 47% (n=15) -> 80%
(n=10), full refusals of harmful probes 9% -> 31%. The same line as SFT (62% / 17%): not shipped.

Run: CAI_BENCH_KTO_ROUND=... python -m pytest tests/bench/bench_kto.py -s -p no:cacheprovider --override-ini addopts=""
Knobs (env): CAI_BENCH_KTO_LR (default 5e-4), CAI_BENCH_KTO_BETA (0.1), CAI_BENCH_KTO_EPOCHS (1),
CAI_BENCH_KTO_DECISION (1: the decision rows above instead of the benign-prompt negatives).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai import models, store
from cai.critique import BENIGN, HARMFUL, kind_misfit


def kto_rows(rd: Path, decision: bool = False) -> list[dict]:
    sft = store.read_jsonl(rd / "datasets" / "sft.jsonl")
    responses = store.read_jsonl(rd / "datasets" / "responses.jsonl")
    rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:], "label": True} for r in sft]
    refusals = [r["messages"][-1]["content"] for r in sft if r["category"] in HARMFUL
                and kind_misfit(r["messages"][-1]["content"], r["category"], request=r["messages"][0]["content"]) is None]
    if decision:  # the decision on every prompt of the mix: a refusal desirable on harmful, undesirable on safe-but-scary
        mix = [r for r in store.read_jsonl(Path(__file__).parents[2] / "cai" / "data" / "prompts" / "train.jsonl")
               if r.get("category") in ("red_team", "borderline")]
        for i, r in enumerate(mix):
            rows.append({"prompt": [{"role": "user", "content": r["prompt"]}],
                         "completion": [{"role": "assistant", "content": refusals[i % len(refusals)]}],
                         "label": r["category"] in HARMFUL})
        return rows + [{"prompt": r["messages"], "completion": [{"role": "assistant", "content": r["response"]}],
                        "label": False} for r in responses
                       if r["category"] in HARMFUL and kind_misfit(r["response"], r["category"]) == "complies-harmful"]
    n = 0
    for r in responses:
        if r["category"] in BENIGN and r["category"] != "pushback" and refusals:
            rows.append({"prompt": r["messages"], "completion": [{"role": "assistant", "content": refusals[n % len(refusals)]}],
                         "label": False})
            n += 1
        elif r["category"] in HARMFUL and kind_misfit(r["response"], r["category"]) == "complies-harmful":
            rows.append({"prompt": r["messages"], "completion": [{"role": "assistant", "content": r["response"]}],
                         "label": False})
    return rows


@pytest.mark.skipif(not os.environ.get("CAI_BENCH_KTO_ROUND"), reason="set CAI_BENCH_KTO_ROUND to a teacher round folder")
def test_bench_kto_decision(tmp_path):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from cai.train import common
    from cai.train import recipe as R

    rd = Path(os.environ["CAI_BENCH_KTO_ROUND"])
    rows = kto_rows(rd, decision=os.environ.get("CAI_BENCH_KTO_DECISION") == "1")
    good, bad = sum(r["label"] for r in rows), sum(not r["label"] for r in rows)
    recipe = R.load("cpu-student")
    t0 = time.time()
    model, tok = common.load_base(models.base_path(models.resolve("smollm2-135m")), recipe)
    model, peft_config = common.start_from(model, recipe, None)
    args = KTOConfig(output_dir=str(tmp_path / "ckpt"), learning_rate=float(os.environ.get("CAI_BENCH_KTO_LR", "5e-4")),
                     beta=float(os.environ.get("CAI_BENCH_KTO_BETA", "0.1")),
                     num_train_epochs=float(os.environ.get("CAI_BENCH_KTO_EPOCHS", "1")),
                     per_device_train_batch_size=8, max_length=256, desirable_weight=1.0,
                     undesirable_weight=round(good / bad, 3), use_cpu=True, report_to="none", save_strategy="no",
                     logging_steps=5, seed=0, warmup_steps=0.05)
    trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft_config)
    trainer.train()
    out = tmp_path / "kto"
    trainer.model.save_pretrained(out)
    tok.save_pretrained(out)
    train_s = round(time.time() - t0, 1)
    ev = tmp_path / "eval"
    subprocess.run([str(Path(sys.executable).parent / "cai"), "eval", "--model", "smollm2-135m", "--adapter", str(out), "--probes",
                    "harmful,borderline,sycophancy", "--limit", "100", "--max-new-tokens", "64", "--no-judge",
                    "--batch-size", "24", "--out", str(ev)], check=False)  # exit 1: gated, still a report
    m = json.loads((ev / "metrics.json").read_text())["metrics"]
    print(f"\nBENCH kto ({good} desirable, {bad} undesirable rows; train {train_s} s): policy adapter")
    for k in ("harmful_compliance", "harmful_degenerate", "over_refusal", "sycophancy_flip", "mean_tokens"):
        v = m["adapter"].get(k) or {}
        print(f"  {k:20s} {v.get('value')} [{v.get('lo')}, {v.get('hi')}] (n={v.get('n')})")
