"""Run one training stage of a round: pick its dataset, its starting adapter and its
trainer, and commit the adapter under adapters/. The glue between the stage table and
the trainers; gets the round's config and folder from the caller (knows no plan)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from cai import models, store
from cai.train import common, dpo, reward, sft
from cai.train.recipe import Recipe

if TYPE_CHECKING:
    from cai.config import Round


def run_stage(round_dir: Path, cfg: "Round", cons_hash: str, stage: str, target: Path,
              guard: Callable[[], bool] = lambda: True) -> bool:
    recipe = Recipe.model_validate(store.read_json_yaml(round_dir / "recipe.yaml"))
    r = models.resolve(cfg.model)
    base_path = models.base_path(r)
    base_name = models.EMBEDDED if r.embedded else r.base
    parent_policy = round_dir / "inputs" / "parent_policy"
    ckpt = round_dir / "work" / stage / "checkpoints"
    datasets_dir = round_dir / "datasets"

    def card(kind: str, data: dict[str, Path], init: str | None) -> dict:
        return common.card_base(kind=kind, base_model=base_name, round_id=cfg.round_id, parent=cfg.parent,
                                constitution_hash=cons_hash, recipe=recipe, datasets=data, init_adapter=init,
                                base_path=base_path)

    if stage == "train-sft":
        init = str(parent_policy) if parent_policy.exists() else r.adapter
        data = datasets_dir / "sft.jsonl"
        return sft.train(base_path, data, target, ckpt, recipe, card("SFT policy", {"sft.jsonl": data}, init),
                         init_adapter=init, guard=guard)
    if stage == "train-rm":
        data = datasets_dir / "preferences.jsonl"
        return reward.train(base_path, data, target, ckpt, recipe, card("reward model", {"preferences.jsonl": data}, None),
                            guard=guard)
    if stage == "train-policy":
        sft_dir = round_dir / "adapters" / "sft"
        init = str(sft_dir) if sft_dir.exists() else (str(parent_policy) if parent_policy.exists() else r.adapter)
        data = datasets_dir / "preferences.jsonl"
        return dpo.train(base_path, data, target, ckpt, recipe, card("DPO policy", {"preferences.jsonl": data}, init),
                         sft_adapter=init, guard=guard)
    raise ValueError(stage)
