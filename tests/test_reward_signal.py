"""On the embedded model: a 4-bit + LoRA reward model trained on a small, clearly separable
set of hand-written pairs (helpful and polite vs rude and dismissive). Prints the held-out
accuracy and asserts it beats chance (seeded, deterministic on CPU; measured 8/8)."""

import json
from pathlib import Path

import pytest

from cai.train import common, recipe as R, reward

DATA = Path(__file__).parent / "data" / "separable_prefs.jsonl"


@pytest.mark.e2e
def test_reward_model_learns_separable_pairs(embedded_dir, tmp_path):
    rec = R.load("cpu-tiny")
    rec = rec.model_copy(update={"reward": rec.reward.model_copy(update={
        "max_steps": 8, "per_device_train_batch_size": 4, "learning_rate": 5e-4, "heldout_fraction": 0.25, "save_steps": 100})})
    card = common.card_base(kind="reward model", base_model="smollm2-135m", round_id="signal", parent=None,
                            constitution_hash=None, recipe=rec, datasets={"separable": DATA}, base_path=str(embedded_dir))
    out = tmp_path / "rm"
    assert reward.train(str(embedded_dir), DATA, out, tmp_path / "ck", rec, card)
    m = json.loads((out / "cai.json").read_text())["metrics"]
    print("\nREWARD SIGNAL:", json.dumps(m))
    assert m["heldout_pairs"] >= 5
    assert m["accuracy"] > 0.5
