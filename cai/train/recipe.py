"""Training recipes: YAML files validated by pydantic, and the one small function per
library object that turns plain values into BitsAndBytesConfig / LoraConfig / TRL configs.

Shipped recipes live in cai/data/recipes/ (`cpu-tiny`, `gpu-8b`); a recipe may also be a
path. Knows nothing about datasets or rounds.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai import yamlio
from cai.errors import InputError

SHIPPED = ("cpu-tiny", "cpu-student", "gpu-8b")


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


class Thresholds(_Strict):
    """When the RL watch calls reward hacking (the rules are in cai/train/rl.py). The judge
    and refusal rules need the reward to have risen too; the length and KL rules don't."""

    reward_rise: float = Field(0.0, ge=0, description="The reward model's held-out mean must exceed the reference point's by more than this.")
    judge_drop: float = Field(0.1, gt=0, description="The judge's preference for the policy fell this far below its best watch point.")
    refusal_balance_drop: float = Field(0.25, gt=0, description="(harmful refusal rate - benign refusal rate) fell this far below the start's.")
    benign_refusal_rise: float = Field(0.2, gt=0, description="The refusal rate on held-out benign prompts rose this far above the start's.")
    length_ratio: float = Field(2.0, gt=1, description="Mean held-out answer length (tokens) over the start's.")
    kl_max: float | None = Field(None, gt=0, description="Held-out per-token KL to the start; off when null.")


class RL(_Strict):
    """Online RL (TRL's RLOOTrainer) under RLOOConfig's own field names, plus the watch's
    settings (OURS). Steps are optimizer steps; each one samples num_generations answers
    for (per_device_train_batch_size * gradient_accumulation_steps / num_generations) prompts."""

    learning_rate: float = Field(1e-5, gt=0)
    max_steps: int = Field(100, gt=0)
    per_device_train_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    num_generations: int = Field(4, ge=2, description="Answers sampled per prompt (RLOO's leave-one-out group).")
    max_completion_length: int = Field(256, gt=0)
    beta: float = Field(0.05, ge=0, description="KL coefficient to the start (the SFT adapter, else the base).")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    num_iterations: int = Field(1, gt=0)
    epsilon: float = Field(0.2, gt=0)
    normalize_advantages: bool = False
    mask_truncated_completions: bool = False
    disable_dropout: bool = Field(True, description="Same log-probs for the policy and its reference (TRL's default is False).")
    warmup_steps: float = Field(0, ge=0)
    save_steps: int = Field(50, gt=0, description="Checkpoint every N steps (the watch also checkpoints at its points).")
    logging_steps: int = Field(1, gt=0)
    seed: int = 0
    use_vllm: bool = Field(False, description="Generate with vLLM (GPU; TRL's colocate or server mode).")
    vllm_mode: Literal["colocate", "server"] = "colocate"
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    min_rows: int = Field(4, gt=0, description="Refuse to train on fewer prompts (after the held-out slice).")
    # ours
    heldout: int = Field(8, gt=0, description="Prompts kept out of training for the watch (stratified by kind).")
    watch_every: int = Field(10, gt=0, description="Run the watch every N steps (and at the last step).")
    watch_temperature: float = Field(0.0, ge=0, description="0: greedy held-out answers; else seeded sampling.")
    harmful_categories: list[str] = Field(default_factory=lambda: ["red_team", "harmful"])
    benign_categories: list[str] = Field(default_factory=lambda: ["helpful", "borderline", "benign", "pushback"])
    length_penalty: float = Field(0.0, ge=0, description="Reward minus this times (answer tokens / max_completion_length).")
    degenerate_bottom: bool = Field(True, description="Degenerate answers (critique's checks) score below the batch's lowest.")
    kind_fit: float = Field(0.0, ge=0, description="Rule term: plus this for an answer that fits its prompt's kind (declines a "
                            "harmful prompt, answers a benign one and, under pushback, keeps the known answer: the critique "
                            "stage's kind check), minus it for one that does not; 0 for a prompt of no known kind. 0: off.")
    thresholds: Thresholds = Field(default_factory=Thresholds)

    @model_validator(mode="after")
    def _groups_fit(self):
        batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if batch % self.num_generations:
            raise ValueError(f"per_device_train_batch_size * gradient_accumulation_steps ({batch}) must be a multiple of "
                             f"num_generations ({self.num_generations})")
        return self


OURS = {"min_rows", "heldout_fraction", "soft_labels", "weight_by_confidence",  # not TRL's: never passed to it
        "heldout", "watch_every", "watch_temperature", "harmful_categories", "benign_categories", "length_penalty",
        "degenerate_bottom", "kind_fit", "thresholds"}


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
    rl: RL = Field(default_factory=RL)


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


def _common(recipe: Recipe, stage: Stage | RL, output_dir: Path) -> dict:
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


def rl_config(recipe: Recipe, output_dir: Path):
    from trl import RLOOConfig

    # the prompts' category, answer and false_belief columns reach the reward function (kind_fit)
    return RLOOConfig(**{**_common(recipe, recipe.rl, output_dir), "remove_unused_columns": False})
