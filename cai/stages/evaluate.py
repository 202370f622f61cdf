"""Stage evaluate: each evaluated policy answers the probes snapshot (inputs/probes.jsonl),
every answer is scored (rules, the judge when it passed its self-check, the reward role),
and the merge writes report/ (metrics.json last: it marks the stage done).

One unit = one policy on one slice of the probes. Shards 0..k-1 are the reference policy
(the parent's, or the base); the others read the reference's answers to the same slice,
for the win rate and the regressions table. Which policies are evaluated comes from the
rows' `evaluated_as` (cai.stages).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cai import roles, store
from cai.stages.base import PARENT_POLICY, Ctx, Stage, rows_of

if TYPE_CHECKING:
    from cai.config import Round

OUTPUT = "report/metrics.json"


def policies(cfg: "Round", rows: dict[str, Stage]) -> list[tuple[str, str | None]]:
    """(name, adapter relative to the round folder) of each policy evaluated, reference first:
    the parent's (or the base), then every stage of the round whose row has `evaluated_as`."""
    out = [("parent", str(PARENT_POLICY)) if cfg.parent else ("base", None)]
    return out + [(row.evaluated_as, row.output) for row in rows.values() if row.evaluated_as and row.name in cfg.stages]


def slices(rd: Path, cfg: "Round") -> int:
    return max(1, math.ceil(store.count_lines(rd / "inputs" / "probes.jsonl") / cfg.evaluate.shard_size))


def shards(rd: Path, cfg: "Round", rows: dict[str, Stage]) -> int:
    return len(policies(cfg, rows)) * slices(rd, cfg)


def shard_needs(rd: Path, cfg: "Round", shard: int) -> list[int]:
    k = slices(rd, cfg)
    return [shard % k] if shard >= k else []


def judge_check(ctx: Ctx, engine) -> dict:
    """The judge's self-check: the label stage's when the round ran it, else run here once."""
    from cai.stages.label import self_check

    return self_check(ctx, engine)


def run(ctx: Ctx) -> dict:
    from cai import evaluate
    from cai.errors import InputError
    from cai.generation import derive_seed
    from cai.probes import Probe

    cfg, settings = ctx.cfg, ctx.cfg.evaluate
    if settings.max_new_tokens is None:  # the round's own answer length
        settings = settings.model_copy(update={"max_new_tokens": cfg.sampling.max_new_tokens})
    k = slices(ctx.rd, cfg)
    name, rel = policies(cfg, ctx.rows)[ctx.shard // k]
    part = ctx.shard % k
    rows_all = store.read_jsonl(ctx.rd / "inputs" / "probes.jsonl")
    probes = [Probe.model_validate(r) for r in rows_all[part * settings.shard_size: (part + 1) * settings.shard_size]]
    by_id = {p.id: p for p in probes}
    seconds: dict[str, float] = {}
    t = time.time()
    policy = roles.engine(ctx, "policy", str(ctx.rd / rel) if rel else None)
    rows = evaluate.answer(policy, probes, settings, derive_seed(cfg.seed, "evaluate"))
    for r in rows:
        r["policy"] = name
    evaluate.score_rules(rows, by_id)
    seconds["generate"] = round(time.time() - t, 3)
    tokens = sum(r.get("n_tokens", 0) for r in rows)
    judged = None
    if settings.judge:
        t = time.time()
        engine = roles.engine(ctx, "judge")
        check = judge_check(ctx, engine)
        judged = bool(check["passed"])
        seconds["judge_check"] = round(time.time() - t, 3)
        if judged:  # judge figures only from a judge that passed (else they are noise, and not paid for)
            t = time.time()
            evaluate.score_judge(engine, ctx.cons, rows, by_id, settings, cfg.seed)
            seconds["judge"] = round(time.time() - t, 3)
            if ctx.shard >= k:
                t = time.time()
                ref_rows = store.read_json(ctx.row.unit_output(ctx.rd, part))["rows"]
                try:
                    evaluate.score_wins(engine, ctx.cons, rows, ref_rows, cfg.label, cfg.seed)
                except InputError:
                    pass  # a constitution without preference questions: no win rate (the report shows n = 0)
                seconds["win"] = round(time.time() - t, 3)
    reward = ctx.rd / "adapters" / "reward"
    if (reward / "adapter_config.json").exists() and any(r["set"] == "helpful" for r in rows):
        from cai.engine import RewardEngine

        t = time.time()
        evaluate.score_reward(RewardEngine(roles.spec(cfg, "reward"), str(reward)), rows)
        seconds["reward"] = round(time.time() - t, 3)
    return {"policy": name, "slice": part, "rows": rows, "seconds": seconds, "tokens": tokens, "judged": judged}


def merge(ctx: Ctx, parts: list[dict]) -> None:
    from cai import evaluate, report
    from cai.probes import Probe

    cfg = ctx.cfg
    rows = rows_of(parts)
    probes = {r["id"]: Probe.model_validate(r) for r in store.read_jsonl(ctx.rd / "inputs" / "probes.jsonl")}
    names = [n for n, _ in policies(cfg, ctx.rows)]
    reference = names[0] if len(names) > 1 else None
    check_file = ctx.rd / "work" / "judge_check.json"
    check = {k: v for k, v in store.read_json(check_file).items() if k != "rows"} if check_file.exists() else None
    judged = bool(cfg.evaluate.judge and check and check.get("passed"))
    metrics = evaluate.summarize(rows, names, reference, probes, ctx.cons if judged else None, cfg.seed)
    candidate = evaluate.candidate_of(names, reference)
    cost: dict = {"answers": len(rows), "by_policy": {}}
    for p in parts:
        c = cost["by_policy"].setdefault(p["policy"], {"units": 0, "seconds": 0.0, "answers": 0, "tokens": 0})
        c["units"] += 1
        c["answers"] += len(p["rows"])
        c["tokens"] += p.get("tokens", 0)
        c["seconds"] = round(c["seconds"] + p.get("meta", {}).get("seconds", 0), 2)
        for step, v in p.get("seconds", {}).items():
            c[step] = round(c.get(step, 0) + v, 2)
    cost["seconds"] = round(sum(c["seconds"] for c in cost["by_policy"].values()), 2)
    cost["engine"] = "server" if roles.server(cfg, "policy") is not None else "in-process"
    result = {
        "kind": "round", "round_id": cfg.round_id, "parent_round": cfg.parent, "model": cfg.model,
        "judge": roles.spec(cfg, "judge") if cfg.evaluate.judge else None, "probes": cfg.evaluate.probes,
        "limit": cfg.evaluate.limit, "policies": names, "reference": reference, "candidate": candidate, "metrics": metrics,
        "gate": evaluate.check_gate(metrics, evaluate.load_gate(cfg.evaluate.gate), candidate, reference),
        "regressions": evaluate.regressions(rows, candidate, reference), "cost": cost,
        "constitution": {"name": ctx.cons.name, "hash": ctx.cons.hash},
    }
    if check is not None:
        result["judge_check"] = check
    if cfg.evaluate.judge and not judged:
        result["judge_skipped"] = (f"judge {roles.spec(cfg, 'judge')} failed its self-check" + (
            f" (accuracy {check.get('accuracy')}, position consistency {check.get('position_consistency')})" if check else "")
            + ": judge-based metrics (violations, win rate, judge refusals) were not computed")
    store.write_jsonl(ctx.rd / "report" / "rows.jsonl", [evaluate.public_row(r) for r in rows])
    report.write(ctx.rd / "report", result, rows, ctx.rd)  # metrics.json last: it marks the stage done


def count(rd: Path, cfg: "Round") -> dict:
    m = store.read_json(rd / OUTPUT)
    return {"evaluate": {"gate": {k: m["gate"].get(k) for k in ("passed", "checked", "candidate", "reference", "reasons")},
                         "answers": m["cost"]["answers"], "seconds": m["cost"]["seconds"]}}
