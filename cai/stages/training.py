"""What the training stages share: the recipe, the base model, checkpoints and the model
card of a round's training unit, and the manifest figures from an adapter's card. Each
training stage is its own module (train_sft, train_rm, train_policy) calling its trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cai import store
from cai.stages.base import Ctx

if TYPE_CHECKING:
    from cai.config import Round
    from cai.train.recipe import Recipe


@dataclass
class Job:
    recipe: "Recipe"
    base_path: str
    target: Path
    ckpt: Path
    datasets: Path
    init: str | None          # the adapter training starts from (the row's `start`), absolute

    def card(self, ctx: Ctx, kind: str, data: dict[str, Path], init: str | None) -> dict:
        from cai import models
        from cai.train import common

        r = models.resolve(ctx.cfg.model)
        return common.card_base(kind=kind, base_model=models.EMBEDDED if r.embedded else r.base, round_id=ctx.cfg.round_id,
                                parent=ctx.cfg.parent, constitution_hash=ctx.cons.hash, recipe=self.recipe,
                                datasets=data, init_adapter=init, base_path=self.base_path)


def job(ctx: Ctx) -> Job:
    """Free the generation model's memory, then the training unit's paths and settings."""
    from cai import models
    from cai.train.recipe import Recipe

    ctx.cache.clear()
    r = models.resolve(ctx.cfg.model)
    init = ctx.policy_adapter() or r.adapter
    return Job(recipe=Recipe.model_validate(store.read_json_yaml(ctx.rd / "recipe.yaml")), base_path=models.base_path(r),
               target=ctx.row.unit_output(ctx.rd, None), ckpt=ctx.rd / "work" / ctx.stage / "checkpoints",
               datasets=ctx.rd / "datasets", init=init)


def need_preferences(ctx: Ctx) -> None:
    """Refuse, saying why, when the label stage kept no preference rows."""
    from cai import roles
    from cai.errors import InputError
    from cai.feedback import nothing_survived
    from cai.stages.label import OUTPUT, count

    if not store.count_lines(ctx.rd / OUTPUT):
        raise InputError(nothing_survived(count(ctx.rd, ctx.cfg)["judge"], roles.spec(ctx.cfg, "judge")))


def count(rd: Path, name: str) -> dict:
    card = rd / "adapters" / name / "cai.json"
    if not card.exists():
        return {}
    c = store.read_json(card)
    return {"training": {name: {"train": {k: v for k, v in c.get("train", {}).items() if k != "loss_history"},
                                "metrics": c.get("metrics", {}), "init_adapter": c.get("init_adapter"),
                                **({"watch": c["watch"]} if "watch" in c else {})}}}
