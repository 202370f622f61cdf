"""The train-rl stage in a round: label -> train-rm -> train-rl on the tiny model, through the
stage table (rows: its roles, its start adapter, evaluate comparing it, next round's policy)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import TEST_RECIPE

PAIRS = Path(__file__).parent / "data" / "signal_pairs.jsonl"


def test_a_round_with_train_rl_trains_against_its_reward_model(tmp_path, tiny_model_dir):
    from cai import rounds, stages
    from cai.config import RoundConfig
    from cai.feedback import LabelSettings

    cfg = RoundConfig(pairs_file=str(PAIRS), model=str(tiny_model_dir), stages=["label", "train-rm", "train-rl"],
                      recipe=str(TEST_RECIPE), label=LabelSettings(skip_check=True, min_margin=0, min_mass=0, principles_per_pair=1))
    rd = tmp_path / "round"
    rounds.prepare(rd, cfg)
    rounds.run_in_process(rd)
    card = json.loads((rd / "adapters" / "rl" / "cai.json").read_text())
    assert card["kind"] == "RL policy" and card["train"]["trainer"] == "RLOOTrainer"
    assert card["watch"]["curves"] and "reward" in card["watch"]["curves"][0]
    assert card["watch"]["kept_why"] == "the latest watch point before any flag"  # the tiny judge fails its self-check
    man = json.loads((rd / "manifest.json").read_text())
    assert man["finished"] and man["training"]["rl"]["watch"]["curves"]
    assert stages.next_policy(rd, cfg.stages) == "adapters/rl"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(rd / "adapters" / "rl"))
