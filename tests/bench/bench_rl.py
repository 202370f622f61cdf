"""Online RL (train-rl) on the embedded model, one short run on this CPU: RL steps per
minute and generated tokens per second (from TRL's own per-step logs), the watch's cost
per point, its curves, and the held-out answers before and after.

The reward is a real reward model: a 4-bit + LoRA sequence classifier trained first on the
separable hand-written pairs (polite and helpful vs rude), scored through the engine seam's
RewardEngine. The judge role is the embedded model itself asked "which response is
better" as an A/B question, both orders averaged (near chance at 135M: this measures the
wiring and its cost, not a verdict). Prints figures; asserts only that it ran.

A real run (CAI_BENCH_RL_ROUND=<a teacher round's folder>, e.g. the one bench_round.py made):
the reward model is trained on that round's preference pairs by construction (the teacher's
kept answer over the student's first answer: refusals of harmful prompts, real answers to
safe-but-scary ones, held answers under pushback), RL starts from that round's SFT adapter on
prompts of the `train` mix the round did not use, and the judge is the embedded
Qwen2.5-0.5B (CAI_BENCH_RL_JUDGE). Knobs: CAI_BENCH_RL_STEPS (default 24), CAI_BENCH_RL_PROMPTS
(default 64), CAI_BENCH_RL_SKIP (prompts of the mix the round used, default 280), CAI_BENCH_RL_KIND_FIT (the
rule term paying for answers that fit their prompt's kind; default: the recipe's), CAI_BENCH_RL_LR (default: the
recipe's), CAI_BENCH_RL_REWARD (a reward model folder an earlier run trained: skips training one).
"""

import json
import os
import time
from pathlib import Path

from cai import models, prompts, store
from cai.pairs import revision_pairs
from cai.engine import LocalEngine, RewardEngine
from cai.feedback import ANSWER_PREFIX, judge_question
from cai.train import common, recipe as R, reward as reward_stage, rl

PREFS = Path(__file__).resolve().parents[1] / "data" / "separable_prefs.jsonl"
QUESTION = "Which response is more helpful, honest and harmless?"


def _round_prefs(rd: Path, out: Path) -> Path:
    """The round's pairs by construction (kept teacher text over the student's first answer) as preference rows."""
    rows = [{"prompt": p["messages"], "chosen": [{"role": "assistant", "content": p["responses"][0]}],
             "rejected": [{"role": "assistant", "content": p["responses"][1]}], "p_chosen": 1.0, "valid": True,
             "prompt_id": p["prompt_id"], "category": p.get("category")}
            for p in revision_pairs(store.read_jsonl(rd / "datasets" / "sft.jsonl"))]
    store.write_jsonl(out, rows)
    print(f"BENCH rl: {len(rows)} preference rows by construction from {rd}")
    return out


def test_bench_rl(tmp_path):
    base = models.base_path(models.resolve(models.EMBEDDED))
    rd = Path(os.environ["CAI_BENCH_RL_ROUND"]) if os.environ.get("CAI_BENCH_RL_ROUND") else None
    if rd is None:
        rec = R.load("cpu-tiny")
        rec = rec.model_copy(update={
            "reward": rec.reward.model_copy(update={"max_steps": 12, "learning_rate": 5e-4, "heldout_fraction": 0.25, "save_steps": 100}),
            "rl": rec.rl.model_copy(update={"max_steps": 4, "watch_every": 2, "heldout": 4, "save_steps": 2})})
        prefs, init, ps = PREFS, None, prompts.load("sample").prompts
    else:
        rec = R.load("cpu-student")
        steps = int(os.environ.get("CAI_BENCH_RL_STEPS", "24"))
        rec = rec.model_copy(update={
            "reward": rec.reward.model_copy(update={"max_steps": 60, "heldout_fraction": 0.2, "save_steps": 100}),
            "rl": rec.rl.model_copy(update={"max_steps": steps, "watch_every": max(1, steps // 6), "save_steps": 4,
                                            "kind_fit": float(os.environ.get("CAI_BENCH_RL_KIND_FIT", rec.rl.kind_fit)),
                                            "learning_rate": float(os.environ.get("CAI_BENCH_RL_LR", rec.rl.learning_rate))})})
        prefs, init = _round_prefs(rd, tmp_path / "prefs.jsonl"), str(rd / "adapters" / "sft")
        skip, n = int(os.environ.get("CAI_BENCH_RL_SKIP", "280")), int(os.environ.get("CAI_BENCH_RL_PROMPTS", "64"))
        ps = prompts.load("train").prompts[skip : skip + n]
    rm_card = common.card_base(kind="reward model", base_model=models.EMBEDDED, round_id="bench", parent=None,
                               constitution_hash=None, recipe=rec, datasets={}, base_path=base)
    given = os.environ.get("CAI_BENCH_RL_REWARD")
    rm = Path(given) if given else tmp_path / "rm"
    if not given:
        assert reward_stage.train(base, prefs, rm, tmp_path / "rm-ck", rec, rm_card)
        print("BENCH rl reward model:", json.dumps({"train": rm_card["train"], "heldout": rm_card["metrics"]}))
    scorer = RewardEngine(models.EMBEDDED, str(rm))

    def reward(ps, cs):
        return scorer.score([[{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c in zip(ps, cs)])

    jm, jt = models.load(os.environ.get("CAI_BENCH_RL_JUDGE", "qwen2.5-0.5b" if rd else models.EMBEDDED))
    judge_engine = LocalEngine(jm, jt)

    def judge(ps, a, b):
        convs = [[{"role": "user", "content": judge_question([{"role": "user", "content": p}], QUESTION, x, y)}]
                 for p, aa, bb in zip(ps, a, b) for x, y in ((aa, bb), (bb, aa))]
        m = judge_engine.choice_mass(convs, [ANSWER_PREFIX] * len(convs), ("A", "B"))
        out = []
        for i in range(len(ps)):
            (a0, b0), (a1, b1) = m[2 * i], m[2 * i + 1]
            out.append((a0 / max(a0 + b0, 1e-9) + b1 / max(a1 + b1, 1e-9)) / 2)
        return out

    ps = [{"messages": p.messages, "category": p.category, "id": p.id, **p.known()} for p in ps]
    card = common.card_base(kind="RL policy", base_model=models.EMBEDDED, round_id="bench", parent=None,
                            constitution_hash=None, recipe=rec, datasets={}, base_path=base)
    t = time.perf_counter()
    assert rl.train(base, ps, tmp_path / "rl", tmp_path / "rl-ck", rec, card, init_adapter=init, reward=reward, judge=judge)
    total = time.perf_counter() - t

    ckpt = max((tmp_path / "rl-ck").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    logs = [x for x in json.loads((ckpt / "trainer_state.json").read_text())["log_history"] if "step_time" in x]
    gen_batch = rec.rl.per_device_train_batch_size * rec.rl.gradient_accumulation_steps
    step_s = [x["step_time"] for x in logs]
    tokens = [x["completions/mean_length"] * gen_batch for x in logs]
    w = card["watch"]
    out = Path(os.environ.get("CAI_BENCH_OUT", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    rl.plot_curves(w["curves"], out / "rl_curves.png", w["flag"], w["kept_step"])
    fig = {
        "steps": len(logs), "answers_per_step": gen_batch, "max_completion_length": rec.rl.max_completion_length,
        "rl_steps_per_minute": round(60 * len(step_s) / sum(step_s), 2),
        "generated_tokens_per_s": round(sum(tokens) / sum(step_s), 2),
        "mean_answer_tokens": round(sum(tokens) / len(tokens) / gen_batch, 1),
        "watch_seconds_per_point": [p["seconds"] for p in w["curves"]],
        "run_seconds_with_loading_and_watch": round(total, 1),
        "curves": [{k: p[k] for k in ("step", "reward", "kl", "length", "judge", "refusal_harmful", "refusal_benign", "train_kl")}
                   for p in w["curves"]],
        "flagged": w["flag"], "kept_step": w["kept_step"],
    }
    print("\nBENCH rl:", json.dumps(fig))
    print("BENCH rl answers (held-out prompt | start | kept):")
    for p, a, b in zip(w["heldout_prompts"], w["answers"]["start"], w["answers"]["kept"] or []):
        print(json.dumps({"prompt": p, "start": a, "kept": b}))
