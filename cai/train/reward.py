"""Stage 6: a QLoRA reward model (sequence-classification head) on the AI labels, with
TRL's RewardTrainer. With soft labels the loss targets p_chosen (binary cross-entropy on
the reward difference) instead of treating every pair as certain. A held-out split
reports accuracy, calibration against the judge's soft labels, and the correlation of
the reward with response length (an early reward-hacking signal). Knows nothing about rounds."""

from __future__ import annotations

import hashlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cai import store
from cai.train import common
from cai.train.recipe import Recipe, lora_config, reward_config


def split(rows: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """Deterministic held-out split by prompt id (the same prompt never lands on both sides)."""
    def bucket(r: dict) -> float:
        return int(hashlib.sha256(r["prompt_id"].encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    held = [r for r in rows if bucket(r) < fraction]
    train = [r for r in rows if bucket(r) >= fraction]
    if fraction > 0 and not held and len(train) > 1:
        held, train = train[-1:], train[:-1]
    if not train and held:  # never hold out everything: with one row, it trains (and nothing is held out)
        train, held = held[:1], held[1:]
    return train, held


def _trainer_class():
    import torch
    import torch.nn.functional as F
    from trl import RewardTrainer

    class SoftLabelRewardTrainer(common.keeping_column(RewardTrainer, "p_chosen")):
        """RewardTrainer whose loss targets the AI label's probability p_chosen."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            p = inputs.pop("p_chosen", None)
            if p is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            r_c, r_r = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            d = r_c - r_r
            p = p.to(d.dtype)
            loss = -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d)).mean()
            mode = "train" if self.model.training else "eval"
            with torch.no_grad():
                self._metrics[mode]["accuracy"].append((d > 0).float().mean().item())
                self._metrics[mode]["margin"].append(d.mean().item())
            return (loss, outputs) if return_outputs else loss

    return SoftLabelRewardTrainer


@dataclass
class WithColumn:
    """Collator wrapper that carries one float column past TRL's preference collator."""

    base: Any
    column: str

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        vals = torch.tensor([float(e[self.column]) for e in examples])
        out = self.base([{k: v for k, v in e.items() if k != self.column} for e in examples])
        out[self.column] = vals
        return out


def score(model, tok, rows: list[dict], batch_size: int = 8) -> list[tuple[float, float]]:
    """(reward(chosen), reward(rejected)) for each row, in eval mode."""
    import torch

    texts = []
    for r in rows:
        for side in ("chosen", "rejected"):
            texts.append(tok.apply_chat_template(r["prompt"] + r[side], tokenize=False))
    out: list[float] = []
    model.eval()
    device = next(model.parameters()).device
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        with torch.inference_mode():
            out += model(**{k: v.to(device) for k, v in enc.items()}).logits.squeeze(-1).float().tolist()
    return [(out[2 * j], out[2 * j + 1]) for j in range(len(rows))]


def heldout_metrics(pairs: list[tuple[float, float]], rows: list[dict]) -> dict:
    import math

    if not rows:
        return {"heldout_pairs": 0}
    diffs = [c - r for c, r in pairs]
    probs = [1 / (1 + math.exp(-d)) for d in diffs]
    soft = [float(r.get("p_chosen", 1.0)) for r in rows]
    # expected calibration error of sigmoid(diff) as P(chosen better) vs the hard label, 5 bins by confidence
    conf = [max(p, 1 - p) for p in probs]
    right = [p > 0.5 for p in probs]
    ece = 0.0
    for lo in (0.5, 0.6, 0.7, 0.8, 0.9):
        idx = [i for i, c in enumerate(conf) if lo <= c < lo + 0.1 or (lo == 0.9 and c >= 1.0)]
        if idx:
            ece += len(idx) / len(conf) * abs(sum(right[i] for i in idx) / len(idx) - sum(conf[i] for i in idx) / len(idx))
    rewards = [x for pair in pairs for x in pair]
    lengths = [len(r[side][0]["content"]) for r in rows for side in ("chosen", "rejected")]
    try:
        length_corr = statistics.correlation(rewards, lengths)
    except statistics.StatisticsError:
        length_corr = None
    return {
        "heldout_pairs": len(rows),
        "accuracy": sum(d > 0 for d in diffs) / len(diffs),
        "ece": round(ece, 4),
        "mean_abs_error_vs_soft_label": round(sum(abs(p - s) for p, s in zip(probs, soft)) / len(soft), 4),
        "brier_vs_hard_label": round(sum((1 - p) ** 2 for p in probs) / len(probs), 4),
        "mean_reward_margin": round(sum(diffs) / len(diffs), 4),
        "reward_length_correlation": None if length_corr is None else round(length_corr, 4),
    }


def train(base_path: str, data: Path, target: Path, ckpt_dir: Path, recipe: Recipe, card: dict,
          guard: Callable[[], bool] = lambda: True) -> bool:
    from datasets import Dataset
    from trl.trainer.reward_trainer import DataCollatorForPreference

    rows = [r for r in store.read_jsonl(data) if r.get("valid", True)]
    train_rows, held = split(rows, recipe.reward.heldout_fraction)
    common.check_rows(len(train_rows), recipe.reward.min_rows, "the reward model (after the held-out split)", data)
    started = time.time()
    model, tok = common.load_base(base_path, recipe, seq_cls=True)
    cols = ["prompt", "chosen", "rejected"] + (["p_chosen"] if recipe.reward.soft_labels else [])
    ds = Dataset.from_list([{k: r[k] for k in cols} for r in train_rows])
    collator = DataCollatorForPreference(pad_token_id=tok.pad_token_id)
    if recipe.reward.soft_labels:
        collator = WithColumn(collator, "p_chosen")
    trainer = _trainer_class()(model=model, args=reward_config(recipe, ckpt_dir), train_dataset=ds, processing_class=tok,
                               peft_config=lora_config(recipe, "SEQ_CLS"), data_collator=collator,
                               callbacks=[common.marker_callback(guard)])
    # TRL casts trainable QLoRA params to bf16; the plain `score` head must match the hidden states' dtype
    compute = getattr(__import__("torch"), recipe.quant.compute_dtype)
    for name, param in trainer.model.named_parameters():
        if param.requires_grad and ".score." in f".{name}":
            param.data = param.data.to(compute)
    resume = common.last_complete_checkpoint(ckpt_dir)
    trainer.train(resume_from_checkpoint=resume)
    metrics = heldout_metrics(score(trainer.model, tok, held), held)
    card["train"] = {**common.train_summary(trainer), "rows": len(train_rows), "resumed_from": resume,
                     "soft_labels": recipe.reward.soft_labels, "seconds": round(time.time() - started, 2)}
    card["metrics"] = metrics
    if not guard():
        return False
    return common.commit_adapter(trainer.model, tok, target, card)
