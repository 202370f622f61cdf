"""What the TRL trainers don't do for us: load a base for QLoRA, refuse datasets that are
too small, checkpoint completion markers and resume, commit a whole adapter folder
atomically, and the model card. Knows nothing about stages' losses."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from cai import store
from cai.errors import InputError
from cai.train.recipe import Recipe, bnb_config

COMPLETE = "cai-complete"


def check_rows(n: int, minimum: int, what: str, path: Path) -> None:
    if n < minimum:
        raise InputError(f"{path}: {n} usable rows for {what}, the recipe needs at least {minimum}; "
                         "add prompts or lower min_rows in the recipe")


def check_four_bit(recipe: Recipe) -> None:
    if recipe.quant.four_bit:
        from cai.models import four_bit_available

        why = four_bit_available()
        if why:
            raise InputError(f"recipe {recipe.name}: quant.four_bit is on but {why}")


def check_adapter_base(adapter: Path, base_path: str) -> None:
    """Refuse an adapter trained on another base (compare the saved base and shapes)."""
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.exists():
        raise InputError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
    want = json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    base_cfg = json.loads((Path(base_path) / "config.json").read_text()) if (Path(base_path) / "config.json").exists() else {}
    card = adapter / "cai.json"
    if card.exists():
        meta = json.loads(card.read_text())
        if meta.get("base_hidden_size") and base_cfg.get("hidden_size") and meta["base_hidden_size"] != base_cfg["hidden_size"]:
            raise InputError(f"{adapter}: adapter was trained on {meta.get('base_model')} (hidden size "
                             f"{meta['base_hidden_size']}), not on {base_path} (hidden size {base_cfg['hidden_size']})")
    elif want and Path(want).exists() and Path(want).resolve() != Path(base_path).resolve():
        raise InputError(f"{adapter}: adapter's base is {want}, not {base_path}")


def load_base(base_path: str, recipe: Recipe, *, seq_cls: bool = False):
    """The base model for QLoRA (4-bit NF4 when the recipe says) and its tokenizer."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from cai.models import load_tokenizer, placement

    check_four_bit(recipe)
    tok = load_tokenizer(base_path, padding_side=None)  # TRL's collators pad
    q = bnb_config(recipe)
    kwargs: dict = placement(bf16=recipe.bf16)
    if q is not None:
        kwargs["quantization_config"] = q
    if seq_cls:
        model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, **kwargs)
        model.config.pad_token_id = tok.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    if q is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing)
    return model, tok


def start_from(model, recipe: Recipe, adapter: str | None, task_type: str = "CAUSAL_LM"):
    """(model, peft_config) for a trainer: a fresh LoRA from the recipe, or, when an adapter
    is given (a parent's policy, the SFT policy), that adapter loaded trainable."""
    from peft import PeftModel

    from cai.train.recipe import lora_config

    if adapter:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True), None
    return model, lora_config(recipe, task_type)


def keeping_column(trainer_cls, column: str):
    """A subclass of a TRL trainer that keeps one extra dataset column for its loss (the
    Trainer drops columns its model's forward doesn't name)."""

    class Keeping(trainer_cls):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    return Keeping


def marker_callback(guard: Callable[[], bool] = lambda: True):
    """A TrainerCallback that marks a checkpoint complete once the Trainer has written it,
    and stops training at that save when `guard` says this run may no longer commit (its
    lease was lost): the newer holder resumes from the checkpoint instead."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                store.write_text(ckpt / COMPLETE, f"{state.global_step}\n")
            if not guard():
                control.should_training_stop = True

    return MarkComplete()


def last_complete_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest checkpoint folder with a completion marker; half-written ones are ignored."""
    if not ckpt_dir.exists():
        return None
    done = [p for p in ckpt_dir.glob("checkpoint-*") if (p / COMPLETE).exists()]
    if not done:
        return None
    return str(max(done, key=lambda p: int(p.name.split("-")[1])))


def commit_adapter(model, tok, target: Path, card: dict) -> bool:
    """Save the adapter + model card to a temp folder beside target, then rename into place."""
    tmp = store.tmp_dir_beside(target)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "base_model.txt").write_text(card["base_model"] + "\n")
        store.write_json(tmp / "cai.json", card)
        (tmp / "README.md").write_text(model_card(card))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return store.commit_dir(tmp, target)


def model_card(card: dict) -> str:
    lines = [
        "---", "library_name: peft", f"base_model: {card['base_model']}", "tags: [cai, constitutional-ai, lora, qlora]", "---", "",
        f"# {card['kind']} adapter — round {card['round']}", "",
        f"Made by `cai` ({card.get('created_iso', '')}). Load with:", "",
        "```python",
        "from peft import PeftModel",
        f"model = PeftModel.from_pretrained(base_model, '<this folder>')  # base: {card['base_model']}",
        "```", "",
        "| field | value |", "|---|---|",
        f"| base model | `{card['base_model']}` |",
        f"| round | `{card['round']}` |",
        f"| parent round | `{card.get('parent_round')}` |",
        f"| constitution hash | `{card.get('constitution_hash')}` |",
        f"| recipe | `{card.get('recipe', {}).get('name')}` |",
        f"| started from | `{card.get('init_adapter')}` |",
    ]
    for name, h in card.get("datasets", {}).items():
        lines.append(f"| dataset `{name}` | `{h}` |")
    lines += ["", "## Held-out metrics", "", "```json", json.dumps(card.get("metrics", {}), indent=2), "```", "",
              "## Training", "", "```json", json.dumps(card.get("train", {}), indent=2), "```", "",
              "## Recipe", "", "```json", json.dumps(card.get("recipe", {}), indent=2), "```", ""]
    return "\n".join(lines)


def card_base(*, kind: str, base_model: str, round_id: str, parent: str | None, constitution_hash: str | None,
              recipe: Recipe, datasets: dict[str, Path], init_adapter: str | None = None, base_path: str | None = None) -> dict:
    hidden = None
    if base_path and (Path(base_path) / "config.json").exists():
        hidden = json.loads((Path(base_path) / "config.json").read_text()).get("hidden_size")
    return {
        "kind": kind, "base_model": base_model, "base_hidden_size": hidden, "round": round_id, "parent_round": parent,
        "constitution_hash": constitution_hash, "recipe": recipe.model_dump(mode="json"), "init_adapter": init_adapter,
        "datasets": {name: store.file_hash(p) for name, p in datasets.items()},
        "created": time.time(), "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def train_summary(trainer) -> dict:
    logs = [x for x in trainer.state.log_history if "loss" in x]
    return {"steps": trainer.state.global_step, "first_loss": logs[0]["loss"] if logs else None,
            "last_loss": logs[-1]["loss"] if logs else None, "loss_history": [round(x["loss"], 5) for x in logs]}
