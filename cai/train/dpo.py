"""Stage 7: DPO on the AI labels with TRL's DPOTrainer, starting from the SFT adapter.

When an SFT adapter is given, it is loaded as the trainable policy ("default") on the
4-bit base and TRL copies it into a frozen "ref" adapter for the reference, so the KL
anchor is the SFT policy, not the raw base. With `weight_by_confidence`, each pair's
loss is weighted by its label margin. Knows nothing about rounds."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from cai import store
from cai.train import common
from cai.train.recipe import Recipe, dpo_config
from cai.train.reward import WithColumn


def _weighted_trainer():
    import torch
    from trl import DPOTrainer

    class ConfidenceWeightedDPOTrainer(common.keeping_column(DPOTrainer, "weight")):
        """Per-pair weights: the batch's loss is the weight-averaged per-pair DPO loss."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            w = inputs.pop("weight")
            b = w.shape[0]
            losses = []
            for i in range(b):  # TRL averages inside; split the batch to weight each pair
                sub = {k: (v[[i, b + i]] if v.shape[0] == 2 * b else v[i : i + 1]) if torch.is_tensor(v) else v
                       for k, v in inputs.items()}
                losses.append(super().compute_loss(model, sub))
            w = w.to(losses[0].dtype)
            loss = (torch.stack(losses) * w).sum() / w.sum().clamp_min(1e-6)
            return (loss, None) if return_outputs else loss

    return ConfidenceWeightedDPOTrainer


def train(base_path: str, data: Path, target: Path, ckpt_dir: Path, recipe: Recipe, card: dict,
          sft_adapter: str | None = None, guard: Callable[[], bool] = lambda: True) -> bool:
    from datasets import Dataset
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = [r for r in store.read_jsonl(data) if r.get("valid", True)]
    common.check_rows(len(rows), recipe.dpo.min_rows, "DPO", data)
    if sft_adapter:
        common.check_adapter_base(Path(sft_adapter), base_path)
    started = time.time()
    model, tok = common.load_base(base_path, recipe)
    # TRL copies a pretrained "default" adapter into a frozen "ref" adapter for the reference
    model, peft_config = common.start_from(model, recipe, sft_adapter)
    weighted = recipe.dpo.weight_by_confidence
    ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                             **({"weight": float(r.get("label_margin", 1.0))} if weighted else {})} for r in rows])
    kwargs = {}
    if weighted:
        kwargs["data_collator"] = WithColumn(DataCollatorForPreference(pad_token_id=tok.pad_token_id), "weight")
    cls = _weighted_trainer() if weighted else DPOTrainer
    trainer = cls(model=model, args=dpo_config(recipe, ckpt_dir), train_dataset=ds, processing_class=tok,
                  peft_config=peft_config, callbacks=[common.marker_callback(guard)], **kwargs)
    resume = common.last_complete_checkpoint(ckpt_dir)
    trainer.train(resume_from_checkpoint=resume)
    card["train"] = {**common.train_summary(trainer), "rows": len(rows), "resumed_from": resume,
                     "weight_by_confidence": weighted, "reference": "sft adapter" if sft_adapter else "base",
                     "seconds": round(time.time() - started, 2)}
    rewards = [x for x in trainer.state.log_history if "rewards/accuracies" in x]
    card["metrics"] = {"train_reward_accuracy_last": rewards[-1]["rewards/accuracies"] if rewards else None,
                       "train_loss_first": card["train"]["first_loss"], "train_loss_last": card["train"]["last_loss"]}
    if not guard():
        return False
    final = trainer.model
    if "ref" in getattr(final, "peft_config", {}):
        final.delete_adapter("ref")
    return common.commit_adapter(final, tok, target, card)
