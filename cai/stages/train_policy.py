"""Stage train-policy: DPO of the policy on datasets/preferences.jsonl, starting from this
round's SFT adapter (else the parent's policy) (cai.train.dpo)."""

from __future__ import annotations

from pathlib import Path

import cai.stages.training as training
from cai.stages.base import Ctx


def run(ctx: Ctx) -> bool:
    from cai.train import dpo

    training.need_preferences(ctx)
    j = training.job(ctx)
    data = j.datasets / "preferences.jsonl"
    return dpo.train(j.base_path, data, j.target, j.ckpt, j.recipe,
                     j.card(ctx, "DPO policy", {"preferences.jsonl": data}, j.init), sft_adapter=j.init, guard=ctx.guard)


def count(rd: Path, cfg) -> dict:
    return training.count(rd, "policy")
