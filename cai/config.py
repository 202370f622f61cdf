"""A round's settings as one typed config (`RoundConfig`), read from YAML or built in code.

Every stage reads this one object. `cai round run|submit --config round.yaml` loads it
(errors name file:line:col and the field path); command-line flags only override keys.
Every round folder holds `round.yaml`, the resolved config (paths made absolute, every
default written out): given back to `--config` as it is, it reproduces the round.
`Round` adds what a round is once created (its id and creation time); it is stored
as round.json beside it.

Knows the stage names and the stage graph (from cai.stages); knows nothing about
files of a round folder, models or queues.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cai import stages as stages_mod
from cai import yamlio
from cai.critique import CritiqueSettings
from cai.evaluate import EvalSettings
from cai.feedback import LabelSettings
from cai.generation import Sampling
from cai.pairs import PairSettings

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONSTITUTION = REPO / "constitution" / "default.yaml"


class ServerSettings(BaseModel):
    """An OpenAI-compatible inference server a round generates or judges through (cai.server).
    The API key is never part of it: it comes from the environment (CAI_ENGINE_API_KEY)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(..., description="Base URL, e.g. http://127.0.0.1:8000 or http://127.0.0.1:8000/v1 (no credentials in it).")
    model: str | None = Field(None, description="Served model name; default: the first model the server serves.")
    concurrency: int = Field(16, ge=1, le=1024, description="Requests in flight at once (the server batches them).")
    timeout: float = Field(300, gt=0, le=86400, allow_inf_nan=False,
                           description="Seconds a whole request may take (a deadline, not a limit per read); "
                                       "a request with its retries ends within timeout x (retries + 1).")
    retries: int = Field(4, ge=0, le=20, description="Retries per request on connection errors, 429 and 5xx (with backoff).")

    @field_validator("url")
    @classmethod
    def _plain_url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        p = urlsplit(v.strip())
        if p.scheme not in ("http", "https") or not p.hostname:
            raise ValueError(f"{v!r} is not an http(s) URL (e.g. http://127.0.0.1:8000)")
        if p.username is not None or p.password is not None or p.query or p.fragment:
            raise ValueError("the URL holds credentials, a query or a fragment; give the bare URL and put the key in "
                             "CAI_ENGINE_API_KEY (it is never written to a round)")
        return v.strip().rstrip("/")


class RoundConfig(BaseModel):
    """Everything a user chooses about a round. Field names are the YAML keys."""

    model_config = ConfigDict(extra="forbid")

    constitution: str = Field(str(DEFAULT_CONSTITUTION), description="Constitution YAML path.")
    prompts: str | None = Field(None, description="Prompts: .jsonl, .parquet, a dataset folder or a shipped set.")
    pairs_file: str | None = Field(None, description="Label this responses file (prompt + responses: [a, b]) instead of making pairs.")
    limit: int | None = Field(None, ge=1, description="Use only the first N prompts.")
    model: str = Field("smollm2-135m", description="Policy model spec.")
    critic: str | None = Field(None, description="Critic model spec (critiques, revisions, answers under the constitution); "
                               "default: the policy itself.")
    judge: str | None = Field(None, description="Feedback model spec; default: the policy's base model.")
    stages: list[str] = Field(default_factory=lambda: list(stages_mod.DEFAULT), description="Stages to run, in table order.")
    shard_size: int = Field(32, gt=0, description="Prompts per shard (one unit of work).")
    seed: int = 0
    sampling: Sampling = Field(default_factory=Sampling)
    critique: CritiqueSettings = Field(default_factory=CritiqueSettings)
    pairs: PairSettings = Field(default_factory=PairSettings)
    label: LabelSettings = Field(default_factory=LabelSettings)
    evaluate: EvalSettings = Field(default_factory=EvalSettings)
    recipe: str = Field("cpu-tiny", description="Training recipe: a shipped name or a YAML path.")
    parent: str | None = Field(None, description="Parent round id: generation and training start from its policy adapter.")
    engine: ServerSettings | None = Field(None, description="Server for the policy role (respond, samples, evaluated "
                                          "answers; and the critic when it is the policy); default: in process.")
    critic_engine: ServerSettings | None = Field(None, description="Server for a separate critic role; default: in process.")
    judge_engine: ServerSettings | None = Field(None, description="Server for the judge role (label, evaluate's judge); "
                                                "default: in process.")

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in stages_mod.NAMES]
        if bad:
            raise ValueError(f"unknown stage {', '.join(bad)}; choose from {', '.join(stages_mod.NAMES)}")
        if not v:
            raise ValueError("no stages; name at least one")
        return sorted(set(v), key=stages_mod.NAMES.index)

    def problems(self) -> list[str]:
        """Checks across fields (made after overrides are applied): the stage plan and inputs."""
        out = [f"stages: {p}" for p in stages_mod.check_plan(self.stages, pairs_file=self.pairs_file is not None)]
        if self.prompts is None and self.pairs_file is None:
            out.append("prompts: required (or pairs_file: FILE for a label-only round)")
        if self.pairs_file is not None and self.prompts is not None:
            out.append("pairs_file: a pairs file replaces the prompts; give one of prompts or pairs_file")
        if self.critic_engine is not None and not self.critic:
            out.append("critic_engine: a critic server needs a critic model (--critic SPEC); without one the critic is "
                       "the policy and uses its server (--engine-url)")
        if "pairs" in self.stages and "revision" in self.pairs.sources and "critique" not in self.stages:
            out.append("pairs.sources: revision pairs need the critique stage in the same round")
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


class Round(RoundConfig):
    """A created round: its config plus identity. Stored as round.json."""

    round_id: str
    created: float = Field(default_factory=time.time)

    def settings(self) -> RoundConfig:
        return RoundConfig.model_validate(self.model_dump(exclude={"round_id", "created"}))


def load(path: str | Path) -> dict:
    """A round config YAML as a plain mapping, validated (file:line:col errors); the caller
    applies overrides and validates the result again."""
    path = Path(path).expanduser()
    cfg = yamlio.parse(yamlio.read_text(path, "round config"), str(path), RoundConfig, what="round config")
    return cfg.model_dump(mode="json", exclude_unset=True)


def resolve(data: dict, overrides: dict | None = None) -> RoundConfig:
    """Merge flag overrides (nested keys as dicts) over a config mapping and validate.
    Local paths are made absolute, so workers in other folders and a later resubmission
    read the same files."""
    from cai.errors import InputError
    from pydantic import ValidationError

    merged = _merge(dict(data), overrides or {})
    try:
        cfg = RoundConfig.model_validate(merged)
    except ValidationError as e:
        raise InputError([f"round config: {yamlio.fmt_loc(tuple(x['loc']))}: {x['msg'].removeprefix('Value error, ')}"
                          for x in e.errors()]) from None
    if cfg.problems():
        raise InputError(cfg.problems())
    updates = {}
    for key in ("constitution", "prompts", "pairs_file", "model", "critic", "judge", "recipe"):
        value = getattr(cfg, key)
        if value and Path(value).expanduser().exists():
            updates[key] = str(Path(value).expanduser().resolve())
    return cfg.model_copy(update=updates)


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = _merge(dict(base[k]), v)
        else:
            base[k] = v
    return base
