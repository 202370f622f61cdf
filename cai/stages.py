"""The stages as one table, read top to bottom.

Each row says everything the runner, the manifest and the workers need to know about a
stage: its name, whether it runs in shards of prompts, which queue (resource) it needs,
which stages it needs in the same round and which it reads when present, its merged
output, how it runs one unit, how it merges its shards and what it counts. Adding a
stage is one module (the work itself) and one row here (with its small adapter below).

A unit's `run` gets a `Ctx`: the round's config, constitution and folder readers, its
shard, a model cache and a commit guard. A sharded stage returns a JSON payload that
the runner commits; a whole-stage unit (training) commits its own output folder.

Knows the round folder's layout of each stage's data; knows nothing about Celery or
Redis (the queue name is a plain string that workers.keys lists).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from cai import store

if TYPE_CHECKING:
    from cai.config import Round
    from cai.constitution import Constitution
    from cai.models import ModelCache
    from cai.prompts import Prompt


# ---------------------------------------------------------------- what a unit sees


@dataclass
class Ctx:
    """One unit of work: a shard of a sharded stage, or a whole stage (shard None)."""

    rd: Path
    cfg: "Round"
    cons: "Constitution"
    stage: str
    shard: int | None
    cache: "ModelCache"
    guard: Callable[[], bool]

    def prompts(self) -> list["Prompt"]:
        """This shard's prompts (all of them for a whole-stage unit)."""
        from cai.prompts import Prompt

        path = self.rd / "inputs" / "prompts.jsonl"
        if self.shard is None:
            return [Prompt.model_validate(r) for r in store.read_jsonl(path)]
        n = self.cfg.shard_size
        return [Prompt.model_validate(r) for r in store.read_jsonl_slice(path, self.shard * n, (self.shard + 1) * n)]

    def _cut(self, rows: list) -> list:
        if self.shard is None:
            return rows
        n = self.cfg.shard_size
        return rows[self.shard * n : (self.shard + 1) * n]

    def payload(self, stage: str) -> dict:
        """The committed output of the same shard of another sharded stage."""
        return store.read_json(ROW[stage].unit_output(self.rd, self.shard))

    def provenance(self, **extra) -> dict:
        return {"round": self.cfg.round_id, "stage": self.stage, "constitution_hash": self.cons.hash,
                "model": self.cfg.model, "sampling": self.cfg.sampling.model_dump(), "seed": self.cfg.seed, **extra}

    def sampling(self, *parts):
        """The round's sampling with a seed derived for this stage and shard (and parts)."""
        return self.cfg.sampling.derived(self.stage, self.shard, *parts)

    def policy_adapter(self) -> str | None:
        """The adapter generation starts from: this round's SFT adapter once it exists (for
        pairs), else the parent round's policy, else the model spec's own (None)."""
        sft = self.rd / "adapters" / "sft"
        if self.stage == "pairs" and (sft / "adapter_config.json").exists():
            return str(sft)
        parent = self.rd / "inputs" / "parent_policy"
        return str(parent) if (parent / "adapter_config.json").exists() else None

    def engine(self, spec: str, adapter: str | None = None):
        """The engine for this stage: the round's server for its role (cai.server.ROLES; the
        spec's own adapter or `adapter` loaded there by runtime LoRA), else in process."""
        from cai import server

        settings = server.settings_for(self.cfg, self.stage)
        if settings is not None:
            return server.ServerEngine(settings, adapter=adapter or server.spec_adapter(spec))
        from cai.engine import LocalEngine

        return LocalEngine(*self.cache.get(spec, adapter=adapter))


# ---------------------------------------------------------------- the row


@dataclass(frozen=True)
class Stage:
    name: str
    sharded: bool                          # runs per shard of prompts, else once per round
    queue: str                             # generate | train | cpu (workers.keys.QUEUES)
    needs: tuple[str, ...]                 # stages that must be in the same round; this reads their units
    after: tuple[str, ...]                 # stages this reads when the round has them
    output: str                            # merged, user-facing output (relative); present = stage done
    run: Callable[[Ctx], Any]              # sharded: a shard's payload (dict); whole: commits itself, returns bool
    merge: Callable[[Ctx, list[dict]], None] | None = None   # sharded: write the merged datasets from the payloads
    count: Callable[[Path, "Round"], dict] | None = None     # figures for the manifest, once the stage is done
    shards: Callable[[Path, "Round"], int] | None = None     # sharded over something else than prompts: how many shards
    shard_needs: Callable[[Path, "Round", int], list[int]] | None = None  # shards of this same stage a shard reads

    def unit_output(self, rd: Path, shard: int | None) -> Path:
        if self.sharded:
            return rd / "work" / self.name / f"{shard:04d}.json"
        return rd / self.output


# ---------------------------------------------------------------- adapters: a round's files <-> the library


def _respond(ctx: Ctx) -> dict:
    from cai import critique

    adapter = ctx.policy_adapter()
    rows = critique.respond(ctx.engine(ctx.cfg.model, adapter), ctx.prompts(), ctx.sampling())
    prov = ctx.provenance(adapter=_relative(ctx.rd, adapter))
    return {"rows": [{**r, "provenance": prov} for r in rows]}


def _critique(ctx: Ctx) -> dict:
    from cai import critique

    adapter = ctx.policy_adapter()
    prov = ctx.provenance(passes=ctx.cfg.critique.passes, adapter=_relative(ctx.rd, adapter))
    sft, crit = critique.critique_revise(ctx.engine(ctx.cfg.model, adapter), ctx.cons, ctx.payload("respond")["rows"],
                                         ctx.cfg.critique, ctx.sampling(), prov)
    return {"sft": sft, "critiques": crit}


def _pairs(ctx: Ctx) -> dict:
    from cai import pairs

    sources = ctx.cfg.pairs.sources
    adapter = ctx.policy_adapter()
    prov = ctx.provenance(policy_adapter=_relative(ctx.rd, adapter))
    rows: list[dict] = []
    identical = 0
    if "samples" in sources:
        got, n = pairs.sample_pairs(ctx.engine(ctx.cfg.model, adapter), ctx.prompts(), ctx.sampling())
        rows, identical = rows + got, identical + n
    if "contrastive" in sources:
        got, n = pairs.contrastive_pairs(ctx.engine(ctx.cfg.model, adapter), ctx.cons, ctx.prompts(),
                                         ctx.sampling("contrastive"), ctx.cfg.seed)
        rows, identical = rows + got, identical + n
    if "revision" in sources:  # made by the critique stage of the same shard (its policy adapter is in its rows)
        rows += pairs.revision_pairs(ctx.payload("critique")["sft"])
    return {"rows": [{**r, "provenance": prov} for r in rows], "identical_skipped": identical}


def producers(rd: Path, cfg: "Round") -> dict:
    """Which model and adapter make each generating stage's text (for the manifest): the
    parent round's policy for respond and critique, this round's SFT adapter for pairs when
    the round trains one (else the parent's), the judge for label. Ctx.policy_adapter is
    the same rule at run time."""
    parent = "inputs/parent_policy" if (rd / "inputs" / "parent_policy" / "adapter_config.json").exists() else None
    out = {}
    for stage in cfg.stages:
        if stage in ("respond", "critique"):
            out[stage] = {"model": cfg.model, "adapter": parent}
        elif stage == "pairs":
            out[stage] = {"model": cfg.model, "adapter": "adapters/sft" if "train-sft" in cfg.stages else parent}
        elif stage == "label":
            out[stage] = {"model": judge_spec(cfg), "adapter": None}
    return out


def judge_spec(cfg: "Round") -> str:
    """The feedback model: configured, else the policy's base model (never its adapter)."""
    from cai import models

    return models.judge_spec(cfg.model, cfg.judge)


def _label(ctx: Ctx) -> dict:
    """The judge's self-check (once per round, kept in work/judge_check.json), then labels:
    by the judge for pairs that need one (only if it passed, or skip_check), by
    construction for the others (scored by the judge too when it passed)."""
    from cai import feedback
    from cai.errors import InputError

    if ctx.cfg.pairs_file is not None:
        pairs = ctx._cut(store.read_jsonl(ctx.rd / "inputs" / "pairs.jsonl"))
    else:
        pairs = ctx.payload("pairs")["rows"]
    settings = ctx.cfg.label
    judge = judge_spec(ctx.cfg)
    engine = ctx.engine(judge)
    check_file = ctx.rd / "work" / "judge_check.json"
    if not check_file.exists():
        store.create_json(check_file, {"judge": judge, **feedback.self_check(engine, ctx.cons, settings)})
    check = store.read_json(check_file)
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


def _train(ctx: Ctx) -> bool:
    from cai.train import run

    if ctx.stage in ("train-rm", "train-policy") and not store.count_lines(ctx.rd / "datasets" / "preferences.jsonl"):
        from cai.errors import InputError
        from cai.feedback import nothing_survived

        raise InputError(nothing_survived(_count_label(ctx.rd, ctx.cfg)["judge"], judge_spec(ctx.cfg)))
    ctx.cache.clear()  # free the generation model's memory before training
    return run.run_stage(ctx.rd, ctx.cfg, ctx.cons.hash, ctx.stage, ROW[ctx.stage].unit_output(ctx.rd, None), ctx.guard)


# evaluate: one unit = one policy on one slice of the probes snapshot (inputs/probes.jsonl).
# Shards 0..k-1 are the reference policy (parent's or base); the others read the reference's
# answers to the same slice, for the win rate and the regressions table.


def eval_policies(cfg: "Round") -> list[tuple[str, str | None]]:
    """(name, adapter relative to the round folder) of each policy evaluated, reference first."""
    out = [("parent", "inputs/parent_policy") if cfg.parent else ("base", None)]
    if "train-sft" in cfg.stages:
        out.append(("sft", "adapters/sft"))
    if "train-policy" in cfg.stages:
        out.append(("policy", "adapters/policy"))
    return out


def _eval_slices(rd: Path, cfg: "Round") -> int:
    import math

    return max(1, math.ceil(store.count_lines(rd / "inputs" / "probes.jsonl") / cfg.evaluate.shard_size))


def _eval_shards(rd: Path, cfg: "Round") -> int:
    return len(eval_policies(cfg)) * _eval_slices(rd, cfg)


def _eval_shard_needs(rd: Path, cfg: "Round", shard: int) -> list[int]:
    k = _eval_slices(rd, cfg)
    return [shard % k] if shard >= k else []


def _eval_engines(ctx: Ctx, adapter: str | None):
    """(policy engine, judge engine): the round's servers when it has them, else in process.
    The two roles differ (the policy with its adapter, the judge as configured), so the
    stage asks for each itself."""
    from cai.engine import LocalEngine

    def policy():
        if ctx.cfg.engine is not None:
            from cai import server

            return server.ServerEngine(ctx.cfg.engine, adapter=adapter or server.spec_adapter(ctx.cfg.model))
        return LocalEngine(*ctx.cache.get(ctx.cfg.model, adapter=adapter), name=adapter or "base")

    def judge():
        if ctx.cfg.judge_engine is not None:
            from cai import server

            return server.ServerEngine(ctx.cfg.judge_engine, adapter=server.spec_adapter(judge_spec(ctx.cfg)))
        return LocalEngine(*ctx.cache.get(judge_spec(ctx.cfg)), name="judge")

    return policy, judge


def _evaluate(ctx: Ctx) -> dict:
    import time

    from cai import evaluate
    from cai.errors import InputError
    from cai.generation import derive_seed
    from cai.probes import Probe

    cfg, settings = ctx.cfg, ctx.cfg.evaluate
    if settings.max_new_tokens is None:  # the round's own answer length
        settings = settings.model_copy(update={"max_new_tokens": cfg.sampling.max_new_tokens})
    k = _eval_slices(ctx.rd, cfg)
    name, rel = eval_policies(cfg)[ctx.shard // k]
    part = ctx.shard % k
    rows_all = store.read_jsonl(ctx.rd / "inputs" / "probes.jsonl")
    probes = [Probe.model_validate(r) for r in rows_all[part * settings.shard_size: (part + 1) * settings.shard_size]]
    by_id = {p.id: p for p in probes}
    seconds: dict[str, float] = {}
    policy, judge = _eval_engines(ctx, str(ctx.rd / rel) if rel else None)
    t = time.time()
    rows = evaluate.answer(policy(), probes, settings, derive_seed(cfg.seed, "evaluate"))
    for r in rows:
        r["policy"] = name
    evaluate.score_rules(rows, by_id)
    seconds["generate"] = round(time.time() - t, 3)
    if settings.judge:
        t = time.time()
        engine = judge()
        evaluate.score_judge(engine, ctx.cons, rows, by_id, settings, cfg.seed)
        seconds["judge"] = round(time.time() - t, 3)
        if ctx.shard >= k:
            t = time.time()
            ref_rows = store.read_json(ROW["evaluate"].unit_output(ctx.rd, part))["rows"]
            try:
                evaluate.score_wins(engine, ctx.cons, rows, ref_rows, cfg.label, cfg.seed)
            except InputError:
                pass  # a constitution without preference questions: no win rate (the report shows n = 0)
            seconds["win"] = round(time.time() - t, 3)
    reward = ctx.rd / "adapters" / "reward"
    if (reward / "adapter_config.json").exists() and any(r["set"] == "helpful" for r in rows):
        t = time.time()
        evaluate.score_reward(*evaluate.load_reward(cfg.model, str(reward)), rows)
        seconds["reward"] = round(time.time() - t, 3)
    return {"policy": name, "slice": part, "rows": rows, "seconds": seconds}


def _merge_evaluate(ctx: Ctx, parts: list[dict]) -> None:
    from cai import evaluate, report
    from cai.probes import Probe

    cfg = ctx.cfg
    rows = _rows(parts)
    probes = {r["id"]: Probe.model_validate(r) for r in store.read_jsonl(ctx.rd / "inputs" / "probes.jsonl")}
    policies = [n for n, _ in eval_policies(cfg)]
    reference = policies[0] if len(policies) > 1 else None
    metrics = evaluate.summarize(rows, policies, reference, probes, ctx.cons if cfg.evaluate.judge else None, cfg.seed)
    candidate = evaluate.candidate_of(policies, reference)
    cost: dict = {"answers": len(rows), "by_policy": {}}
    for p in parts:
        c = cost["by_policy"].setdefault(p["policy"], {"units": 0, "seconds": 0.0})
        c["units"] += 1
        c["seconds"] = round(c["seconds"] + p.get("meta", {}).get("seconds", 0), 2)
        for step, v in p.get("seconds", {}).items():
            c[step] = round(c.get(step, 0) + v, 2)
    cost["seconds"] = round(sum(c["seconds"] for c in cost["by_policy"].values()), 2)
    cost["engine"] = "server" if cfg.engine is not None else "in-process"
    result = {
        "kind": "round", "round_id": cfg.round_id, "parent_round": cfg.parent, "model": cfg.model,
        "judge": judge_spec(cfg) if cfg.evaluate.judge else None, "probes": cfg.evaluate.probes, "limit": cfg.evaluate.limit,
        "policies": policies, "reference": reference, "candidate": candidate, "metrics": metrics,
        "gate": evaluate.check_gate(metrics, evaluate.load_gate(cfg.evaluate.gate), candidate, reference),
        "regressions": evaluate.regressions(rows, candidate, reference), "cost": cost,
        "constitution": {"name": ctx.cons.name, "hash": ctx.cons.hash},
    }
    check = ctx.rd / "work" / "judge_check.json"  # the label stage's self-check of the same judge, when it ran
    if check.exists():
        result["judge_check"] = {k: v for k, v in store.read_json(check).items() if k != "rows"}
    store.write_jsonl(ctx.rd / "report" / "rows.jsonl", [evaluate.public_row(r) for r in rows])
    report.write(ctx.rd / "report", result, rows, ctx.rd)  # metrics.json last: it marks the stage done


def _count_evaluate(rd: Path, cfg: "Round") -> dict:
    m = store.read_json(rd / "report" / "metrics.json")
    return {"evaluate": {"gate": {k: m["gate"].get(k) for k in ("passed", "candidate", "reference", "reasons")},
                         "answers": m["cost"]["answers"], "seconds": m["cost"]["seconds"]}}


def _relative(rd: Path, adapter: str | None) -> str | None:
    return None if adapter is None else str(Path(adapter).relative_to(rd)) if Path(adapter).is_relative_to(rd) else adapter


# ---------------------------------------------------------------- merges and counts


def _rows(parts: list[dict], key: str = "rows") -> list[dict]:
    return [r for p in parts for r in p[key]]


def _merge_rows(ctx: Ctx, parts: list[dict]) -> None:
    store.write_jsonl(ctx.rd / ROW[ctx.stage].output, _rows(parts))


def _merge_critique(ctx: Ctx, parts: list[dict]) -> None:
    store.write_jsonl(ctx.rd / "datasets" / "critiques.jsonl", _rows(parts, "critiques"))
    store.write_jsonl(ctx.rd / ROW["critique"].output, _rows(parts, "sft"))


def _merge_label(ctx: Ctx, parts: list[dict]) -> None:
    rows = _rows(parts)
    check = ctx.rd / "work" / "judge_check.json"
    if check.exists():
        store.write_jsonl(ctx.rd / "datasets" / "judge_check.jsonl", store.read_json(check)["rows"])
    store.write_jsonl(ctx.rd / "datasets" / "labels.jsonl", rows)
    keep = [r for r in rows if r["valid"] and r["label_margin"] >= ctx.cfg.label.min_margin]
    store.write_jsonl(ctx.rd / ROW["label"].output, keep)


def _count_critique(rd: Path, cfg: "Round") -> dict:
    rows = store.read_jsonl(rd / "datasets" / "critiques.jsonl")
    why: dict[str, int] = {}
    for r in rows:
        if r["degenerate"]:
            why[r["degenerate"]] = why.get(r["degenerate"], 0) + 1
    n_sft = len(store.read_jsonl(rd / "datasets" / "sft.jsonl"))
    n_prompts = store.count_lines(rd / "inputs" / "prompts.jsonl")
    return {"critique_passes": len(rows), "revisions_degenerate": why, "revisions_accepted": len(rows) - sum(why.values()),
            "sft_rows": n_sft, "sft_dropped_no_accepted_revision": n_prompts - n_sft}


def _count_pairs(rd: Path, cfg: "Round") -> dict:
    parts = [store.read_json(f) for f in sorted((rd / "work" / "pairs").glob("*.json"))]
    by_source: dict[str, int] = {}
    for r in _rows(parts):
        by_source[r["source"]] = by_source.get(r["source"], 0) + 1
    return {"pairs": sum(by_source.values()), "pairs_by_source": by_source,
            "pairs_identical_skipped": sum(p["identical_skipped"] for p in parts)}


def _count_label(rd: Path, cfg: "Round") -> dict:
    from cai.feedback import judge_stats

    stats = judge_stats(store.read_jsonl(rd / "datasets" / "labels.jsonl"), cfg.label)
    parts = [store.read_json(f) for f in sorted((rd / "work" / "label").glob("*.json"))]
    stats["pairs_unlabeled_judge_failed"] = sum(p.get("unlabeled_judge_failed", 0) for p in parts)
    check = rd / "work" / "judge_check.json"
    if check.exists():
        stats["self_check"] = {k: v for k, v in store.read_json(check).items() if k != "rows"}
    kept = store.read_jsonl(rd / "datasets" / "preferences.jsonl")
    stats["kept_by_source"] = {s: sum(1 for r in kept if r.get("source") == s) for s in {r.get("source") for r in kept}}
    return {"judge": stats}


def _count_training(rd: Path, cfg: "Round", name: str) -> dict:
    card = rd / "adapters" / name / "cai.json"
    if not card.exists():
        return {}
    c = store.read_json(card)
    return {"training": {name: {"train": {k: v for k, v in c.get("train", {}).items() if k != "loss_history"},
                                "metrics": c.get("metrics", {}), "init_adapter": c.get("init_adapter")}}}


# ---------------------------------------------------------------- the table

STAGES: list[Stage] = [
    Stage("respond", sharded=True, queue="generate", needs=(), after=(),
          output="datasets/responses.jsonl", run=_respond, merge=_merge_rows),
    Stage("critique", sharded=True, queue="generate", needs=("respond",), after=(),
          output="datasets/sft.jsonl", run=_critique, merge=_merge_critique, count=_count_critique),
    Stage("train-sft", sharded=False, queue="train", needs=("critique",), after=(),
          output="adapters/sft", run=_train, count=lambda rd, cfg: _count_training(rd, cfg, "sft")),
    Stage("pairs", sharded=True, queue="generate", needs=(), after=("critique", "train-sft"),
          output="datasets/pairs.jsonl", run=_pairs, merge=_merge_rows, count=_count_pairs),
    Stage("label", sharded=True, queue="generate", needs=(), after=("pairs",),  # or a pairs file (check_plan)
          output="datasets/preferences.jsonl", run=_label, merge=_merge_label, count=_count_label),
    Stage("train-rm", sharded=False, queue="train", needs=("label",), after=(),
          output="adapters/reward", run=_train, count=lambda rd, cfg: _count_training(rd, cfg, "reward")),
    Stage("train-policy", sharded=False, queue="train", needs=("label",), after=("train-sft",),
          output="adapters/policy", run=_train, count=lambda rd, cfg: _count_training(rd, cfg, "policy")),
]

STAGES.append(  # after every training stage; reads the probes snapshot, not the prompts
    Stage("evaluate", sharded=True, queue="generate", needs=(), after=("train-sft", "train-rm", "train-policy"),
          output="report/metrics.json", run=_evaluate, merge=_merge_evaluate, count=_count_evaluate,
          shards=_eval_shards, shard_needs=_eval_shard_needs))

ROW: dict[str, Stage] = {s.name: s for s in STAGES}
NAMES: list[str] = [s.name for s in STAGES]
DEFAULT: list[str] = list(NAMES)  # a round runs every stage unless told otherwise


def check_plan(stages: list[str], pairs_file: bool) -> list[str]:
    """Problems with a list of stages (already known names, in table order)."""
    out = []
    for name in stages:
        missing = [n for n in ROW[name].needs if n not in stages]
        if missing:
            out.append(f"{name} needs {' and '.join(missing)} in the same round")
    if "label" in stages and "pairs" not in stages and not pairs_file:
        out.append("label needs pairs: add the pairs stage or give a pairs file (--pairs FILE)")
    if pairs_file and "pairs" in stages:
        out.append("a pairs file replaces the pairs stage; drop pairs from the stages")
    return out
