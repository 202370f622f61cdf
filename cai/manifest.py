"""The round's manifest.json: config, constitution, models, seeds, versions, each stage's
status and timings, and the figures each finished stage counts (its row's `count`), and
the inference servers the round uses (inputs/servers.json, written when it was prepared:
URL without credentials, served model, server version).

Rewritten whole (atomically) after every merge and status change; `status` and `error`
set by the queue survive rewrites. Knows the plan and the stage table; knows nothing
about running units or queues.
"""

from __future__ import annotations

import platform
import time
from importlib import metadata
from pathlib import Path

from cai import plan, store
from cai.config import Round
from cai import roles
from cai.stages import ROW, producers


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ["cai", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "celery"]:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def counts(round_dir: Path, cfg: Round) -> dict:
    c: dict = {"prompts": store.count_lines(round_dir / "inputs" / "prompts.jsonl")}
    for stage in cfg.stages:
        row = ROW[stage]
        if row.count and plan.stage_done(round_dir, stage):
            for k, v in row.count(round_dir, cfg).items():
                c[k] = {**c[k], **v} if isinstance(v, dict) and isinstance(c.get(k), dict) else v
    return c


def _unit_seconds(round_dir: Path, unit: plan.Unit) -> float:
    out = plan.unit_output(round_dir, unit)
    if not ROW[unit.stage].sharded:
        card = out / "cai.json"
        return store.read_json(card).get("train", {}).get("seconds", 0) if card.exists() else 0
    return store.read_json(out).get("meta", {}).get("seconds", 0)


def stage_status(round_dir: Path, cfg: Round) -> dict:
    out = {}
    for stage in cfg.stages:
        units = plan.units_of(round_dir, stage, cfg)
        done = [u for u in units if plan.is_done(round_dir, u)]
        secs = sum(_unit_seconds(round_dir, u) for u in done)
        out[stage] = {
            "status": "done" if plan.stage_done(round_dir, stage) else ("running" if done else "pending"),
            "units_done": len(done), "units": len(units), "seconds": round(secs, 2),
        }
    return out


def write_manifest(round_dir: Path, cfg: Round | None = None, extra: dict | None = None) -> dict:
    cfg = cfg or plan.load_config(round_dir)
    cons = plan.load_constitution(round_dir)
    path = round_dir / store.MANIFEST
    old = store.read_json(path) if path.exists() else {}
    c = counts(round_dir, cfg)
    man = {
        "round_id": cfg.round_id,
        "parent_round": cfg.parent,
        "created": cfg.created,
        "updated": time.time(),
        "config": cfg.model_dump(mode="json"),
        "constitution": {"name": cons.name, "hash": cons.hash, "snapshot": "constitution.yaml",
                         "principles": [p.id for p in cons.principles]},
        "models": {"policy": cfg.model, **({"critic": roles.spec(cfg, "critic")} if "critique" in cfg.stages else {}),
                   **({"judge": roles.spec(cfg, "judge")} if "label" in cfg.stages else {}),
                   "stages": producers(round_dir, cfg)},
        **({"servers": store.read_json(servers)} if (servers := round_dir / "inputs" / "servers.json").exists() else {}),
        **({"parent_override": store.read_json(p)} if (p := round_dir / "inputs" / "parent_override.json").exists() else {}),
        "seeds": {"round": cfg.seed},
        "versions": versions(),
        "stages": stage_status(round_dir, cfg),
        "counts": {k: v for k, v in c.items() if k != "training"},
        "training": c.get("training", {}),
        "finished": plan.finished(round_dir, cfg),
        **{k: v for k, v in old.items() if k in ("status", "error")},
        **(extra or {}),
    }
    store.write_json(path, man)
    return man
