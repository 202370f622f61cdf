"""Stage train-rl: online RL of the policy (RLOO, cai.train.rl) against the round's reward
model through the engine seam's `score` verb, from this round's SFT adapter (else the
parent's policy), with the watch: the judge role's pairwise preference of the current
answer over the start's (both orders, the label stage's principle ensemble) as the
independent judgement, used only when the judge passed its self-check."""

from __future__ import annotations

from pathlib import Path

import cai.stages.training as training
from cai import roles, store
from cai.stages.base import Ctx


def _reward(ctx: Ctx):
    from cai.engine import RewardEngine

    engine = RewardEngine(roles.spec(ctx.cfg, "reward"), str(ctx.rd / "adapters" / "reward"))

    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        return engine.score([[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                             for p, c in zip(prompts, completions)])

    return reward


def _judge(ctx: Ctx):
    """P(a better than b) per prompt from the judge role, or None when it has not passed its
    self-check (then the watch keeps the latest point before any flag)."""
    from cai import feedback
    from cai.stages.label import self_check

    engine = roles.engine(ctx, "judge")
    if not self_check(ctx, engine)["passed"]:
        return None

    def judge(prompts: list[str], a: list[str], b: list[str]) -> list[float]:
        pairs = [{"prompt_id": f"rl-{i}", "messages": [{"role": "user", "content": p}], "category": None,
                  "responses": [x, y]} for i, (p, x, y) in enumerate(zip(prompts, a, b))]
        labels = feedback.label_pairs(engine, ctx.cons, pairs, ctx.cfg.label, ctx.cfg.seed, {"stage": "train-rl"})
        return [lab["p_first"] if lab["valid"] else None for lab in labels]

    return judge


def run(ctx: Ctx) -> bool:
    from cai.errors import InputError
    from cai.train import rl

    if not (ctx.rd / "adapters" / "reward" / "adapter_config.json").exists():
        raise InputError("train-rl needs the round's reward model (adapters/reward): add train-rm to the stages")
    judge = _judge(ctx)
    reward = _reward(ctx)
    j = training.job(ctx)
    prompts = [{"prompt_id": p.id, "messages": p.messages, "category": p.category, **p.known()} for p in ctx.prompts()]
    return rl.train(j.base_path, prompts, j.target, j.ckpt, j.recipe, j.card(ctx, "RL policy", {}, j.init),
                    init_adapter=j.init, reward=reward, judge=judge, guard=ctx.guard)


def count(rd: Path, cfg) -> dict:
    return training.count(rd, "rl")
