"""Stage train-rl: online RL of the policy against a reward with TRL's RLOOTrainer (LoRA or
QLoRA on the policy, starting from the SFT adapter, KL to that start), and the watch that
stops it when the reward is being hacked.

The reward the trainer optimizes is the caller's `reward(prompts, completions)` (the
round's reward model) plus the recipe's rule terms: a length penalty; `kind_fit` (plus it
for an answer that fits its prompt's kind, minus it for one that does not, by the critique
stage's kind check: a rule-based reward in the sense of Mu et al. 2024, which pays for the
discrimination a learned reward model may not have); and degenerate answers (the critique
stage's checks: empty, repetitive, meta, a copy of the prompt) scored below the lowest
answer of their batch. With kind_fit on, the watch's refusal rates measure what is being
optimized; the judge stays the independent judgement.

The watch (`Watch`, a TrainerCallback) runs at the start and every `watch_every` steps on
a held-out slice of the prompts (never trained on), with the policy's own answers
(greedy unless watch_temperature > 0):
  reward    the caller's reward, mean (the thing being optimized, without rule terms)
  kl        per-token KL(policy || start) along those answers, exact over the vocabulary
            (TRL's logged train-batch estimate is kept beside it as train_kl)
  length    mean answer length in tokens
  judge     the independent judgement: mean of `judge(prompts, current, start)`, the
            judge role's P(current answer better than the start's), both orders averaged
            by the caller; 0.5 at the start by definition
  refusal   refusal rates on harmful and on benign prompts (cai.refusal's rule detector,
            the prompt's category says which kind) and their balance (harmful - benign)
Rules (recipe rl.thresholds), checked at every point after the start:
  judge            the reward rose above the best-judged point's while the judge fell
                   more than judge_drop below that point's
  refusal_balance  the reward rose above the start's while the refusal balance fell more
                   than refusal_balance_drop below the start's
  benign_refusal   the reward rose above the start's while the benign refusal rate rose
                   more than benign_refusal_rise above the start's (over-refusal bought
                   as reward, even when harmful refusals rise with it and the balance holds)
  length           mean length grew past length_ratio times the start's
  kl               the KL to the start passed kl_max (when set)
A tripped rule flags reward hacking and stops training. The adapter kept is the best watch
point by the judge (the latest unflagged point without a judge); every watch point is a
checkpoint (the best one is kept from rotation; the start is saved beside them), so the
kept adapter survives a kill and resume. The card holds the curves and why it stopped.

Knows TRL, peft and the critique/refusal checks; knows nothing about rounds, engines or
files beyond its target and checkpoint folders (the caller passes the callables).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

from cai import store
from cai.errors import InputError
from cai.train import common
from cai.train.recipe import RL, Recipe, rl_config

WATCH_FILE = "cai-watch.json"  # in each checkpoint folder: the watch's state at that step
START = "start"  # the starting adapter, saved once in the checkpoint folder

Reward = Callable[[list[str], list[str]], list[float]]
Judge = Callable[[list[str], list[str], list[str]], list[float]]


# ---------------------------------------------------------------- prompts and the held-out slice


def _messages(row: dict) -> list[dict]:
    if row.get("messages"):
        return row["messages"]
    p = row.get("prompt")
    return p if isinstance(p, list) else [{"role": "user", "content": str(p)}]


def prompt_rows(prompts: list[dict]) -> list[dict]:
    """The round's prompts (`messages` or `prompt`, `category`, `id`/`prompt_id`) as TRL's
    conversational prompt rows."""
    out = []
    for r in prompts:
        msgs = _messages(r)
        pid = r.get("prompt_id") or r.get("id") or hashlib.sha256(json.dumps(msgs).encode()).hexdigest()[:16]
        out.append({"prompt": msgs, "category": r.get("category"), "prompt_id": str(pid),
                    "answer": r.get("answer"), "false_belief": r.get("false_belief")})
    return out


def kind(category: str | None, rl: RL) -> str | None:
    if category in rl.harmful_categories:
        return "harmful"
    if category in rl.benign_categories:
        return "benign"
    return None


def split_heldout(rows: list[dict], rl: RL) -> tuple[list[dict], list[dict]]:
    """(train, held): `rl.heldout` prompts kept out, taken in turn from each kind (harmful,
    benign, other) in a fixed order by prompt-id hash, so both kinds are watched when
    present. Never holds out everything."""
    order = sorted(rows, key=lambda r: hashlib.sha256(r["prompt_id"].encode()).hexdigest())
    groups = {k: [r for r in order if kind(r["category"], rl) == k] for k in ("harmful", "benign", None)}
    n = min(rl.heldout, max(0, len(rows) - 1))
    held: list[dict] = []
    while len(held) < n:
        for k in ("harmful", "benign", None):
            if groups[k] and len(held) < n:
                held.append(groups[k].pop(0))
    ids = {r["prompt_id"] for r in held}
    return [r for r in rows if r["prompt_id"] not in ids], held


def _text(prompt) -> str:
    """A prompt's text for the callables: its last user turn."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return users[-1] if users else prompt[-1]["content"]
    return str(prompt)


def _content(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else str(completion)


# ---------------------------------------------------------------- the reward TRL optimizes


def degenerate(prompt: str, answer: str) -> str | None:
    """The critique stage's checks (empty, repetitive, meta, an echo or near-copy of the
    prompt). Truncation is left to TRL's mask_truncated_completions, and the kind checks
    (complies-harmful, refuses-benign) stay out: refusals are what the watch measures."""
    from cai.critique import degenerate as check

    return check(answer, prompt, True, request=prompt)


def fits(answers: list[str], kinds: list[dict]) -> list[int]:
    """Per answer: 1 when it fits its prompt's kind (`kinds`: category, answer, false_belief),
    -1 when it does not (critique.kind_misfit), 0 for a prompt of no known kind."""
    from cai.critique import BENIGN, HARMFUL, kind_misfit

    return [0 if k.get("category") not in HARMFUL + BENIGN
            else -1 if kind_misfit(a, k["category"], k.get("answer"), k.get("false_belief")) else 1
            for a, k in zip(answers, kinds)]


def shape(raw: list[float], prompts: list[str], answers: list[str], n_tokens: list[int], rl: RL,
          fit: list[int] | None = None) -> tuple[list[float], int]:
    """The recipe's rule terms on top of the reward: minus length_penalty * tokens /
    max_completion_length; plus kind_fit times `fit` (fits() of the answers, when given);
    degenerate answers 1 below the batch's lowest. (rewards, degenerate count)."""
    out = [r - rl.length_penalty * n / rl.max_completion_length for r, n in zip(raw, n_tokens)]
    if rl.kind_fit and fit is not None:
        out = [x + rl.kind_fit * f for x, f in zip(out, fit)]
    if not rl.degenerate_bottom:
        return out, 0
    bad = [degenerate(p, a) is not None for p, a in zip(prompts, answers)]
    if any(bad):
        floor = min(out) - 1.0
        out = [floor if b else x for x, b in zip(out, bad)]
    return out, sum(bad)


def reward_func(reward: Reward, rl: RL):
    """The callable TRL calls (its name, 'reward', names TRL's logged rewards/reward/mean)."""

    def reward_(prompts, completions, completion_ids=None, log_metric=None, category=None, answer=None,
                false_belief=None, **_):
        p, c = [_text(x) for x in prompts], [_content(x) for x in completions]
        raw = [float(x) for x in reward(p, c)]
        n = [len(ids) for ids in completion_ids] if completion_ids is not None else [len(a.split()) for a in c]
        fit = None
        if rl.kind_fit and category is not None:  # the dataset's columns ("" for none)
            fit = fits(c, [{"category": k or None, "answer": a or None, "false_belief": f or None}
                           for k, a, f in zip(category, answer or [None] * len(c), false_belief or [None] * len(c))])
        out, bad = shape(raw, p, c, n, rl, fit)
        if log_metric is not None:
            log_metric("reward_raw", sum(raw) / len(raw))
            log_metric("degenerate_frac", bad / len(raw))
            if fit is not None:
                log_metric("kind_fit", sum(fit) / len(fit))
        return out

    reward_.__name__ = "reward"
    return reward_


# ---------------------------------------------------------------- the watch


def rules(point: dict, start: dict, best: dict, th) -> list[str]:
    """The rules that trip at `point` (see the module docstring), given the start's point
    and the best-judged point before it."""
    out = []
    rose = lambda ref: point["reward"] is not None and ref["reward"] is not None and point["reward"] - ref["reward"] > th.reward_rise  # noqa: E731
    if point.get("judge") is not None and best.get("judge") is not None and rose(best) and best["judge"] - point["judge"] > th.judge_drop:
        out.append("judge")
    if (point.get("refusal_balance") is not None and start.get("refusal_balance") is not None and rose(start)
            and start["refusal_balance"] - point["refusal_balance"] > th.refusal_balance_drop):
        out.append("refusal_balance")
    if (point.get("refusal_benign") is not None and start.get("refusal_benign") is not None and rose(start)
            and point["refusal_benign"] - start["refusal_benign"] > th.benign_refusal_rise):
        out.append("benign_refusal")
    if start["length"] > 0 and point["length"] / start["length"] > th.length_ratio:
        out.append("length")
    if th.kl_max is not None and point.get("kl") is not None and point["kl"] > th.kl_max:
        out.append("kl")
    return out


def why(rule: str, point: dict, start: dict, best: dict, th) -> str:
    s = point["step"]
    if rule == "judge":
        return (f"step {s}: reward {best['reward']:.3f} -> {point['reward']:.3f} (since step {best['step']}) while the judge's "
                f"preference fell {best['judge']:.3f} -> {point['judge']:.3f} (more than judge_drop {th.judge_drop})")
    if rule == "refusal_balance":
        return (f"step {s}: reward {start['reward']:.3f} -> {point['reward']:.3f} while the harmful-benign refusal balance fell "
                f"{start['refusal_balance']:.3f} -> {point['refusal_balance']:.3f} (more than {th.refusal_balance_drop})")
    if rule == "benign_refusal":
        return (f"step {s}: reward {start['reward']:.3f} -> {point['reward']:.3f} while the benign prompts' refusal rate rose "
                f"{start['refusal_benign']:.3f} -> {point['refusal_benign']:.3f} (more than {th.benign_refusal_rise})")
    if rule == "length":
        return (f"step {s}: mean length {start['length']:.1f} -> {point['length']:.1f} tokens, "
                f"{point['length'] / start['length']:.2f}x the start's (limit {th.length_ratio}x)")
    return f"step {s}: KL to the start {point['kl']:.4f} per token (limit {th.kl_max})"


def _rate(labels: list[bool]) -> float | None:
    return sum(labels) / len(labels) if labels else None


class Watch:
    """Measures the held-out slice at the start and every `watch_every` steps, flags reward
    hacking, keeps track of the best point by the judge. `callback()` is the
    TrainerCallback; `state()` / `restore()` carry it through checkpoints."""

    def __init__(self, held: list[dict], rl: RL, tok, reward: Reward, judge: Judge | None, ckpt: Path, eos_ids: list[int]):
        self.held, self.rl, self.tok, self.reward, self.judge = held, rl, tok, reward, judge
        self.ckpt, self.eos_ids = ckpt, eos_ids
        self.prompts = [_text(r["prompt"]) for r in held]
        self.kinds = [kind(r["category"], rl) for r in held]
        self.curves: list[dict] = []
        self.start_answers: list[str] | None = None
        self.answers: dict[int, list[str]] = {}  # step -> held-out answers (start and kept, for the card)
        self.best_step: int | None = None
        self.flag: dict | None = None

    # -- state through checkpoints
    def state(self) -> dict:
        return {"curves": self.curves, "start_answers": self.start_answers, "best_step": self.best_step, "flag": self.flag,
                "answers": {str(k): v for k, v in self.answers.items()}, "heldout": [r["prompt_id"] for r in self.held]}

    def restore(self, checkpoint: str | None) -> bool:
        path = Path(checkpoint) / WATCH_FILE if checkpoint else None
        if path is None or not path.exists():
            return False
        s = store.read_json(path)
        self.curves, self.start_answers, self.best_step, self.flag = s["curves"], s["start_answers"], s["best_step"], s["flag"]
        self.answers = {int(k): v for k, v in s.get("answers", {}).items()}
        return True

    def point(self, step: int) -> dict | None:
        return next((p for p in self.curves if p["step"] == step), None)

    # -- measuring
    def _generate(self, model) -> tuple[list[str], list[list[int]], list[list[int]]]:
        """(answers, prompt ids, answer ids) on the held-out slice; the RNG is forked so the
        watch never changes the training's random stream."""
        import torch

        texts = [self.tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in self.held]
        enc = self.tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        from transformers import GenerationConfig

        device = next(model.parameters()).device
        sample = self.rl.watch_temperature > 0
        config = GenerationConfig(do_sample=sample, max_new_tokens=self.rl.max_completion_length, eos_token_id=self.eos_ids,
                                  pad_token_id=self.tok.pad_token_id, use_cache=True,
                                  **({"temperature": self.rl.watch_temperature, "top_k": 0, "top_p": 1.0} if sample else {}))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(self.rl.seed + 1)
            out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                                 generation_config=config)
        width = enc["input_ids"].shape[1]
        prompt_ids = [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist())]
        answer_ids = []
        for row in out[:, width:].tolist():
            ids = []
            for t in row:
                ids.append(t)
                if t in self.eos_ids:
                    break
            while ids and ids[-1] == self.tok.pad_token_id and self.tok.pad_token_id not in self.eos_ids:
                ids.pop()
            answer_ids.append(ids)
        answers = [self.tok.decode(ids, skip_special_tokens=True).strip() for ids in answer_ids]
        return answers, prompt_ids, answer_ids

    def _kl(self, model, prompt_ids: list[list[int]], answer_ids: list[list[int]]) -> float | None:
        """Mean per-token KL(policy || start) over the answers' tokens, exact over the vocabulary."""
        import torch
        import torch.nn.functional as F
        from trl.trainer.utils import use_adapter

        device = next(model.parameters()).device
        ref = "ref" if "ref" in model.peft_config else None  # a pretrained start (TRL's frozen copy), else the base
        total, count = 0.0, 0
        with torch.no_grad():
            for p, a in zip(prompt_ids, answer_ids):
                if not a:
                    continue
                ids = torch.tensor([p + a], device=device)
                sl = slice(len(p) - 1, len(p) + len(a) - 1)
                cur = F.log_softmax(model(input_ids=ids).logits[0, sl].float(), -1)
                with use_adapter(model, ref):
                    start = F.log_softmax(model(input_ids=ids).logits[0, sl].float(), -1)
                total += float((cur.exp() * (cur - start)).sum())
                count += len(a)
        return total / count if count else None

    def measure(self, model, step: int) -> tuple[dict, list[str]]:
        began = time.time()
        was_training = model.training
        model.eval()
        try:
            answers, prompt_ids, answer_ids = self._generate(model)
            kl = 0.0 if step == 0 else self._kl(model, prompt_ids, answer_ids)
        finally:
            model.train(was_training)
        raw = [float(x) for x in self.reward(self.prompts, answers) if x is not None]
        if step == 0 or self.judge is None:
            judge = 0.5 if step == 0 and self.judge is not None else None
        else:  # a judge that did not answer (None) for a prompt leaves it out
            j = [float(x) for x in self.judge(self.prompts, answers, self.start_answers) if x is not None]
            judge = sum(j) / len(j) if j else None
        refused = [refusal_refused(a) for a in answers]
        harm = _rate([r for r, k in zip(refused, self.kinds) if k == "harmful"])
        benign = _rate([r for r, k in zip(refused, self.kinds) if k == "benign"])
        lengths = [len(a) for a in answer_ids]
        point = {
            "step": step, "reward": round(sum(raw) / len(raw), 5) if raw else None, "kl": None if kl is None else round(kl, 6),
            "length": round(sum(lengths) / len(lengths), 3), "judge": None if judge is None else round(judge, 5),
            "refusal_harmful": harm, "refusal_benign": benign,
            "refusal_balance": None if harm is None or benign is None else round(harm - benign, 5),
            "degenerate": round(sum(degenerate(p, a) is not None for p, a in zip(self.prompts, answers)) / len(answers), 4),
            "train_kl": None, "train_reward": None,  # filled from TRL's log of this step (see on_log)
            "rules": [], "seconds": 0.0,
        }
        point["seconds"] = round(time.time() - began, 2)  # the watch's own cost at this point
        return point, answers

    # -- the decisions
    def observe(self, model, step: int) -> dict:
        """Measure at `step`, check the rules, move the best point; returns the point."""
        point, answers = self.measure(model, step)
        if step == 0:
            self.start_answers = answers
            self.answers[0] = answers
            self.curves.append(point)
            self.best_step = 0
            return point
        start, best = self.curves[0], self.point(self.best_step)
        th = self.rl.thresholds
        point["rules"] = rules(point, start, best, th)
        self.curves.append(point)
        if point["rules"]:
            self.flag = {"step": step, "rules": point["rules"],
                         "why": [why(r, point, start, best, th) for r in point["rules"]]}
            self.answers[step] = answers
        elif self.judge is None or (point["judge"] is not None and point["judge"] >= best["judge"]):
            self.best_step = step
            self.answers[step] = answers
        keep = {0, self.best_step, *([self.flag["step"]] if self.flag else [])}
        self.answers = {k: v for k, v in self.answers.items() if k in keep}
        return point

    def callback(self, guard: Callable[[], bool]):
        from transformers import TrainerCallback

        watch = self

        class WatchCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                if not watch.curves:  # a fresh run (a resumed one restored its curves)
                    _save_adapter(model, watch.ckpt / START)
                    watch.observe(model, 0)

            def on_log(self, args, state, control, logs=None, **kwargs):
                # TRL logs a step after its on_step_end: the point gets the means of TRL's own train-batch
                # reward and KL since the previous point (from log_history, which survives a resume)
                point = watch.point(state.global_step)
                if point is None or point["step"] == 0 or point["train_reward"] is not None:
                    return
                prev = max(p["step"] for p in watch.curves if p["step"] < point["step"])
                logged = [x for x in state.log_history if prev < x.get("step", -1) <= point["step"] and "reward" in x]
                for key, name in (("train_reward", "reward"), ("train_kl", "kl")):
                    vals = [x[name] for x in logged if x.get(name) is not None]
                    point[key] = round(sum(vals) / len(vals), 6) if vals else None

            def on_step_end(self, args, state, control, model=None, **kwargs):
                step = state.global_step
                if step % watch.rl.watch_every and step < state.max_steps:
                    return
                if watch.point(step) is None:
                    watch.observe(model, step)
                state.best_global_step = watch.best_step or None  # keeps the best checkpoint from rotation
                control.should_save = True  # every watch point is a checkpoint
                if watch.flag:
                    control.should_training_stop = True

            def on_save(self, args, state, control, **kwargs):
                # before common.marker_callback's marker: a complete checkpoint always has its watch state
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    store.write_json(folder / WATCH_FILE, watch.state())

        return WatchCallback()


def refusal_refused(answer: str) -> bool:
    from cai import refusal

    return refusal.refused(refusal.detect(answer))


def _save_adapter(model, folder: Path) -> None:
    """The trainable adapter alone, committed atomically (kept if already there)."""
    if folder.exists():
        return
    tmp = store.tmp_dir_beside(folder)
    try:
        model.save_pretrained(tmp, selected_adapters=["default"])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    store.commit_dir(tmp, folder)


def _load_kept(model, folder: Path) -> None:
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    set_peft_model_state_dict(model, load_peft_weights(str(folder)), adapter_name="default")


# ---------------------------------------------------------------- plots for the report


def curves_figure(curves: list[dict], flag: dict | None = None, kept_step: int | None = None):
    """A matplotlib Figure of the watch's curves: reward, KL, length, judge, refusal rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in curves]
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.2))
    series = [("reward", [("reward", "held-out"), ("train_reward", "train batches")]),
              ("KL to start (per token)", [("kl", "held-out"), ("train_kl", "train batches (TRL)")]),
              ("mean length (tokens)", [("length", "held-out")]),
              ("judge: P(policy > start)", [("judge", "held-out")]),
              ("refusal rate", [("refusal_harmful", "harmful"), ("refusal_benign", "benign")])]
    for ax, (title, keys) in zip(axes, series):
        for key, label in keys:
            pts = [(s, p.get(key)) for s, p in zip(steps, curves) if p.get(key) is not None]
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=label)
        if flag:
            ax.axvline(flag["step"], color="red", linestyle="--", label=f"flagged ({', '.join(flag['rules'])})")
        if kept_step is not None:
            ax.axvline(kept_step, color="green", linestyle=":", label="kept")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_curves(curves: list[dict], path: Path, flag: dict | None = None, kept_step: int | None = None) -> Path:
    """Write the curves' figure as a PNG at path."""
    import matplotlib.pyplot as plt

    fig = curves_figure(curves, flag, kept_step)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the stage


def train(base_path: str, prompts: list[dict], target: Path, ckpt: Path, recipe: Recipe, card: dict, *,
          init_adapter: str | None, reward: Reward, judge: Judge | None = None,
          guard: Callable[[], bool] = lambda: True) -> bool:
    """Train by RLOO against `reward` from `init_adapter` (else a fresh LoRA on the base),
    watch for reward hacking, and commit the best adapter by the judge at target; resumes
    from ckpt's last complete checkpoint. False when the guard says this run may not commit."""
    from datasets import Dataset
    from transformers import TrainerState
    from trl import RLOOTrainer

    rl = recipe.rl
    rows = prompt_rows(prompts)
    train_rows, held = split_heldout(rows, rl)
    common.check_rows(len(train_rows), rl.min_rows, "RL (after the held-out slice)", Path("prompts"))
    if not held:
        raise InputError(f"prompts: {len(rows)} prompt(s): the watch needs at least one held out besides those trained on")
    if init_adapter:
        common.check_adapter_base(Path(init_adapter), base_path)
    started = time.time()
    model, tok = common.load_base(base_path, recipe)
    model, peft_config = common.start_from(model, recipe, init_adapter)  # TRL copies a pretrained start into "ref"
    resume = common.last_complete_checkpoint(ckpt)
    ds = Dataset.from_list([{"prompt": r["prompt"], "category": r["category"] or "", "answer": r["answer"] or "",
                             "false_belief": r["false_belief"] or ""} for r in train_rows])
    trainer = RLOOTrainer(model=model, reward_funcs=reward_func(reward, rl), args=rl_config(recipe, ckpt), train_dataset=ds,
                       processing_class=tok, peft_config=peft_config)
    # TRL casts QLoRA adapters to bf16; on a CPU that is many times slower than the recipe's compute dtype
    compute = getattr(__import__("torch"), recipe.quant.compute_dtype)
    for name, param in trainer.model.named_parameters():
        if "lora_" in name and param.dtype != compute:
            param.data = param.data.to(compute)
    watch = Watch(held, rl, tok, reward, judge, ckpt, trainer.eos_token_ids)
    # the watch's on_save must run before the completion marker's
    trainer.add_callback(watch.callback(guard))
    trainer.add_callback(common.marker_callback(guard))
    watch.restore(resume)
    if watch.flag is None:
        trainer.train(resume_from_checkpoint=resume)
    else:  # a resumed run that had already flagged goes straight to the commit
        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
    model = trainer.model
    steps = trainer.state.global_step
    kept = watch.best_step or 0
    _load_kept(model, ckpt / START if kept == 0 else ckpt / f"checkpoint-{kept}")
    start, kept_point = watch.curves[0], watch.point(kept)
    card["train"] = {**common.train_summary(trainer), "steps": steps, "rows": len(train_rows), "heldout_rows": len(held),
                     "resumed_from": resume, "trainer": "RLOOTrainer", "reference": "init adapter" if init_adapter else "base",
                     "seconds": round(time.time() - started, 2)}
    card["watch"] = {
        "curves": watch.curves, "flagged": watch.flag is not None, "flag": watch.flag, "kept_step": kept,
        "kept_why": "the best watch point by the judge" if judge is not None else "the latest watch point before any flag",
        "heldout": [r["prompt_id"] for r in held], "thresholds": rl.thresholds.model_dump(),
        "answers": {"start": watch.answers.get(0), "kept": watch.answers.get(kept),
                    "flagged": watch.answers.get(watch.flag["step"]) if watch.flag else None},
        "heldout_prompts": watch.prompts,
    }
    card["metrics"] = {
        "flagged": watch.flag is not None, "flag_step": watch.flag["step"] if watch.flag else None,
        "flag_rules": watch.flag["rules"] if watch.flag else [], "kept_step": kept,
        "reward_start": start["reward"], "reward_kept": kept_point["reward"], "judge_kept": kept_point["judge"],
        "kl_kept": kept_point["kl"], "length_ratio_kept": round(kept_point["length"] / start["length"], 4) if start["length"] else None,
    }
    if not guard():
        return False
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
    return common.commit_adapter(model, tok, target, card)


def card_curves(adapter: Path) -> tuple[list[dict], dict | None, int | None]:
    """(curves, flag, kept step) from a committed RL adapter's card, for the report."""
    watch = json.loads((Path(adapter) / "cai.json").read_text()).get("watch") or {}
    return watch.get("curves") or [], watch.get("flag"), watch.get("kept_step")
