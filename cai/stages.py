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

        rows = store.read_jsonl(self.rd / "inputs" / "prompts.jsonl")
        return [Prompt.model_validate(r) for r in self._cut(rows)]

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
    from cai import feedback

    adapter = ctx.policy_adapter()
    rows, identical = feedback.sample_pairs(ctx.engine(ctx.cfg.model, adapter), ctx.prompts(), ctx.sampling())
    prov = ctx.provenance(policy_adapter=_relative(ctx.rd, adapter))
    return {"rows": [{**r, "provenance": prov} for r in rows], "identical_skipped": identical}


def judge_spec(cfg: "Round") -> str:
    """The feedback model: configured, else the policy's base model (never its adapter)."""
    from cai import models

    if cfg.judge:
        return cfg.judge
    r = models.resolve(cfg.model)
    return models.EMBEDDED if r.embedded else r.base


def _label(ctx: Ctx) -> dict:
    from cai import feedback

    if ctx.cfg.pairs is not None:
        pairs = ctx._cut(store.read_jsonl(ctx.rd / "inputs" / "pairs.jsonl"))
    else:
        pairs = ctx.payload("pairs")["rows"]
    judge = judge_spec(ctx.cfg)
    engine = ctx.engine(judge)
    prov = ctx.provenance(judge=judge, settings=ctx.cfg.label.model_dump(mode="json"))
    rows = feedback.label_pairs(engine, ctx.cons, pairs, ctx.cfg.label, ctx.cfg.seed, prov) if pairs else []
    return {"rows": rows}


def _train(ctx: Ctx) -> bool:
    from cai.train import run

    ctx.cache.clear()  # free the generation model's memory before training
    return run.run_stage(ctx.rd, ctx.cfg, ctx.cons.hash, ctx.stage, ROW[ctx.stage].unit_output(ctx.rd, None), ctx.guard)


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
    store.write_jsonl(ctx.rd / "datasets" / "labels.jsonl", rows)
    keep = [r for r in rows if r["valid"] and r["margin"] >= ctx.cfg.label.min_margin]
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
    return {"pairs": sum(len(p["rows"]) for p in parts), "pairs_identical_skipped": sum(p["identical_skipped"] for p in parts)}


def _count_label(rd: Path, cfg: "Round") -> dict:
    from cai.feedback import judge_stats

    return {"judge": judge_stats(store.read_jsonl(rd / "datasets" / "labels.jsonl"), cfg.label)}


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
    Stage("pairs", sharded=True, queue="generate", needs=(), after=("train-sft",),
          output="datasets/pairs.jsonl", run=_pairs, merge=_merge_rows, count=_count_pairs),
    Stage("label", sharded=True, queue="generate", needs=(), after=("pairs",),  # or a pairs file (check_plan)
          output="datasets/preferences.jsonl", run=_label, merge=_merge_label, count=_count_label),
    Stage("train-rm", sharded=False, queue="train", needs=("label",), after=(),
          output="adapters/reward", run=_train, count=lambda rd, cfg: _count_training(rd, cfg, "reward")),
    Stage("train-policy", sharded=False, queue="train", needs=("label",), after=("train-sft",),
          output="adapters/policy", run=_train, count=lambda rd, cfg: _count_training(rd, cfg, "policy")),
]

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
