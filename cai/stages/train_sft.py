"""Stage train-sft: QLoRA SFT of the policy on datasets/sft.jsonl (cai.train.sft)."""

from __future__ import annotations

from pathlib import Path

import cai.stages.training as training
from cai.stages.base import Ctx


def run(ctx: Ctx) -> bool:
    from cai.train import sft

    from cai import store
    from cai.errors import InputError
    from cai.stages.critique import count as critique_count

    if not store.count_lines(ctx.rd / "datasets" / "sft.jsonl"):
        dropped = critique_count(ctx.rd, ctx.cfg)["revisions_degenerate"]
        raise InputError(f"train-sft: the critic kept no text to train on (dropped: {dropped}); a stronger critic "
                         "writes usable ones (--critic qwen2.5-0.5b --set critique.mode=principle-driven), or more "
                         "prompts and revision_candidates")
    j = training.job(ctx)
    data = j.datasets / "sft.jsonl"
    return sft.train(j.base_path, data, j.target, j.ckpt, j.recipe, j.card(ctx, "SFT policy", {"sft.jsonl": data}, j.init),
                     init_adapter=j.init, guard=ctx.guard)


def count(rd: Path, cfg) -> dict:
    return training.count(rd, "sft")
