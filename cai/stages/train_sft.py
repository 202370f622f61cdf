"""Stage train-sft: QLoRA SFT of the policy on datasets/sft.jsonl (cai.train.sft)."""

from __future__ import annotations

from pathlib import Path

import cai.stages.training as training
from cai.stages.base import Ctx


def run(ctx: Ctx) -> bool:
    from cai.train import sft

    j = training.job(ctx)
    data = j.datasets / "sft.jsonl"
    return sft.train(j.base_path, data, j.target, j.ckpt, j.recipe, j.card(ctx, "SFT policy", {"sft.jsonl": data}, j.init),
                     init_adapter=j.init, guard=ctx.guard)


def count(rd: Path, cfg) -> dict:
    return training.count(rd, "sft")
