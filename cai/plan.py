"""The round plan: its units, which unit reads which, and what is done, all derived from
the stage table (cai.stages) and the files present in the round folder.

Read-only and cheap (existence checks): the runner, the manifest, the queue service and
status polling all ask it. Knows nothing about running units, Celery or Redis.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, ValidationError

from cai import constitution as constitution_mod
from cai import store
from cai.config import Round
from cai.stages import ROW


def load_config(round_dir: Path) -> Round:
    """The round's config from round.json; InputError naming the file when it is corrupt
    (not UTF-8, not JSON, nested too deeply, or not a round of this schema). OSErrors
    (missing, unreadable) pass through: they may be transient."""
    from cai.errors import InputError

    path = round_dir / store.ROUND_FILE
    try:
        return Round.model_validate(store.read_json(path))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, pydantic's ValidationError
        if isinstance(e, ValidationError):
            x = e.errors()[0]
            why = (f"not a round of this cai version ({'.'.join(map(str, x['loc'])) or 'top level'}: {x['msg']}); "
                   "use the cai version that made it, or submit the round again")
        else:
            why = f"corrupt ({type(e).__name__}); the round folder is damaged, submit the round again"
        raise InputError(f"{path}: {why}") from None


def load_constitution(round_dir: Path) -> constitution_mod.Constitution:
    return constitution_mod.load(round_dir / "constitution.yaml")


# ---------------------------------------------------------------- plan and state


class Unit(BaseModel):
    stage: str
    shard: int | None = None  # None for whole-stage units (training)

    @property
    def key(self) -> str:
        return self.stage if self.shard is None else f"{self.stage}/{self.shard:04d}"


def n_shards(round_dir: Path, cfg: Round, stage: str | None = None) -> int:
    """Shards of a sharded stage: of the prompts, unless its row counts its own (evaluate)."""
    if stage is not None and ROW[stage].shards is not None:
        return ROW[stage].shards(round_dir, cfg)
    return max(1, math.ceil(store.count_lines(round_dir / "inputs" / "prompts.jsonl") / cfg.shard_size))


def unit_output(round_dir: Path, unit: Unit) -> Path:
    return ROW[unit.stage].unit_output(round_dir, unit.shard)


def queue_of(cfg: Round, stage: str) -> str:
    """The queue (resource) a stage's units need in this round: its row's, except that a
    stage whose every role goes through a server holds no model and goes to `cpu`."""
    from cai.stages import uses_model_here

    return ROW[stage].queue if uses_model_here(cfg, stage) else "cpu"


def stage_output(round_dir: Path, stage: str) -> Path:
    """The merged, user-facing output whose presence marks a stage finished."""
    return round_dir / ROW[stage].output


def units_of(round_dir: Path, stage: str, cfg: Round | None = None) -> list[Unit]:
    if ROW[stage].sharded:
        return [Unit(stage=stage, shard=k) for k in range(n_shards(round_dir, cfg or load_config(round_dir), stage))]
    return [Unit(stage=stage)]


def is_done(round_dir: Path, unit: Unit) -> bool:
    return unit_output(round_dir, unit).exists()


def stage_done(round_dir: Path, stage: str) -> bool:
    return stage_output(round_dir, stage).exists()


def needs(round_dir: Path, unit: Unit, cfg: Round) -> list[Unit]:
    """The units whose outputs this unit reads: the same shard of a sharded stage when both
    are sharded, every shard when this one is whole, the whole unit of a whole stage."""
    row = ROW[unit.stage]
    out: list[Unit] = []
    for dep in [s for s in row.needs + row.after if s in cfg.stages]:
        if not ROW[dep].sharded:
            out.append(Unit(stage=dep))
        elif row.sharded:
            out.append(Unit(stage=dep, shard=unit.shard))
        else:
            out += units_of(round_dir, dep, cfg)
    if row.shard_needs is not None and unit.shard is not None:  # shards of the same stage it reads
        out += [Unit(stage=unit.stage, shard=k) for k in row.shard_needs(round_dir, cfg, unit.shard)]
    return out


def runnable(round_dir: Path, cfg: Round | None = None) -> list[Unit]:
    """Units of the round's stages that are not done and whose inputs are all present."""
    cfg = cfg or load_config(round_dir)
    out = []
    for stage in cfg.stages:
        for u in units_of(round_dir, stage, cfg):
            if not is_done(round_dir, u) and all(is_done(round_dir, n) for n in needs(round_dir, u, cfg)):
                out.append(u)
    return out


def finished(round_dir: Path, cfg: Round | None = None) -> bool:
    cfg = cfg or load_config(round_dir)
    return all(stage_done(round_dir, s) for s in cfg.stages)
