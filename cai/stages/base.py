"""What every stage module shares: the unit context (`Ctx`), the row type (`Stage`) and
small helpers over a round folder's files.

A unit's `run` gets a `Ctx`: the round's config, constitution and folder readers, its
shard, a model cache and a commit guard. A sharded stage returns a JSON payload that
the runner commits; a whole-stage unit (training) commits its own output folder.

Knows the round folder's layout and the roles (cai.roles); knows nothing about Celery or
Redis (a row's queue is a plain string that workers.keys lists).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from cai import roles, store

if TYPE_CHECKING:
    from cai.config import Round
    from cai.constitution import Constitution
    from cai.models import ModelCache
    from cai.prompts import Prompt

PARENT_POLICY = Path("inputs") / "parent_policy"


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
    rows: dict[str, "Stage"]  # the stage table (cai.stages.ROW), handed in: stage modules never import it

    @property
    def row(self) -> "Stage":
        return self.rows[self.stage]

    def prompts(self) -> list["Prompt"]:
        """This shard's prompts (all of them for a whole-stage unit)."""
        from cai.prompts import Prompt

        path = self.rd / "inputs" / "prompts.jsonl"
        if self.shard is None:
            return [Prompt.model_validate(r) for r in store.read_jsonl(path)]
        n = self.cfg.shard_size
        return [Prompt.model_validate(r) for r in store.read_jsonl_slice(path, self.shard * n, (self.shard + 1) * n)]

    def cut(self, rows: list) -> list:
        if self.shard is None:
            return rows
        n = self.cfg.shard_size
        return rows[self.shard * n : (self.shard + 1) * n]

    def payload(self, stage: str) -> dict:
        """The committed output of the same shard of another sharded stage."""
        return store.read_json(self.rows[stage].unit_output(self.rd, self.shard))

    def provenance(self, **extra) -> dict:
        return {"round": self.cfg.round_id, "stage": self.stage, "constitution_hash": self.cons.hash,
                "model": self.cfg.model, "sampling": self.cfg.sampling.model_dump(), "seed": self.cfg.seed, **extra}

    def sampling(self, *parts):
        """The round's sampling with a seed derived for this stage and shard (and parts)."""
        return self.cfg.sampling.derived(self.stage, self.shard, *parts)

    def policy_adapter(self) -> str | None:
        """The adapter the policy starts from in this stage (its row's `start`), if present."""
        rel = start_adapter(self.rd, self.cfg, self.row.start, self.rows)
        return str(self.rd / rel) if rel else None

    def engine(self, role: str, adapter: str | None = None):
        """The engine for one of this stage's roles (cai.roles.engine); the policy (and a
        critic that is the policy) start from this stage's policy adapter."""
        if adapter is None and roles.follows_policy(self.cfg, role):
            adapter = self.policy_adapter()
        return roles.engine(self, role, adapter)


def start_adapter(rd: Path, cfg: "Round", start: tuple[str, ...], rows: dict[str, "Stage"]) -> str | None:
    """The first adapter of a start rule that the round has (relative to the round folder):
    a rule lists training stages of this round (their adapters) and `parent` (the parent
    round's policy). The same rule at run time (present files) and for the manifest
    (stages in the round)."""
    for s in start:
        if s == "parent":
            if (rd / PARENT_POLICY / "adapter_config.json").exists():
                return str(PARENT_POLICY)
        elif s in cfg.stages:  # a stage this one runs after (its row's `after`), so done by now
            return rows[s].output
    return None


@dataclass(frozen=True)
class Stage:
    name: str
    sharded: bool                          # runs per shard of prompts, else once per round
    queue: str                             # generate | train | cpu (workers.keys.QUEUES)
    needs: tuple[str, ...]                 # stages that must be in the same round; this reads their units
    after: tuple[str, ...]                 # stages this reads when the round has them
    output: str                            # merged, user-facing output (relative); present = stage done
    run: Callable[[Ctx], Any]              # sharded: a shard's payload (dict); whole: commits itself, returns bool
    roles: tuple[str, ...] = ()            # model roles it uses (cai.roles): routing, preflight, manifest
    start: tuple[str, ...] = ("parent",)   # where the policy starts: first present of these (cai.stages.base.start_adapter)
    default: bool = True                   # in a round's stages unless told otherwise
    yields_policy: bool = False            # its adapter can be the next round's policy (the last such stage wins)
    evaluated_as: str | None = None        # evaluate compares its adapter under this name
    merge: Callable[[Ctx, list[dict]], None] | None = None   # sharded: write the merged datasets from the payloads
    count: Callable[[Path, "Round"], dict] | None = None     # figures for the manifest, once the stage is done
    shards: Callable[[Path, "Round"], int] | None = None     # sharded over something else than prompts: how many shards
    shard_needs: Callable[[Path, "Round", int], list[int]] | None = None  # shards of this same stage a shard reads

    def unit_output(self, rd: Path, shard: int | None) -> Path:
        if self.sharded:
            return rd / "work" / self.name / f"{shard:04d}.json"
        return rd / self.output


def relative(rd: Path, adapter: str | None) -> str | None:
    return None if adapter is None else str(Path(adapter).relative_to(rd)) if Path(adapter).is_relative_to(rd) else adapter


def rows_of(parts: list[dict], key: str = "rows") -> list[dict]:
    return [r for p in parts for r in p[key]]


def merge_rows(ctx: Ctx, parts: list[dict]) -> None:
    store.write_jsonl(ctx.rd / ctx.row.output, rows_of(parts))
