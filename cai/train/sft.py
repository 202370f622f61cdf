"""Stage 3: QLoRA SFT on the revised answers (loss on the assistant turn only) with TRL's
SFTTrainer. Rows are turned into TRL's conversational prompt/completion form, for which
SFTTrainer computes the loss on the completion only. Knows nothing about rounds."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from cai import store
from cai.train import common
from cai.train.recipe import Recipe, sft_config


def to_prompt_completion(rows: list[dict]) -> list[dict]:
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows
            if r["messages"] and r["messages"][-1]["role"] == "assistant"]


def train(base_path: str, data: Path, target: Path, ckpt_dir: Path, recipe: Recipe, card: dict,
          init_adapter: str | None = None, guard: Callable[[], bool] = lambda: True) -> bool:
    """Train and commit an SFT adapter at target; resumes from ckpt_dir's last complete checkpoint."""
    from datasets import Dataset
    from trl import SFTTrainer

    rows = to_prompt_completion(store.read_jsonl(data))
    common.check_rows(len(rows), recipe.sft.min_rows, "SFT", data)
    if init_adapter:
        common.check_adapter_base(Path(init_adapter), base_path)
    started = time.time()
    model, tok = common.load_base(base_path, recipe)
    model, peft_config = common.start_from(model, recipe, init_adapter)  # a child round: the parent's policy
    trainer = SFTTrainer(model=model, args=sft_config(recipe, ckpt_dir), train_dataset=Dataset.from_list(rows),
                         processing_class=tok, peft_config=peft_config, callbacks=[common.marker_callback(guard)])
    resume = common.last_complete_checkpoint(ckpt_dir)
    trainer.train(resume_from_checkpoint=resume)
    card["train"] = {**common.train_summary(trainer), "rows": len(rows), "resumed_from": resume,
                     "seconds": round(time.time() - started, 2)}
    card["metrics"] = {"train_loss_first": card["train"]["first_loss"], "train_loss_last": card["train"]["last_loss"]}
    if not guard():
        return False
    return common.commit_adapter(trainer.model, tok, target, card)
