"""Model roles: who makes which text in a round, as one literal table.

A round has four roles, each a model spec plus optional server settings (RoundConfig
fields), and every stage names the roles it uses in its row (cai.stages):

  policy  the model being improved: first answers, sampled pairs, the answers evaluate
          scores, the base training starts from. Spec `model`, server `engine`.
  critic  writes critiques and revisions, and any answer written under the constitution
          (principle-driven answers, contrastive answers). Spec `critic`, server
          `critic_engine`; default: the policy itself (with its adapter, on its server),
          as in the paper's self-critique.
  judge   preference labels, the judge's self-check, evaluation's judge questions. Spec
          `judge`, server `judge_engine`; default: the policy's base model (never its
          adapter), in process.
  reward  the round's reward model (adapters/reward on the policy's base), scored in
          process through the engine seam's `score` verb.

`engine(ctx, role, adapter)` is the one function that builds the engine a stage asks
for. Knows RoundConfig's field names and the engine kinds; knows nothing about stages'
work, files of a round beyond its adapters, or queues.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cai.config import RoundConfig


@dataclass(frozen=True)
class Role:
    name: str
    spec_key: str | None      # RoundConfig field holding its model spec (None: derived)
    server_key: str | None    # RoundConfig field holding its server settings (None: in process only)
    flag: str | None          # the command-line flag of its server URL


ROLES: dict[str, Role] = {r.name: r for r in [
    Role("policy", "model", "engine", "--engine-url"),
    Role("critic", "critic", "critic_engine", "--critic-url"),
    Role("judge", "judge", "judge_engine", "--judge-url"),
    Role("reward", None, None, None),
]}


def spec(cfg: "RoundConfig", role: str) -> str:
    """The model spec a role runs: the configured one, else its default (critic: the
    policy; judge and reward: the policy's base model)."""
    from cai import models

    if role == "policy":
        return cfg.model
    if role == "critic":
        return cfg.critic or cfg.model
    return models.judge_spec(cfg.model, cfg.judge if role == "judge" else None)


def follows_policy(cfg: "RoundConfig", role: str) -> bool:
    """Whether a role is the policy itself (same model, same adapter chain, same server)."""
    return role == "policy" or (role == "critic" and not cfg.critic)


def server(cfg: "RoundConfig", role: str):
    """The server settings a role goes through in this round, or None (in process)."""
    if follows_policy(cfg, role):
        return cfg.engine
    key = ROLES[role].server_key
    return getattr(cfg, key) if key else None


def flag(cfg: "RoundConfig", role: str) -> str:
    return ROLES["policy" if follows_policy(cfg, role) else role].flag or ""


def engine(ctx, role: str, adapter: str | None = None):
    """The engine a stage's unit asks for: the role's server (its spec's own adapter, or
    `adapter`, loaded there by runtime LoRA), else in process from the worker's model cache."""
    s = server(ctx.cfg, role)
    sp = spec(ctx.cfg, role)
    if s is not None:
        from cai import server as server_mod

        return server_mod.ServerEngine(s, adapter=adapter or server_mod.spec_adapter(sp))
    from cai.engine import LocalEngine

    return LocalEngine(*ctx.cache.get(sp, adapter=adapter), name=f"{role}:{adapter or sp}")


def describe(cfg: "RoundConfig", role: str, adapter: str | None) -> dict:
    """What the manifest records of who made a stage's text."""
    s = server(cfg, role)
    from cai.server import safe_url

    return {"role": role, "model": spec(cfg, role), "adapter": adapter,
            "engine": f"server {safe_url(s.url)}" if s is not None else "in-process"}
