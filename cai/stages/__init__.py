"""The stages as one table, read top to bottom.

Each row says everything the runner, the manifest, the queue and the preflight need to
know about a stage: its name, whether it runs in shards of prompts, which queue
(resource) it needs, which stages it needs in the same round and which it reads when
present, its merged output, the model roles it uses (cai.roles), which adapter the policy
starts from, whether it is on by default, whether its adapter can be the next round's
policy, the name evaluate compares it under, and how it runs one unit, merges its shards
and counts. Adding a stage is one module (its work) and one row here.

Knows nothing about Celery or Redis (a row's queue is a plain string that workers.keys lists).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cai import roles
from cai.stages import critique, evaluate, label, pairs, respond, train_policy, train_rl, train_rm, train_sft
from cai.stages.base import Ctx, Stage, merge_rows, start_adapter

if TYPE_CHECKING:
    from cai.config import Round

__all__ = ["Ctx", "Stage", "STAGES", "ROW", "NAMES", "DEFAULT", "check_plan", "producers", "next_policy", "served",
           "uses_model_here"]

STAGES: list[Stage] = [
    Stage("respond", sharded=True, queue="generate", needs=(), after=(), output="datasets/responses.jsonl",
          roles=("policy",), run=respond.run, merge=merge_rows),
    Stage("critique", sharded=True, queue="generate", needs=("respond",), after=(), output=critique.OUTPUT,
          roles=("critic",), run=critique.run, merge=critique.merge, count=critique.count),
    Stage("train-sft", sharded=False, queue="train", needs=("critique",), after=(), output="adapters/sft",
          roles=("policy",), yields_policy=True, evaluated_as="sft", run=train_sft.run, count=train_sft.count),
    Stage("pairs", sharded=True, queue="generate", needs=(), after=("critique", "train-sft"), output="datasets/pairs.jsonl",
          roles=("policy", "critic"), start=("train-sft", "parent"), run=pairs.run, merge=merge_rows, count=pairs.count),
    Stage("label", sharded=True, queue="generate", needs=(), after=("pairs",),  # or a pairs file (check_plan)
          output=label.OUTPUT, roles=("judge",), run=label.run, merge=label.merge, count=label.count),
    Stage("train-rm", sharded=False, queue="train", needs=("label",), after=(), output="adapters/reward",
          roles=("policy",), start=(), run=train_rm.run, count=train_rm.count),
    Stage("train-policy", sharded=False, queue="train", needs=("label",), after=("train-sft",), output="adapters/policy",
          roles=("policy",), start=("train-sft", "parent"), yields_policy=True, evaluated_as="policy",
          run=train_policy.run, count=train_policy.count),
    Stage("train-rl", sharded=False, queue="train", needs=("train-rm",), after=("train-sft", "label"),
          output="adapters/rl", roles=("policy", "judge", "reward"), start=("train-sft", "parent"), default=False,
          yields_policy=True, evaluated_as="rl", run=train_rl.run, count=train_rl.count),
    # after every training stage; reads the probes snapshot, not the prompts
    Stage("evaluate", sharded=True, queue="generate", needs=(), after=("train-sft", "train-rm", "train-policy", "train-rl"),
          output=evaluate.OUTPUT, roles=("policy", "judge", "reward"), start=(), run=evaluate.run, merge=evaluate.merge,
          count=evaluate.count, shards=lambda rd, cfg: evaluate.shards(rd, cfg, ROW), shard_needs=evaluate.shard_needs),
]

ROW: dict[str, Stage] = {s.name: s for s in STAGES}
NAMES: list[str] = [s.name for s in STAGES]
DEFAULT: list[str] = [s.name for s in STAGES if s.default]


def served(cfg: "Round", stages: list[str]) -> dict[str, dict]:
    """Each server the given stages use, keyed by its RoundConfig field: its settings, flag,
    the spec it must serve, the roles and stages that use it, and the stages among them that
    load adapters this round trains (their LoRA rank must fit the server)."""
    trained = [s for s in cfg.stages if not ROW[s].sharded and ROW[s].output.startswith("adapters/") and s != "train-rm"]
    out: dict[str, dict] = {}
    for st in stages:
        row = ROW[st]
        for role in row.roles:
            s = roles.server(cfg, role)
            if s is None:
                continue
            key = "engine" if roles.follows_policy(cfg, role) else roles.ROLES[role].server_key
            entry = out.setdefault(key, {"settings": s, "flag": roles.flag(cfg, role), "spec": roles.spec(cfg, role),
                                         "role": "policy" if key == "engine" else role, "roles": [], "stages": [],
                                         "loads_trained": []})
            entry["roles"] += [role] if role not in entry["roles"] else []
            entry["stages"] += [st] if st not in entry["stages"] else []
            loads = bool(trained) and key == "engine" and (any(t in row.start for t in trained) or st == "evaluate")
            entry["loads_trained"] += [st] if loads and st not in entry["loads_trained"] else []
    return out


def uses_model_here(cfg: "Round", stage: str) -> bool:
    """Whether a stage loads a model in the worker (some role of it runs in process)."""
    row = ROW[stage]
    if not row.sharded:
        return True  # training
    for role in row.roles:
        if role == "reward":
            if "train-rm" in cfg.stages:
                return True
        elif role == "judge" and stage == "evaluate" and not cfg.evaluate.judge:
            continue
        elif roles.server(cfg, role) is None:
            return True
    return False


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


def next_policy(rd: Path, stages: list[str]) -> str | None:
    """The adapter (relative) a finished round hands to the next round as its policy: the
    output of the last of its stages whose row yields a policy, else of any such row whose
    adapter is present (None when there is none)."""
    mine = [ROW[s].output for s in stages if ROW[s].yields_policy]
    present = [r.output for r in STAGES if r.yields_policy and (rd / r.output / "adapter_config.json").exists()]
    return (mine or present or [None])[-1]


def producers(rd: Path, cfg: "Round") -> dict:
    """Who makes each stage's text, for the manifest: per role its model, adapter and engine
    (the same rules Ctx.engine applies at run time)."""
    out = {}
    for stage in cfg.stages:
        row = ROW[stage]
        if not row.sharded:
            continue
        start = start_adapter(rd, cfg, row.start, ROW)
        made = {}
        for role in row.roles:
            if role == "reward" and "train-rm" not in cfg.stages:
                continue
            adapter = start if roles.follows_policy(cfg, role) else ("adapters/reward" if role == "reward" else None)
            made[role] = roles.describe(cfg, role, adapter)
        first = made.get(row.roles[0]) or {}
        out[stage] = {"model": first.get("model"), "adapter": first.get("adapter"), "roles": made}
    return out
