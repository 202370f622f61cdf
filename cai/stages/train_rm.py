"""Stage train-rm: a QLoRA reward model (sequence classification on the policy's base)
on datasets/preferences.jsonl (cai.train.reward)."""

from __future__ import annotations

from pathlib import Path

import cai.stages.training as training
from cai.stages.base import Ctx


def run(ctx: Ctx) -> bool:
    from cai.train import reward

    training.need_preferences(ctx)
    j = training.job(ctx)
    data = j.datasets / "preferences.jsonl"
    return reward.train(j.base_path, data, j.target, j.ckpt, j.recipe,
                        j.card(ctx, "reward model", {"preferences.jsonl": data}, None), guard=ctx.guard)


def count(rd: Path, cfg) -> dict:
    return training.count(rd, "reward")
