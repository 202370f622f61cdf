"""Stage critique: critique-and-revise of the shard's first answers, by the critic role;
merged into datasets/sft.jsonl (accepted revisions) and datasets/critiques.jsonl (every pass)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cai import roles, store
from cai.stages.base import Ctx, relative, rows_of

if TYPE_CHECKING:
    from cai.config import Round

OUTPUT = "datasets/sft.jsonl"


def run(ctx: Ctx) -> dict:
    from cai import critique

    adapter = ctx.policy_adapter() if roles.follows_policy(ctx.cfg, "critic") else None
    prov = ctx.provenance(passes=ctx.cfg.critique.passes, adapter=relative(ctx.rd, adapter),
                          critic=roles.spec(ctx.cfg, "critic"))
    sft, crit = critique.critique_revise(ctx.engine("critic"), ctx.cons, ctx.payload("respond")["rows"],
                                         ctx.cfg.critique, ctx.sampling(), prov)
    return {"sft": sft, "critiques": crit}


def merge(ctx: Ctx, parts: list[dict]) -> None:
    store.write_jsonl(ctx.rd / "datasets" / "critiques.jsonl", rows_of(parts, "critiques"))
    store.write_jsonl(ctx.rd / OUTPUT, rows_of(parts, "sft"))


def count(rd: Path, cfg: "Round") -> dict:
    rows = store.read_jsonl(rd / "datasets" / "critiques.jsonl")
    why: dict[str, int] = {}
    for r in rows:
        if r["degenerate"]:
            why[r["degenerate"]] = why.get(r["degenerate"], 0) + 1
    n_sft = len(store.read_jsonl(rd / OUTPUT))
    n_prompts = store.count_lines(rd / "inputs" / "prompts.jsonl")
    return {"critique_passes": len(rows), "revisions_degenerate": why, "revisions_accepted": len(rows) - sum(why.values()),
            "sft_rows": n_sft, "sft_dropped_no_accepted_revision": n_prompts - n_sft}
