"""Stage pairs: two answers per prompt from the round's pair sources (cai.pairs): policy
samples, revision vs first answer, contrastive answers by the critic."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cai import store
from cai.stages.base import Ctx, relative, rows_of

if TYPE_CHECKING:
    from cai.config import Round


def run(ctx: Ctx) -> dict:
    from cai import pairs

    sources = ctx.cfg.pairs.sources
    adapter = ctx.policy_adapter()
    prov = ctx.provenance(policy_adapter=relative(ctx.rd, adapter))
    rows: list[dict] = []
    identical = 0
    if "samples" in sources:
        got, n = pairs.sample_pairs(ctx.engine("policy"), ctx.prompts(), ctx.sampling())
        rows, identical = rows + got, identical + n
    if "contrastive" in sources:  # answers written under the constitution: the critic's
        got, n = pairs.contrastive_pairs(ctx.engine("critic"), ctx.cons, ctx.prompts(),
                                         ctx.sampling("contrastive"), ctx.cfg.seed)
        rows, identical = rows + got, identical + n
    if "revision" in sources:  # made by the critique stage of the same shard (its policy adapter is in its rows)
        rows += pairs.revision_pairs(ctx.payload("critique")["sft"])
    return {"rows": [{**r, "provenance": prov} for r in rows], "identical_skipped": identical}


def count(rd: Path, cfg: "Round") -> dict:
    parts = [store.read_json(f) for f in sorted((rd / "work" / "pairs").glob("*.json"))]
    by_source: dict[str, int] = {}
    for r in rows_of(parts):
        by_source[r["source"]] = by_source.get(r["source"], 0) + 1
    return {"pairs": sum(by_source.values()), "pairs_by_source": by_source,
            "pairs_identical_skipped": sum(p["identical_skipped"] for p in parts)}
