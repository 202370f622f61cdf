"""Stage respond: the policy's first answer to every prompt of a shard."""

from __future__ import annotations

from cai.stages.base import Ctx, relative


def run(ctx: Ctx) -> dict:
    from cai import critique

    adapter = ctx.policy_adapter()
    rows = critique.respond(ctx.engine("policy"), ctx.prompts(), ctx.sampling())
    prov = ctx.provenance(adapter=relative(ctx.rd, adapter))
    return {"rows": [{**r, "provenance": prov} for r in rows]}
