"""The round plan: configuration, which stage needs what, what is done, and running it.

A round folder is prepared once (config, constitution snapshot, prompt snapshot, shard
layout); afterwards all state is derived from the files present in it. Work comes in
units: one shard of a sharded stage, or a whole training stage. A unit's output is
committed atomically; a present output means the unit is done, whoever ran it. The
in-process runner and the queue (workers/) both call `run_unit` and `finalize`.

Knows stages, their inputs and outputs; does not know Celery or Redis.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Callable, Literal

import yaml

from pydantic import BaseModel, ConfigDict, Field

from cai import constitution as constitution_mod
from cai import models as models_mod
from cai import prompts as prompts_mod
from cai import store
from cai.critique import CritiqueSettings
from cai.feedback import LabelSettings, check_judge
from cai.errors import InputError
from cai.generation import Sampling
from cai.train import recipe as recipe_mod

STAGES = ["respond", "critique", "train-sft", "pairs", "label", "train-rm", "train-policy", "evaluate"]
SHARDED = {"respond", "critique", "pairs", "label"}
AVAILABLE = {"respond", "critique", "train-sft", "pairs", "label", "train-rm", "train-policy"}
TRAINING = {"train-sft": "sft", "train-rm": "reward", "train-policy": "policy"}
Stage = Literal["respond", "critique", "train-sft", "pairs", "label", "train-rm", "train-policy", "evaluate"]


class RoundConfig(BaseModel):
    """Everything a round needs; written to round.json and the manifest."""

    model_config = ConfigDict(extra="forbid")

    round_id: str
    model: str
    prompts_source: str
    stages: list[Stage] = Field(default_factory=lambda: ["respond", "critique"])
    shard_size: int = Field(32, gt=0)
    seed: int = 0
    sampling: Sampling = Field(default_factory=Sampling)
    critique: CritiqueSettings = Field(default_factory=CritiqueSettings)
    judge: str | None = Field(None, description="Feedback model spec; default: the policy's base model.")
    label: LabelSettings = Field(default_factory=LabelSettings)
    recipe: str = Field("cpu-tiny", description="Training recipe: a shipped name or a path (snapshot in recipe.yaml).")
    pairs_input: bool = Field(False, description="Pairs came from a user file (inputs/pairs.jsonl), not the pairs stage.")
    parent: str | None = None
    created: float = Field(default_factory=time.time)


def parse_stages(text: str | None) -> list[str]:
    if not text:
        return sorted(AVAILABLE, key=STAGES.index)
    stages = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise InputError(f"--stages: unknown stage {', '.join(bad)}; choose from {', '.join(STAGES)}")
    missing = [s for s in stages if s not in AVAILABLE]
    if "critique" in stages and "respond" not in stages:
        raise InputError("--stages: critique needs respond in the same round")
    if "train-sft" in stages and "critique" not in stages:
        raise InputError("--stages: train-sft needs critique in the same round")
    if ("train-rm" in stages or "train-policy" in stages) and "label" not in stages:
        raise InputError("--stages: train-rm and train-policy need label in the same round")
    if missing:
        raise InputError(f"--stages: {', '.join(missing)} not available in this version; available: {', '.join(sorted(AVAILABLE, key=STAGES.index))}")
    return sorted(set(stages), key=STAGES.index)


# ---------------------------------------------------------------- preparing


def prepare(out: Path, *, constitution_path: str, prompts_spec: str | None, model: str, stages: list[str],
            limit: int | None = None, shard_size: int = 32, seed: int = 0, sampling: Sampling | None = None,
            critique: CritiqueSettings | None = None, judge: str | None = None, label: LabelSettings | None = None,
            pairs_path: str | None = None, recipe: str = "cpu-tiny", parent: str | None = None,
            parent_policy: str | None = None, round_id: str | None = None) -> RoundConfig:
    """Validate every input, then write the round folder's fixed part.

    Raises InputError listing every problem found before anything is written or loaded.
    Only when the label stage is asked for does this load the judge's tokenizer (not
    its weights), to check that it can spell the choice letters.
    """
    problems: list[str] = []
    cons = ps = None
    pair_rows: list[dict] | None = None

    def check(fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except InputError as e:
            problems.extend(e.problems)

    cons = check(constitution_mod.load, constitution_path)
    if pairs_path:
        pair_rows = check(prompts_mod.load_pairs, pairs_path, limit=limit)
        if pair_rows is not None:
            ps = prompts_mod.PromptSet(source=pairs_path, prompts=[prompts_mod.Prompt(id=r["prompt_id"], messages=r["messages"], category=r.get("category")) for r in pair_rows])
    elif prompts_spec is None:
        problems.append("--prompts: required (or --pairs FILE for a label-only round)")
    else:
        ps = check(prompts_mod.load, prompts_spec, limit=limit)
    check(models_mod.resolve, model)
    rec = check(recipe_mod.load, recipe) if any(s in TRAINING for s in stages) else None
    if rec is not None and rec.quant.four_bit:
        why = models_mod.four_bit_available()
        if why:
            problems.append(f"recipe {rec.name}: quant.four_bit is on but {why}")
    if parent_policy is not None and not (Path(parent_policy) / "adapter_config.json").exists():
        problems.append(f"--parent: {parent_policy} has no policy adapter (adapter_config.json); the parent round must have finished train-policy")
    judge_r = check(models_mod.resolve, judge) if judge else None
    if "label" in stages and "pairs" not in stages and not pairs_path:
        problems.append("--stages: label needs pairs: add the pairs stage or give --pairs FILE")
    if pairs_path and "pairs" in stages:
        problems.append("--pairs: a pairs file replaces the pairs stage; drop pairs from --stages")
    if "label" in stages and cons is not None:
        check(check_judge, cons)
    if problems:
        raise InputError(problems)
    if "label" in stages:
        from cai.feedback import choice_token_ids

        r = judge_r or models_mod.resolve(model)
        choice_token_ids(models_mod.load_tokenizer(r))
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: folder is not empty; choose a new --out or remove it")
    cfg = RoundConfig(
        round_id=round_id or store.new_round_id(), model=model, prompts_source=str(pairs_path or prompts_spec), stages=stages,
        shard_size=shard_size, seed=seed, sampling=(sampling or Sampling()).model_copy(update={"seed": seed}),
        critique=critique or CritiqueSettings(), judge=judge, label=label or LabelSettings(),
        pairs_input=bool(pairs_path), parent=parent, recipe=str(recipe),
    )
    out.mkdir(parents=True, exist_ok=True)
    store.write_text(out / "constitution.yaml", cons.to_yaml())
    store.write_jsonl(out / "inputs" / "prompts.jsonl", [p.model_dump() for p in ps.prompts])
    if pair_rows is not None:
        store.write_jsonl(out / "inputs" / "pairs.jsonl", pair_rows)
    if rec is not None:
        store.write_text(out / "recipe.yaml", yaml.safe_dump(rec.model_dump(mode="json"), sort_keys=False))
    if parent_policy is not None:
        shutil.copytree(parent_policy, out / "inputs" / "parent_policy")
    store.write_json(out / store.ROUND_FILE, cfg.model_dump(mode="json"))
    write_manifest(out)
    return cfg


def load_config(round_dir: Path) -> RoundConfig:
    return RoundConfig.model_validate(store.read_json(round_dir / store.ROUND_FILE))


def load_constitution(round_dir: Path) -> constitution_mod.Constitution:
    return constitution_mod.load(round_dir / "constitution.yaml")


def load_prompts(round_dir: Path) -> list[prompts_mod.Prompt]:
    return [prompts_mod.Prompt.model_validate(r) for r in store.read_jsonl(round_dir / "inputs" / "prompts.jsonl")]


# ---------------------------------------------------------------- plan and state


class Unit(BaseModel):
    stage: str
    shard: int | None = None  # None for whole-stage units (training)

    @property
    def key(self) -> str:
        return self.stage if self.shard is None else f"{self.stage}/{self.shard:04d}"


def n_shards(round_dir: Path, cfg: RoundConfig | None = None) -> int:
    cfg = cfg or load_config(round_dir)
    p = round_dir / "inputs" / "prompts.jsonl"
    n = max(1, math.ceil(_count_prompts(str(p), p.stat().st_mtime) / cfg.shard_size))
    return n


def unit_output(round_dir: Path, unit: Unit) -> Path:
    if unit.stage in TRAINING:
        return round_dir / "adapters" / TRAINING[unit.stage]
    if unit.shard is not None:
        return round_dir / "work" / unit.stage / f"{unit.shard:04d}.json"
    return round_dir / "work" / unit.stage / "done.json"


def stage_output(round_dir: Path, stage: str) -> Path:
    """The merged, user-facing output whose presence marks a stage finished."""
    return {
        "respond": round_dir / "datasets" / "responses.jsonl",
        "critique": round_dir / "datasets" / "sft.jsonl",
        "pairs": round_dir / "datasets" / "pairs.jsonl",
        "label": round_dir / "datasets" / "preferences.jsonl",
        "train-sft": round_dir / "adapters" / "sft",
        "train-rm": round_dir / "adapters" / "reward",
        "train-policy": round_dir / "adapters" / "policy",
    }[stage]


@lru_cache(maxsize=256)
def _count_prompts(path: str, mtime: float) -> int:
    return sum(1 for line in Path(path).read_text("utf-8").splitlines() if line.strip())


def units_of(round_dir: Path, stage: str, cfg: RoundConfig | None = None) -> list[Unit]:
    if stage in SHARDED:
        return [Unit(stage=stage, shard=k) for k in range(n_shards(round_dir, cfg))]
    return [Unit(stage=stage)]


def is_done(round_dir: Path, unit: Unit) -> bool:
    return unit_output(round_dir, unit).exists()


def stage_done(round_dir: Path, stage: str) -> bool:
    return stage_output(round_dir, stage).exists()


def needs(round_dir: Path, unit: Unit, cfg: RoundConfig) -> list[Unit]:
    """The units whose outputs this unit reads."""
    if unit.stage == "critique":
        return [Unit(stage="respond", shard=unit.shard)]
    if unit.stage == "pairs" and "train-sft" in cfg.stages:
        return [Unit(stage="train-sft")]
    if unit.stage == "label" and not cfg.pairs_input:
        return [Unit(stage="pairs", shard=unit.shard)]
    if unit.stage == "train-sft":
        return [Unit(stage="critique", shard=k) for k in range(n_shards(round_dir, cfg))]
    if unit.stage in ("train-rm", "train-policy"):
        needs = [Unit(stage="label", shard=k) for k in range(n_shards(round_dir, cfg))]
        return needs + ([Unit(stage="train-sft")] if unit.stage == "train-policy" and "train-sft" in cfg.stages else [])
    return []


def runnable(round_dir: Path, cfg: RoundConfig | None = None) -> list[Unit]:
    """Units of the round's stages that are not done and whose inputs are all present."""
    cfg = cfg or load_config(round_dir)
    out = []
    for stage in cfg.stages:
        for u in units_of(round_dir, stage, cfg):
            if not is_done(round_dir, u) and all(is_done(round_dir, n) for n in needs(round_dir, u, cfg)):
                out.append(u)
    return out


def finished(round_dir: Path, cfg: RoundConfig | None = None) -> bool:
    cfg = cfg or load_config(round_dir)
    return all(stage_done(round_dir, s) for s in cfg.stages)


# ---------------------------------------------------------------- running


def judge_spec(cfg: RoundConfig) -> str:
    """The feedback model: configured, else the policy's base model (never its adapter)."""
    if cfg.judge:
        return cfg.judge
    r = models_mod.resolve(cfg.model)
    return models_mod.EMBEDDED if r.embedded else r.base


def policy_adapter(round_dir: Path, relative: bool = False) -> str | None:
    """The round's SFT adapter once it exists (pairs are sampled from it), else None."""
    p = round_dir / "adapters" / "sft"
    if not (p / "adapter_config.json").exists():
        return None
    return "adapters/sft" if relative else str(p)


def provenance(cfg: RoundConfig, cons_hash: str, stage: str) -> dict:
    return {
        "round": cfg.round_id, "stage": stage, "constitution_hash": cons_hash, "model": cfg.model,
        "sampling": cfg.sampling.model_dump(), "seed": cfg.seed,
    }


def _shard(prompts: list, cfg: RoundConfig, k: int) -> list:
    return prompts[k * cfg.shard_size : (k + 1) * cfg.shard_size]


class ModelCache:
    """Keeps one loaded base model per process (a worker's life) and swaps LoRA adapters
    on it instead of reloading the base when only the adapter changes."""

    def __init__(self) -> None:
        self._base_key: tuple | None = None
        self._model = self._tok = None
        self._adapters: dict[str, str] = {}  # adapter path -> peft adapter name
        self.loads = 0

    def clear(self) -> None:
        self._base_key = self._model = self._tok = None
        self._adapters = {}

    def get(self, spec: str, four_bit: bool = False, adapter: str | None = None):
        r = models_mod.resolve(spec)
        adapter = adapter or r.adapter
        key = (r.base, r.embedded, four_bit)
        if self._base_key != key:
            self.clear()
            self._model, self._tok = models_mod.load(models_mod.Resolved(spec, r.base, None, r.embedded), four_bit=four_bit)
            self._base_key = key
            self.loads += 1
        if adapter is None:
            if self._adapters:
                return _NoAdapter(self._model), self._tok
            return self._model, self._tok
        from peft import PeftModel

        if adapter not in self._adapters:
            name = f"a{len(self._adapters)}"
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(adapter, adapter_name=name)
            else:
                self._model = PeftModel.from_pretrained(self._model, adapter, adapter_name=name)
            self._model.eval()
            self._adapters[adapter] = name
        self._model.set_adapter(self._adapters[adapter])
        return self._model, self._tok


class _NoAdapter:
    """A PeftModel seen with its adapters disabled (the plain base), for generation."""

    def __init__(self, peft_model) -> None:
        self._m = peft_model

    def __getattr__(self, name):
        return getattr(self._m, name)

    def parameters(self):
        return self._m.parameters()

    def generate(self, *a, **kw):
        with self._m.disable_adapter():
            return self._m.generate(*a, **kw)

    def __call__(self, *a, **kw):
        with self._m.disable_adapter():
            return self._m(*a, **kw)


def run_unit(round_dir: Path, unit: Unit, cache: ModelCache, meta: dict | None = None,
             guard: Callable[[], bool] | None = None) -> bool:
    """Do one unit and commit its output. Returns False if it was already done, or if
    `guard` (checked just before the commit, e.g. a lease's fencing token) says no."""
    from cai import critique

    guard = guard or (lambda: True)
    if unit.stage in TRAINING:
        for stage in [s for s in ("critique", "label") if s in load_config(round_dir).stages]:
            finalize(round_dir, stage)  # training reads the merged datasets
        if is_done(round_dir, unit):
            return False
        cache.clear()  # free the generation model's memory before training
        from cai.train import run as train_run

        return train_run.run_stage(round_dir, unit.stage, guard=guard)

    if is_done(round_dir, unit):
        return False
    cfg = load_config(round_dir)
    cons = load_constitution(round_dir)
    started = time.time()
    if unit.stage == "respond":
        prompts = _shard(load_prompts(round_dir), cfg, unit.shard)
        model, tok = cache.get(cfg.model)
        sampling = cfg.sampling.model_copy(update={"seed": cfg.seed * 10_000 + unit.shard})
        rows = critique.respond(model, tok, prompts, sampling)
        prov = provenance(cfg, cons.hash, "respond")
        for r in rows:
            r["provenance"] = prov
        payload: dict = {"rows": rows}
    elif unit.stage == "critique":
        responses = store.read_json(unit_output(round_dir, Unit(stage="respond", shard=unit.shard)))["rows"]
        model, tok = cache.get(cfg.model)
        sampling = cfg.sampling.model_copy(update={"seed": cfg.seed * 10_000 + unit.shard})
        prov = {**provenance(cfg, cons.hash, "critique"), "passes": cfg.critique.passes}
        sft, crit = critique.critique_revise(model, tok, cons, responses, cfg.critique, sampling, prov)
        payload = {"sft": sft, "critiques": crit}
    elif unit.stage == "pairs":
        from cai import feedback

        prompts = _shard(load_prompts(round_dir), cfg, unit.shard)
        model, tok = cache.get(cfg.model, adapter=policy_adapter(round_dir))
        sampling = cfg.sampling.model_copy(update={"seed": cfg.seed * 10_000 + 5_000 + unit.shard})
        rows, identical = feedback.sample_pairs(model, tok, prompts, sampling)
        prov = {**provenance(cfg, cons.hash, "pairs"), "policy_adapter": policy_adapter(round_dir, relative=True)}
        for r in rows:
            r["provenance"] = prov
        payload = {"rows": rows, "identical_skipped": identical}
    elif unit.stage == "label":
        from cai import feedback

        if cfg.pairs_input:
            pairs = _shard(store.read_jsonl(round_dir / "inputs" / "pairs.jsonl"), cfg, unit.shard)
        else:
            pairs = store.read_json(unit_output(round_dir, Unit(stage="pairs", shard=unit.shard)))["rows"]
        judge = judge_spec(cfg)
        model, tok = cache.get(judge)
        prov = {**provenance(cfg, cons.hash, "label"), "judge": judge, "settings": cfg.label.model_dump(mode="json")}
        rows = feedback.label_pairs(model, tok, cons, pairs, cfg.label, cfg.seed, prov) if pairs else []
        payload = {"rows": rows}
    else:
        raise InputError(f"stage {unit.stage} is not available in this version")
    payload["meta"] = {"seconds": round(time.time() - started, 3), "finished_at": time.time(), **(meta or {})}
    out = unit_output(round_dir, unit)
    if out.exists() or not guard():  # someone else committed, or our lease is stale: theirs stands
        return False
    return store.create_json(out, payload)  # exclusive: of two racing commits exactly one lands


def finalize(round_dir: Path, stage: str) -> bool:
    """Merge a sharded stage's outputs into its dataset once every shard is present."""
    cfg = load_config(round_dir)
    units = units_of(round_dir, stage, cfg)
    if stage_done(round_dir, stage) or not all(is_done(round_dir, u) for u in units):
        return False
    parts = [store.read_json(unit_output(round_dir, u)) for u in units]
    if stage in ("respond", "pairs"):
        store.write_jsonl(stage_output(round_dir, stage), [r for p in parts for r in p["rows"]])
    elif stage == "label":
        rows = [r for p in parts for r in p["rows"]]
        store.write_jsonl(round_dir / "datasets" / "labels.jsonl", rows)
        keep = [r for r in rows if r["valid"] and r["margin"] >= cfg.label.min_margin]
        store.write_jsonl(stage_output(round_dir, stage), keep)
    elif stage == "critique":
        store.write_jsonl(round_dir / "datasets" / "critiques.jsonl", [r for p in parts for r in p["critiques"]])
        store.write_jsonl(stage_output(round_dir, stage), [r for p in parts for r in p["sft"]])
    write_manifest(round_dir)
    return True


def run_in_process(round_dir: Path, on_progress=None) -> None:
    """Run every remaining unit of the round here, in stage order, loading the model once."""
    cfg = load_config(round_dir)
    cache = ModelCache()
    for stage in cfg.stages:
        for u in units_of(round_dir, stage, cfg):
            if not is_done(round_dir, u):
                run_unit(round_dir, u, cache, meta={"runner": "in-process"})
            if on_progress:
                on_progress(u)
        finalize(round_dir, stage)
    write_manifest(round_dir)


# ---------------------------------------------------------------- manifest


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ["cai", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "celery"]:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def counts(round_dir: Path) -> dict:
    c: dict = {"prompts": sum(1 for _ in (round_dir / "inputs" / "prompts.jsonl").open())}
    crit = round_dir / "datasets" / "critiques.jsonl"
    if crit.exists():
        rows = store.read_jsonl(crit)
        why: dict[str, int] = {}
        for r in rows:
            if r["degenerate"]:
                why[r["degenerate"]] = why.get(r["degenerate"], 0) + 1
        sft = store.read_jsonl(round_dir / "datasets" / "sft.jsonl")
        c["critique_passes"] = len(rows)
        c["revisions_degenerate"] = why
        c["revisions_accepted"] = len(rows) - sum(why.values())
        c["sft_rows"] = len(sft)
        c["sft_dropped_no_accepted_revision"] = c["prompts"] - len(sft)
    pairs = round_dir / "work" / "pairs"
    if stage_done(round_dir, "pairs"):
        parts = [store.read_json(f) for f in sorted(pairs.glob("*.json"))]
        c["pairs"] = sum(len(p["rows"]) for p in parts)
        c["pairs_identical_skipped"] = sum(p["identical_skipped"] for p in parts)
    if stage_done(round_dir, "label"):
        from cai.feedback import judge_stats

        c["judge"] = judge_stats(store.read_jsonl(round_dir / "datasets" / "labels.jsonl"), load_config(round_dir).label)
    return c


def _unit_seconds(round_dir: Path, unit: Unit) -> float:
    out = unit_output(round_dir, unit)
    if unit.stage in TRAINING:
        card = out / "cai.json"
        return store.read_json(card).get("train", {}).get("seconds", 0) if card.exists() else 0
    return store.read_json(out).get("meta", {}).get("seconds", 0)


def training_metrics(round_dir: Path) -> dict:
    out = {}
    for stage, name in TRAINING.items():
        card = round_dir / "adapters" / name / "cai.json"
        if card.exists():
            c = store.read_json(card)
            out[name] = {"train": {k: v for k, v in c.get("train", {}).items() if k != "loss_history"},
                         "metrics": c.get("metrics", {}), "init_adapter": c.get("init_adapter")}
    return out


def stage_status(round_dir: Path, cfg: RoundConfig) -> dict:
    out = {}
    for stage in cfg.stages:
        units = units_of(round_dir, stage, cfg)
        done = [u for u in units if is_done(round_dir, u)]
        secs = sum(_unit_seconds(round_dir, u) for u in done)
        out[stage] = {
            "status": "done" if stage_done(round_dir, stage) else ("running" if done else "pending"),
            "units_done": len(done), "units": len(units), "seconds": round(secs, 2),
        }
    return out


def write_manifest(round_dir: Path, extra: dict | None = None) -> dict:
    cfg = load_config(round_dir)
    cons = load_constitution(round_dir)
    path = round_dir / store.MANIFEST
    old = store.read_json(path) if path.exists() else {}
    man = {
        "round_id": cfg.round_id,
        "parent_round": cfg.parent,
        "created": cfg.created,
        "updated": time.time(),
        "config": cfg.model_dump(mode="json"),
        "constitution": {"name": cons.name, "hash": cons.hash, "snapshot": "constitution.yaml",
                         "principles": [p.id for p in cons.principles]},
        "models": {"policy": cfg.model, **({"judge": judge_spec(cfg)} if "label" in cfg.stages else {})},
        "seeds": {"round": cfg.seed},
        "versions": _versions(),
        "stages": stage_status(round_dir, cfg),
        "counts": counts(round_dir),
        "training": training_metrics(round_dir),
        "finished": finished(round_dir, cfg),
        **{k: v for k, v in old.items() if k in ("status", "error")},
        **(extra or {}),
    }
    store.write_json(path, man)
    return man
