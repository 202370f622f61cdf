"""Training stages on the tiny random model: real TRL trainers, 4-bit NF4 base + LoRA."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai import store
from cai.errors import InputError
from cai.train import common, dpo, recipe as R, reward, sft

REPO = Path(__file__).resolve().parents[1]


def _card(base, kind="x", data=None):
    return common.card_base(kind=kind, base_model=str(base), round_id="r-test", parent="r-parent", constitution_hash="sha256:abc",
                            recipe=R.load("cpu-tiny"), datasets=data or {}, base_path=str(base))


def _sft_rows(n=8):
    return [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}, plainly."}],
             "prompt_id": f"p{i}", "provenance": {"round": "r", "principles": ["harm"]}} for i in range(n)]


def _pref_rows(n=12):
    return [{"prompt": [{"role": "user", "content": f"Help me with task {i}?"}],
             "chosen": [{"role": "assistant", "content": "Sure, here is a clear and kind answer."}],
             "rejected": [{"role": "assistant", "content": "No. Go away."}],
             "p_chosen": 0.8, "label_margin": 0.6, "valid": True, "prompt_id": f"p{i}",
             "principles": [{"principle": "harm", "p_first_order0": 0.8, "p_first_order1": 0.7}],
             "provenance": {"round": "r", "judge": "j"}} for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    store.write_jsonl(d / "sft.jsonl", _sft_rows())
    store.write_jsonl(d / "preferences.jsonl", _pref_rows())
    return d


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "adapter"
    assert sft.train(str(tiny_model_dir), data / "sft.jsonl", out, out.parent / "ck", R.load("cpu-tiny"),
                     _card(tiny_model_dir, "SFT policy", {"sft.jsonl": data / "sft.jsonl"}))
    return out


def _lora_b_norm(adapter: Path) -> float:
    from safetensors.torch import load_file

    w = load_file(str(adapter / "adapter_model.safetensors"))
    return sum(float(v.float().norm()) for k, v in w.items() if "lora_B" in k)


def test_recipes_load_and_bad_keys_name_the_line(tmp_path):
    assert R.load("cpu-tiny").quant.four_bit and R.load("gpu-8b").quant.compute_dtype == "bfloat16"
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nsft:\n  learning_rate: 1e-4\n  epocs: 2\n")
    with pytest.raises(InputError, match=r"r.yaml:4:3: sft.epocs: unknown key 'epocs'"):
        R.load(bad)
    with pytest.raises(InputError, match="no such recipe"):
        R.load("nope")


def test_sft_trains_saves_and_loads(sft_adapter, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    card = json.loads((sft_adapter / "cai.json").read_text())
    assert card["train"]["steps"] == 4 and card["train"]["first_loss"] is not None
    assert len(card["train"]["loss_history"]) == 4
    assert _lora_b_norm(sft_adapter) > 0  # LoRA B starts at zero: training changed it
    readme = (sft_adapter / "README.md").read_text()
    for needle in ("base_model:", "r-test", "r-parent", "sha256:abc", "sft.jsonl", "cpu-tiny"):
        assert needle in readme
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, sft_adapter)
    out = model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 6
    assert not list(sft_adapter.parent.glob(".adapter.*.tmp"))  # no half adapter left behind


def test_reward_model_soft_labels_and_heldout_metrics(tiny_model_dir, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "reward"
    assert reward.train(str(tiny_model_dir), data / "preferences.jsonl", out, tmp_path / "ck", R.load("cpu-tiny"),
                        _card(tiny_model_dir, "reward model"))
    card = json.loads((out / "cai.json").read_text())
    m = card["metrics"]
    assert m["heldout_pairs"] >= 1 and 0 <= m["accuracy"] <= 1 and 0 <= m["ece"] <= 1
    assert "reward_length_correlation" in m and card["train"]["soft_labels"] is True
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    PeftModel.from_pretrained(base, out)


def test_soft_label_loss_is_the_trainers_compute_loss(tiny_model_dir, tmp_path):
    """SoftLabelRewardTrainer.compute_loss on a real batch: binary cross-entropy of the reward
    difference against p_chosen, and TRL's own loss when p_chosen is 1."""
    import torch
    import torch.nn.functional as F
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} | {"p_chosen": p} for r, p in zip(_pref_rows(4), (0.9, 0.6, 1.0, 0.7))]
    collator = reward.WithColumn(DataCollatorForPreference(pad_token_id=tok.pad_token_id), "p_chosen")
    args = R.reward_config(R.load("cpu-tiny"), tmp_path)
    trainer = reward._trainer_class()(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                                      data_collator=collator)
    batch = next(iter(trainer.get_train_dataloader()))
    p = batch["p_chosen"].clone()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        r = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    d = torch.chunk(r, 2)[0] - torch.chunk(r, 2)[1]
    assert loss.item() == pytest.approx((-(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))).mean().item(), rel=1e-5)
    hard = dict(batch) | {"p_chosen": torch.ones_like(p)}
    no_p = {k: v for k, v in batch.items() if k != "p_chosen"}
    assert trainer.compute_loss(trainer.model, hard).item() == pytest.approx(
        trainer.compute_loss(trainer.model, no_p).item(), rel=1e-5)  # TRL's -logsigmoid(r_c - r_r)


def test_heldout_metrics_math():
    rows = [{"chosen": [{"content": "x" * 10}], "rejected": [{"content": "y" * 2}], "p_chosen": 0.9}] * 2
    m = reward.heldout_metrics([(2.0, 0.0), (0.0, 1.0)], rows)
    assert m["accuracy"] == 0.5 and m["heldout_pairs"] == 2
    assert m["reward_length_correlation"] == pytest.approx(0.3015, abs=1e-3)


@pytest.mark.parametrize("weighted", [False, True])
def test_dpo_from_sft_adapter(tiny_model_dir, data, sft_adapter, tmp_path, weighted):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rec = R.load("cpu-tiny")
    rec = rec.model_copy(update={"dpo": rec.dpo.model_copy(update={"weight_by_confidence": weighted, "max_steps": 2})})
    out = tmp_path / "policy"
    assert dpo.train(str(tiny_model_dir), data / "preferences.jsonl", out, tmp_path / "ck", rec,
                     _card(tiny_model_dir, "DPO policy"), sft_adapter=str(sft_adapter))
    card = json.loads((out / "cai.json").read_text())
    assert card["train"]["reference"] == "sft adapter" and card["train"]["weight_by_confidence"] is weighted
    assert card["train"]["first_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0
    assert not (out / "ref").exists()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)


def test_too_small_dataset_is_refused_before_training(tiny_model_dir, tmp_path):
    store.write_jsonl(tmp_path / "sft.jsonl", _sft_rows(1))
    with pytest.raises(InputError, match=r"sft.jsonl: 1 usable rows for SFT, the recipe needs at least 2"):
        sft.train(str(tiny_model_dir), tmp_path / "sft.jsonl", tmp_path / "a", tmp_path / "ck", R.load("cpu-tiny"), _card(tiny_model_dir))
    assert not (tmp_path / "a").exists() and not (tmp_path / "ck").exists()


def test_adapter_on_wrong_base_is_refused(tiny_model_dir, sft_adapter, embedded_dir, data, tmp_path):
    with pytest.raises(InputError, match="hidden size 64"):
        dpo.train(str(embedded_dir), data / "preferences.jsonl", tmp_path / "p", tmp_path / "ck", R.load("cpu-tiny"),
                  _card(embedded_dir), sft_adapter=str(sft_adapter))


def test_four_bit_unavailable_is_refused(monkeypatch, tiny_model_dir, data, tmp_path):
    from cai import models

    # a fault we cannot cause here (bitsandbytes works on this CPU): pretend it cannot import
    monkeypatch.setattr(models, "four_bit_available", lambda: "bitsandbytes cannot be imported (test)")
    with pytest.raises(InputError, match="quant.four_bit is on but bitsandbytes cannot be imported"):
        sft.train(str(tiny_model_dir), data / "sft.jsonl", tmp_path / "a", tmp_path / "ck", R.load("cpu-tiny"), _card(tiny_model_dir))


RESUME_SCRIPT = """
import sys
from pathlib import Path
from cai.train import recipe as R, sft, common
base, data, out = sys.argv[1:4]
rec = R.load("cpu-tiny")
rec = rec.model_copy(update={"sft": rec.sft.model_copy(update={"max_steps": 8, "save_steps": 2, "per_device_train_batch_size": 1})})
card = common.card_base(kind="SFT", base_model=base, round_id="r", parent=None, constitution_hash=None, recipe=rec, datasets={})
sft.train(base, Path(data), Path(out) / "adapter", Path(out) / "ck", rec, card)
"""


def test_killed_training_resumes_from_last_complete_checkpoint(tiny_model_dir, data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", RESUME_SCRIPT, str(tiny_model_dir), str(data / "sft.jsonl"), str(tmp_path)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "ck").glob("checkpoint-*/" + common.COMPLETE)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "adapter").exists()  # never a half adapter in place
    done = common.last_complete_checkpoint(tmp_path / "ck")
    assert done is not None
    step = int(done.rsplit("-", 1)[1])
    assert step < 8
    r = subprocess.run(args, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    card = json.loads((tmp_path / "adapter" / "cai.json").read_text())
    assert card["train"]["resumed_from"].endswith(f"checkpoint-{step}")
    assert card["train"]["steps"] == 8
    assert len(card["train"]["loss_history"]) == 8  # the checkpoint's log history, then the steps after it


def test_pulled_datasets_train_with_trl_as_they_are(tiny_model_dir, data, tmp_path):
    """The contract: datasets/*.jsonl load with load_dataset("json") and train with TRL's trainers unchanged."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    common_args = dict(max_steps=1, per_device_train_batch_size=2, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    lora = LoraConfig(r=4, target_modules="all-linear")
    sft_ds = datasets.load_dataset("json", data_files=str(data / "sft.jsonl"), split="train")
    SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=SFTConfig(output_dir=str(tmp_path / "s"), **common_args),
               train_dataset=sft_ds, processing_class=tok, peft_config=lora).train()
    pref = datasets.load_dataset("json", data_files=str(data / "preferences.jsonl"), split="train")
    DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=DPOConfig(output_dir=str(tmp_path / "d"), **common_args),
               train_dataset=pref, processing_class=tok, peft_config=lora).train()
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    RewardTrainer(model=rm, args=RewardConfig(output_dir=str(tmp_path / "r"), **common_args), train_dataset=pref,
                  processing_class=tok, peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS")).train()
