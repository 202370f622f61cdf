"""Preparing a round folder and running its units, over the stage table (cai.stages).

A round folder is prepared once (round.json/round.yaml, constitution snapshot, prompt
snapshot, recipe snapshot); afterwards all state is derived from the files present in
it. Work comes in units: one shard of a sharded stage, or a whole stage. A unit's
output is committed atomically; a present output means the unit is done, whoever ran
it. The in-process runner here and the queue (workers/) both call `run_unit` and
`finalize`.

Knows the round folder's fixed part; the plan (which unit needs which) is cai.plan and
what each stage does is its row in cai.stages; knows nothing about Celery or Redis.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import yaml
from cai import constitution as constitution_mod
from cai import models as models_mod
from cai import probes as probes_mod
from cai import prompts as prompts_mod
from cai import server as server_mod
from cai import store
from cai.config import Round, RoundConfig
from cai.errors import InputError
from cai.evaluate import gate_failures, load_gate
from cai.manifest import write_manifest
from cai.plan import Unit, is_done, load_config, load_constitution, stage_done, unit_output, units_of
from cai.stages import ROW, Ctx, next_policy, served
from cai.train import recipe as recipe_mod

ROUND_YAML = "round.yaml"
SERVERS = Path("inputs") / "servers.json"  # what cai.server.describe said of the round's servers when it was prepared


# ---------------------------------------------------------------- preparing


def prepare(dest: Path, cfg: RoundConfig, *, round_id: str | None = None, force: bool = False) -> Round:
    """Validate every input, then write the round folder's fixed part.

    Raises InputError listing every problem found before anything is written or loaded.
    The folder is written beside `dest` and moved into place whole.
    Only when the label stage is asked for does this load the judge's tokenizer (not
    its weights), to check that it can spell the choice letters.
    A parent round that ended gated (its evaluation failed the gate) is refused unless
    `force`; prompts that are also evaluation probes are refused, each named.
    """
    from cai.feedback import check_judge

    problems: list[str] = list(cfg.problems())
    cons = ps = None
    pair_rows: list[dict] | None = None

    def check(fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except InputError as e:
            problems.extend(e.problems)

    cons = check(constitution_mod.load, cfg.constitution)
    parent_policy = None
    if cfg.parent is not None:  # the parent's policy adapter, from the store
        parent_dir = check(store.round_path, cfg.parent)
        parent_cfg = check(load_config, parent_dir) if parent_dir else None
        made = next_policy(parent_dir, parent_cfg.stages) if parent_cfg else None
        if parent_cfg is not None and made is None:
            problems.append(f"--parent: round {cfg.parent} trains no policy (its stages: {', '.join(parent_cfg.stages)}); "
                            "a parent round needs train-sft, train-policy or another stage that makes one")
        parent_policy = str(parent_dir / made) if parent_dir and made else None
        gated = gate_failures(parent_dir) if parent_dir else []
        if gated and not force:
            problems.append(f"--parent: round {cfg.parent} ended gated ({'; '.join(gated)}); its policy is not a parent "
                            "for the next round unless you pass --force")
    if cfg.pairs_file:
        pair_rows = check(prompts_mod.load_pairs, cfg.pairs_file, limit=cfg.limit)
        if pair_rows is not None:
            ps = prompts_mod.PromptSet(source=cfg.pairs_file, prompts=[prompts_mod.Prompt(id=r["prompt_id"], messages=r["messages"], category=r.get("category")) for r in pair_rows])
    elif cfg.prompts is not None:
        ps = check(prompts_mod.load, cfg.prompts, limit=cfg.limit)
    probe_list = check(probes_mod.load, cfg.evaluate.probes)
    if "evaluate" in cfg.stages:
        check(load_gate, cfg.evaluate.gate)  # a bad gate file fails now, not after the round's work
    if ps is not None and probe_list:  # probes are held out: never training prompts
        problems += probes_mod.overlap_problems([p.text for p in ps.prompts], ps.source, probe_list)
    check(models_mod.resolve, cfg.model)
    training = [s for s in cfg.stages if not ROW[s].sharded]
    rec = check(recipe_mod.load, cfg.recipe) if training else None
    if parent_policy is not None and not (Path(parent_policy) / "adapter_config.json").exists():
        problems.append(f"--parent: {parent_policy} has no policy adapter (adapter_config.json); the parent round must "
                        f"have finished the stage that makes it")
    served_judge = cfg.judge_engine is not None  # then the judge spec names the served model; nothing loads here
    judge_r = check(models_mod.resolve, cfg.judge) if cfg.judge and not served_judge else None
    if cfg.critic and cfg.critic_engine is None:
        check(models_mod.resolve, cfg.critic)
    if "label" in cfg.stages and cons is not None:
        check(check_judge, cons)
    # which server each role of the stages uses; each: reachable, right model, LoRA ranks, log-probs
    problems += check(lambda: server_mod.check(cfg, dest.parent, parent_policy, served(cfg, cfg.stages))) or []
    if problems:
        raise InputError(problems)
    if dest.exists() and any(dest.iterdir()):
        raise InputError(f"{dest}: folder is not empty; choose a new --out or remove it")
    # the checks that import heavy libraries come last, so bad input is refused in a second, not after torch loads
    if rec is not None and rec.quant.four_bit and (why := models_mod.four_bit_available()):
        raise InputError(f"recipe {rec.name}: quant.four_bit is on but {why}")
    if "label" in cfg.stages and not served_judge:
        from cai.generation import choice_token_ids

        choice_token_ids(models_mod.load_tokenizer(judge_r or models_mod.resolve(cfg.model)))
    rnd = Round(round_id=round_id or store.new_round_id(), **cfg.model_dump())
    servers = server_mod.describe(served(cfg, cfg.stages))  # URL (no credentials), served model, version: for the manifest
    out = store.tmp_dir_beside(dest)  # written whole, then moved into place: an interrupted prepare leaves nothing
    try:
        if servers:
            store.write_json(out / SERVERS, servers)
        if "evaluate" in cfg.stages:  # the probes snapshot the evaluate stage reads
            store.write_jsonl(out / "inputs" / "probes.jsonl", [p.model_dump() for p in probes_mod.load(cfg.evaluate.probes, limit=cfg.evaluate.limit)])
        _write_fixed_part(out, cfg, rnd, cons, ps, pair_rows, rec, parent_policy)
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        if not store.commit_dir(out, dest):
            raise InputError(f"{dest}: another process created it meanwhile; choose a new --out")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return rnd


def _write_fixed_part(out: Path, cfg: RoundConfig, rnd: Round, cons, ps, pair_rows, rec, parent_policy) -> None:
    store.write_text(out / "constitution.yaml", cons.to_yaml())
    store.write_jsonl(out / "inputs" / "prompts.jsonl", [{**p.model_dump(exclude={"answer", "false_belief"}), **p.known()} for p in ps.prompts])
    if pair_rows is not None:
        store.write_jsonl(out / "inputs" / "pairs.jsonl", pair_rows)
    if rec is not None:
        store.write_text(out / "recipe.yaml", yaml.safe_dump(rec.model_dump(mode="json"), sort_keys=False))
    if parent_policy is not None:
        store.copy_tree_nofollow(Path(parent_policy), out / "inputs" / "parent_policy")  # links refused, never followed
    store.write_text(out / ROUND_YAML, cfg.to_yaml())
    store.write_json(out / store.ROUND_FILE, rnd.model_dump(mode="json"))
    write_manifest(out, rnd)


def reopen(dest: Path, cfg: RoundConfig) -> Round:
    """The round already in `dest`, to resume, if it is the same round as `cfg` (same resolved
    settings, same constitution); InputError if the folder holds another round."""
    rnd = load_config(dest)
    mine, theirs = cfg.model_dump(mode="json"), rnd.settings().model_dump(mode="json")
    differ = [k for k in mine if mine[k] != theirs.get(k)]
    try:
        if not differ and constitution_mod.load(cfg.constitution).hash != load_constitution(dest).hash:
            differ = ["constitution (its file changed)"]
    except InputError:
        differ = ["constitution"]
    if differ:
        raise InputError(f"{dest}: holds round {rnd.round_id} with other settings ({', '.join(differ)}); choose a new --out, "
                         f"or resume it as it was with --config {dest / ROUND_YAML}")
    pending = [s for s in rnd.stages if not all(is_done(dest, u) for u in units_of(dest, s, rnd))]
    problems = server_mod.check(rnd, dest, str(dest / "inputs" / "parent_policy") if rnd.parent else None,
                                served(rnd, pending))  # the servers of what is left to do
    if problems:
        raise InputError(problems)
    return rnd


# ---------------------------------------------------------------- running


def run_unit(round_dir: Path, unit: Unit, cache: models_mod.ModelCache, meta: dict | None = None,
             guard: Callable[[], bool] | None = None) -> bool:
    """Do one unit and commit its output. Returns False if it was already done, or if
    `guard` (checked just before the commit, e.g. a lease's fencing token) says no."""
    guard = guard or (lambda: True)
    row = ROW[unit.stage]
    cfg = load_config(round_dir)
    if not row.sharded:
        for dep in row.needs + row.after:  # a whole-stage unit reads the merged datasets
            if dep in cfg.stages:
                finalize(round_dir, dep)
    if is_done(round_dir, unit):
        return False
    ctx = Ctx(rd=round_dir, cfg=cfg, cons=load_constitution(round_dir), stage=unit.stage, shard=unit.shard,
              cache=cache, guard=guard, rows=ROW)
    if not row.sharded:
        return row.run(ctx)
    started = time.time()
    payload = row.run(ctx)
    payload["meta"] = {"seconds": round(time.time() - started, 3), "finished_at": time.time(), **(meta or {})}
    out = unit_output(round_dir, unit)
    if out.exists() or not guard():  # someone else committed, or our lease is stale: theirs stands
        return False
    return store.create_json(out, payload)  # exclusive: of two racing commits exactly one lands


def finalize(round_dir: Path, stage: str) -> bool:
    """Merge a sharded stage's outputs into its datasets once every shard is present."""
    cfg = load_config(round_dir)
    row = ROW[stage]
    units = units_of(round_dir, stage, cfg)
    if row.merge is None or stage_done(round_dir, stage) or not all(is_done(round_dir, u) for u in units):
        return False
    ctx = Ctx(rd=round_dir, cfg=cfg, cons=load_constitution(round_dir), stage=stage, shard=None,
              cache=models_mod.ModelCache(), guard=lambda: True, rows=ROW)
    row.merge(ctx, [store.read_json(unit_output(round_dir, u)) for u in units])
    write_manifest(round_dir, cfg)
    return True


def run_in_process(round_dir: Path, on_progress=None) -> None:
    """Run every remaining unit of the round here, in stage order, loading the model once."""
    cfg = load_config(round_dir)
    cache = models_mod.ModelCache()
    for stage in cfg.stages:
        for u in units_of(round_dir, stage, cfg):
            if not is_done(round_dir, u):
                run_unit(round_dir, u, cache, meta={"runner": "in-process"})
            if on_progress:
                on_progress(u)
        finalize(round_dir, stage)
    write_manifest(round_dir, cfg)
