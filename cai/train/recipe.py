"""Training recipes: YAML files validated by pydantic, and the one small function per
library object that turns plain values into BitsAndBytesConfig / LoraConfig / TRL configs.

Shipped recipes live in cai/data/recipes/ (`cpu-tiny`, `gpu-8b`); a recipe may also be a
path. Knows nothing about datasets or rounds.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cai import yamlio
from cai.errors import InputError

SHIPPED = ("cpu-tiny", "gpu-8b")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Lora(_Strict):
    """peft.LoraConfig's own field names."""

    r: int = Field(8, gt=0)
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class Quant(_Strict):
    four_bit: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    double_quant: bool = True


class Stage(_Strict):
    """A trainer's settings under TRL's own field names (passed through as they are), plus
    the few of ours listed in OURS."""

    learning_rate: float = Field(2e-4, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="Overrides num_train_epochs when > 0.")
    per_device_train_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_length: int = Field(512, gt=8)
    warmup_steps: float = Field(0, ge=0, description="Steps, or a fraction of all steps when below 1.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N optimizer steps.")
    logging_steps: int = Field(1, gt=0)
    seed: int = 0
    min_rows: int = Field(4, gt=0, description="Refuse to train on fewer rows.")


class SFT(Stage):
    pass


class Reward(Stage):
    heldout_fraction: float = Field(0.2, ge=0, lt=1)
    soft_labels: bool = Field(True, description="Target p_chosen (BCE) instead of hard chosen/rejected.")


class DPO(Stage):
    learning_rate: float = Field(5e-5, gt=0)
    beta: float = Field(0.1, gt=0)
    weight_by_confidence: bool = Field(False, description="Weight each pair's loss by its label margin.")


OURS = {"min_rows", "heldout_fraction", "soft_labels", "weight_by_confidence"}  # not TRL's: never passed to it


class Recipe(_Strict):
    name: str
    description: str = ""
    lora: Lora = Field(default_factory=Lora)
    quant: Quant = Field(default_factory=Quant)
    bf16: bool = False
    gradient_checkpointing: bool = False
    sft: SFT = Field(default_factory=SFT)
    reward: Reward = Field(default_factory=Reward)
    dpo: DPO = Field(default_factory=DPO)


def load(spec: str | Path) -> Recipe:
    """A shipped recipe name or a YAML path; InputError naming file/line/field."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if not path.exists() and spec in SHIPPED:
        f = resources.files("cai") / "data" / "recipes" / f"{spec}.yaml"
        return yamlio.parse(f.read_text("utf-8"), str(f), Recipe, what="recipe")
    if not path.exists():
        raise InputError(f"{spec}: no such recipe; give a YAML path or one of: {', '.join(SHIPPED)}")
    return yamlio.parse(yamlio.read_text(path, "recipe file"), str(path), Recipe, what="recipe")


# ---------------------------------------------------------------- to library objects


def bnb_config(recipe: Recipe):
    if not recipe.quant.four_bit:
        return None
    from cai.models import bnb_config as nf4

    return nf4(recipe.quant.compute_dtype, recipe.quant.double_quant)


def lora_config(recipe: Recipe, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(**recipe.lora.model_dump(), task_type=task_type,
                      modules_to_save=["score"] if task_type == "SEQ_CLS" else None)


def _common(recipe: Recipe, stage: Stage, output_dir: Path) -> dict:
    import torch

    return dict(
        **stage.model_dump(exclude=OURS), output_dir=str(output_dir),
        per_device_eval_batch_size=stage.per_device_train_batch_size, save_strategy="steps",
        save_total_limit=2, data_seed=stage.seed, report_to="none", bf16=recipe.bf16 and torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(), gradient_checkpointing=recipe.gradient_checkpointing,
        dataloader_num_workers=0, disable_tqdm=True, save_only_model=False, remove_unused_columns=True,
    )


def sft_config(recipe: Recipe, output_dir: Path):
    from trl import SFTConfig

    return SFTConfig(**_common(recipe, recipe.sft, output_dir), completion_only_loss=True, packing=False)


def reward_config(recipe: Recipe, output_dir: Path):
    from trl import RewardConfig

    return RewardConfig(**_common(recipe, recipe.reward, output_dir))


def dpo_config(recipe: Recipe, output_dir: Path):
    from trl import DPOConfig

    return DPOConfig(**_common(recipe, recipe.dpo, output_dir))
