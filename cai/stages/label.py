"""Stage label: the judge's self-check (once per round), then AI preference labels;
merged into datasets/labels.jsonl (all) and datasets/preferences.jsonl (kept)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cai import roles, store
from cai.stages.base import Ctx, rows_of

if TYPE_CHECKING:
    from cai.config import Round

OUTPUT = "datasets/preferences.jsonl"
CHECK = Path("work") / "judge_check.json"


def self_check(ctx: Ctx, engine) -> dict:
    """The judge's self-check, run once per round and kept in work/judge_check.json (the
    evaluate stage reuses it)."""
    from cai import feedback

    check_file = ctx.rd / CHECK
    if not check_file.exists():
        store.create_json(check_file, {"judge": roles.spec(ctx.cfg, "judge"),
                                       **feedback.self_check(engine, ctx.cons, ctx.cfg.label)})
    return store.read_json(check_file)


def run(ctx: Ctx) -> dict:
    """Labels by the judge for pairs that need one (only if it passed, or skip_check), by
    construction for the others (scored by the judge too when it passed)."""
    from cai import feedback
    from cai.errors import InputError

    if ctx.cfg.pairs_file is not None:
        pairs = ctx.cut(store.read_jsonl(ctx.rd / "inputs" / "pairs.jsonl"))
    else:
        pairs = ctx.payload("pairs")["rows"]
    settings = ctx.cfg.label
    judge = roles.spec(ctx.cfg, "judge")
    engine = ctx.engine("judge")
    check = self_check(ctx, engine)
    trusted = check["passed"] or settings.skip_check
    needs_judge = [p for p in pairs if p.get("better") is None]
    constructed = [p for p in pairs if p.get("better") is not None]
    other_sources = ctx.cfg.pairs_file is None and any(s != "samples" for s in ctx.cfg.pairs.sources)
    if needs_judge and not trusted and not other_sources:  # nothing but noise to write: stop, saying why
        raise InputError(feedback.check_failed_line(judge, check))
    prov = ctx.provenance(judge=judge, settings=settings.model_dump(mode="json"), judge_check_passed=check["passed"])
    rows = feedback.label_pairs(engine, ctx.cons, needs_judge, settings, ctx.cfg.seed, prov) if needs_judge and trusted else []
    scored = feedback.label_pairs(engine, ctx.cons, constructed, settings, ctx.cfg.seed, prov) if constructed and check["passed"] else None
    rows += feedback.constructed_labels(constructed, settings, prov, scored)
    return {"rows": rows, "unlabeled_judge_failed": 0 if trusted else len(needs_judge)}


def merge(ctx: Ctx, parts: list[dict]) -> None:
    rows = rows_of(parts)
    check = ctx.rd / CHECK
    if check.exists():
        store.write_jsonl(ctx.rd / "datasets" / "judge_check.jsonl", store.read_json(check)["rows"])
    store.write_jsonl(ctx.rd / "datasets" / "labels.jsonl", rows)
    keep = [r for r in rows if r["valid"] and r["label_margin"] >= ctx.cfg.label.min_margin]
    store.write_jsonl(ctx.rd / OUTPUT, keep)


def count(rd: Path, cfg: "Round") -> dict:
    from cai.feedback import judge_stats

    stats = judge_stats(store.read_jsonl(rd / "datasets" / "labels.jsonl"), cfg.label)
    parts = [store.read_json(f) for f in sorted((rd / "work" / "label").glob("*.json"))]
    stats["pairs_unlabeled_judge_failed"] = sum(p.get("unlabeled_judge_failed", 0) for p in parts)
    check = rd / CHECK
    if check.exists():
        stats["self_check"] = {k: v for k, v in store.read_json(check).items() if k != "rows"}
    kept = store.read_jsonl(rd / OUTPUT)
    stats["kept_by_source"] = {s: sum(1 for r in kept if r.get("source") == s) for s in {r.get("source") for r in kept}}
    return {"judge": stats}
