"""Stage 5: label response pairs with AI feedback (RLAIF), after a judge self-check.

The judge reads the conversation, both responses as (A) and (B) and one principle's
preference question, with worked examples in front (built from the constitution's
few-shot critique/revision pairs: the revision is the better answer). The label is read
from the next-token probabilities of the choice letters in one forward pass, summed
over every token that spells the letter; the mass that fell on the letters at all is
recorded, and an evaluation whose mass is below `min_mass` is invalid. Each pair is
judged in both orders and under k sampled principles, and the probabilities averaged.
The passage (conversation + both responses) comes before the principle's question, so
the k questions about one (pair, order) share the passage's computation.

Before labeling, the judge answers known-answer pairs (`self_check`: shipped pairs written
by the team, plus the constitution's worked examples not shown in its prompt) in both
orders; a judge below the accuracy or position-consistency thresholds labels nothing
(unless told to go on). Pairs whose better answer is known by construction (revision,
contrastive; see cai.pairs) get their label from construction; a judge that passed its
check still scores them (`judge_p_chosen`). Column names never collide with those TRL's
trainers read (TRL_COLUMNS).

Knows the constitution and the engine seam; knows nothing about files or queues.
"""

from __future__ import annotations

import json
import random

from pydantic import BaseModel, ConfigDict, Field

from cai.constitution import Constitution, Principle
from cai.engine import Engine
from cai.errors import InputError
from cai.generation import Sampling, choice_token_ids

ANSWER_PREFIX = "The better response is ("
COT_PREFIX = "Let's think step by step."


class LabelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    principles_per_pair: int = Field(4, ge=1, description="k principles sampled (weighted) per pair.")
    few_shot: int = Field(2, ge=0)
    min_mass: float = Field(0.05, ge=0, lt=1, description="Below this mass on A/B an evaluation is invalid.")
    min_margin: float = Field(0.1, ge=0, lt=1, description="Pairs with margin = 2*p_chosen-1 below this stay out of training data.")
    chain_of_thought: bool = False
    cot_max_new_tokens: int = Field(64, gt=0)
    clamp: tuple[float, float] = (0.4, 0.6)  # applied to chain-of-thought probabilities only
    batch_size: int = Field(16, gt=0)
    check_min_accuracy: float = Field(0.7, ge=0, le=1, description="Self-check: least accuracy on known-answer pairs.")
    check_min_consistency: float = Field(0.5, ge=0, le=1, description="Self-check: least position consistency.")
    skip_check: bool = Field(False, description="Label with a judge that failed its self-check anyway.")
    constructed_p_chosen: float = Field(1.0, gt=0.5, le=1, description="The label of pairs better by construction.")


# names TRL 1.16's SFT, Reward and DPO trainers read from a dataset row besides their own
# text columns: a column of ours must never carry one (e.g. `margin` is a loss offset there)
TRL_COLUMNS = {"margin", "ref_chosen_logps", "ref_rejected_logps", "input_ids", "labels", "attention_mask",
               "completion_mask", "assistant_masks", "seq_lengths", "chosen_ids", "rejected_ids", "prompt_ids",
               "image", "images", "text", "tools", "chat_template_kwargs"}
GENERIC_QUESTION = "Which response is more helpful, honest and harmless?"


# ---------------------------------------------------------------- the judge


def check_judge(constitution: Constitution, tok=None) -> None:
    """Refuse, before any work, a constitution or judge the label stage cannot use."""
    missing = [p.id for p in constitution.principles if not p.preference_question]
    if missing:
        raise InputError(f"constitution: principle(s) {', '.join(missing)} have no preference_question; "
                         "the label stage needs one for every principle")
    if tok is not None:
        choice_token_ids(tok, ("A", "B"))


def _transcript(messages: list[dict]) -> str:
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in messages)


def judge_parts(messages: list[dict], a: str, b: str, question: str) -> tuple[str, str]:
    """The judge's question as (passage, ask): the passage (conversation and both
    responses) comes first so that k principles' asks can share its computation."""
    passage = (f"Consider the following conversation between a human and an assistant:\n\n{_transcript(messages)}\n\n"
               f"Response (A): {a}\n\nResponse (B): {b}\n\n")
    return passage, f"{question} Answer with A or B."


def judge_question(messages: list[dict], question: str, a: str, b: str) -> str:
    passage, ask = judge_parts(messages, a, b, question)
    return passage + ask


def _few_shot_turns(constitution: Constitution, k: int) -> list[dict]:
    turns = []
    for i, ex in enumerate(constitution.few_shot[:k]):
        p = constitution.principle(ex.principle) if ex.principle else constitution.principles[0]
        better_is_a = i % 2 == 1  # alternate positions so the examples teach no position
        a, b = (ex.revision, ex.response) if better_is_a else (ex.response, ex.revision)
        q = judge_question([{"role": "user", "content": ex.prompt}], p.preference_question or "", a, b)
        turns += [{"role": "user", "content": q},
                  {"role": "assistant", "content": f"{ANSWER_PREFIX}{'A' if better_is_a else 'B'})."}]
    return turns


def sample_judge_principles(constitution: Constitution, k: int, seed: int, prompt_id: str) -> list[Principle]:
    """k distinct principles, weighted, seeded by (seed, prompt): independent of sharding."""
    rng = random.Random(f"label:{seed}:{prompt_id}")
    pool = list(constitution.principles)
    picked = []
    while pool and len(picked) < k:
        p = rng.choices(pool, weights=[x.weight for x in pool], k=1)[0]
        picked.append(p)
        pool.remove(p)
    return picked


def label_pairs(engine: Engine, constitution: Constitution, pairs: list[dict], settings: LabelSettings,
                seed: int, provenance: dict) -> list[dict]:
    """Label every pair: k principles x both orders, read from next-token log-probs.

    Returns one row per pair with p_first (the probability that responses[0] is better),
    chosen/rejected, p_chosen, label_margin, per-principle detail, and `valid`.
    """
    check_judge(constitution)
    shots = _few_shot_turns(constitution, settings.few_shot)
    # one evaluation = (pair, principle, order); order 0 shows responses[0] as A
    evals: list[tuple[int, str, int]] = []
    convs: list[list[dict]] = []
    chosen_principles = []
    for i, pair in enumerate(pairs):
        ps = sample_judge_principles(constitution, settings.principles_per_pair, seed, pair["prompt_id"])
        chosen_principles.append([p.id for p in ps])
        r0, r1 = pair["responses"]
        for order, (a, b) in enumerate(((r0, r1), (r1, r0))):
            for p in ps:
                passage, ask = judge_parts(pair["messages"], a, b, p.preference_question)
                evals.append((i, p.id, order))
                convs.append(shots + [{"role": "user", "content": passage + ask}])
    if settings.chain_of_thought:
        reasoning = engine.generate(convs, Sampling(max_new_tokens=settings.cot_max_new_tokens, temperature=0,
                                                    batch_size=settings.batch_size), prefixes=[COT_PREFIX] * len(convs))
        prefixes = [COT_PREFIX + " " + r.text + "\n" + ANSWER_PREFIX for r in reasoning]
        masses = engine.choice_mass(convs, prefixes, ("A", "B"), batch_size=settings.batch_size)
    else:  # the k principles' questions about one (pair, order) share its passage
        masses = engine.choice_mass(convs, [ANSWER_PREFIX] * len(convs), ("A", "B"),
                                    groups=[(i, order) for i, _, order in evals], batch_size=settings.batch_size)
    detail: list[dict[str, dict]] = [{} for _ in pairs]
    for (i, pid, order), (ma, mb) in zip(evals, masses):
        total = ma + mb
        p_a = ma / total if total > 0 else 0.5
        if settings.chain_of_thought:
            p_a = min(max(p_a, settings.clamp[0]), settings.clamp[1])
        p_first = p_a if order == 0 else 1 - p_a  # probability that responses[0] is better
        d = detail[i].setdefault(pid, {})
        d[f"p_first_order{order}"] = p_first
        d[f"mass_order{order}"] = total
    rows = []
    for i, pair in enumerate(pairs):
        per = []
        for pid in chosen_principles[i]:
            d = detail[i][pid]
            valid = min(d["mass_order0"], d["mass_order1"]) >= settings.min_mass
            per.append({"principle": pid, "p_first_order0": d["p_first_order0"], "p_first_order1": d["p_first_order1"],
                        "mass_order0": d["mass_order0"], "mass_order1": d["mass_order1"], "valid": valid,
                        "consistent": (d["p_first_order0"] > 0.5) == (d["p_first_order1"] > 0.5),
                        "p_first": (d["p_first_order0"] + d["p_first_order1"]) / 2})
        good = [x for x in per if x["valid"]]
        valid = bool(good)
        p_first = sum(x["p_first"] for x in good) / len(good) if good else 0.5
        first_wins = p_first >= 0.5
        p_chosen = p_first if first_wins else 1 - p_first
        r_c, r_r = (0, 1) if first_wins else (1, 0)
        rows.append({
            "prompt": pair["messages"],
            "chosen": [{"role": "assistant", "content": pair["responses"][r_c]}],
            "rejected": [{"role": "assistant", "content": pair["responses"][r_r]}],
            "p_chosen": p_chosen, "label_margin": 2 * p_chosen - 1, "valid": valid,
            "prompt_id": pair["prompt_id"], "category": pair.get("category"),
            "source": pair.get("source", "file"), "label_source": "judge",
            "p_first": p_first, "chosen_index": r_c,
            "principles": [{**x, "p_chosen": x["p_first"] if r_c == 0 else 1 - x["p_first"]} for x in per],
            "provenance": {**provenance, "principles": chosen_principles[i], "seed": seed,
                           "mode": "chain-of-thought" if settings.chain_of_thought else "log-prob"},
        })
    return rows


def constructed_labels(pairs: list[dict], settings: LabelSettings, provenance: dict,
                       judged: list[dict] | None = None) -> list[dict]:
    """Rows for pairs better by construction (revision, contrastive): the label is the
    construction's; `judged` (the judge's rows for the same pairs, if it passed its check)
    adds the judge's probability for the constructed winner."""
    rows = []
    for n, pair in enumerate(pairs):
        b = pair["better"]
        p = settings.constructed_p_chosen
        row = {
            "prompt": pair["messages"],
            "chosen": [{"role": "assistant", "content": pair["responses"][b]}],
            "rejected": [{"role": "assistant", "content": pair["responses"][1 - b]}],
            "p_chosen": p, "label_margin": 2 * p - 1, "valid": True,
            "prompt_id": pair["prompt_id"], "category": pair.get("category"),
            "source": pair["source"], "label_source": "construction", "p_first": p if b == 0 else 1 - p, "chosen_index": b,
            "principles": [], "provenance": {**provenance, "principle": pair.get("principle")},
        }
        if judged is not None:
            j = judged[n]
            row["judge_p_chosen"] = j["p_first"] if b == 0 else 1 - j["p_first"]
            row["principles"] = j["principles"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------- the judge's self-check


def calibration_items(constitution: Constitution, settings: LabelSettings) -> list[dict]:
    """Known-answer pairs: the shipped ones, plus the constitution's worked examples that the
    judge's prompt does not already show (response vs its revision, under its principle)."""
    from importlib import resources

    from cai.store import jsonl_lines

    text = (resources.files("cai") / "data" / "calibration" / "judge.jsonl").read_text("utf-8")
    items = [json.loads(x) for x in jsonl_lines(text) if x.strip()]
    for i, ex in enumerate(constitution.few_shot[settings.few_shot:], start=settings.few_shot):
        items.append({"id": f"few_shot[{i}]", "prompt": ex.prompt, "better": ex.revision, "worse": ex.response,
                      "principle": ex.principle})
    return items


def _question(constitution: Constitution, item: dict) -> str:
    if item.get("principle"):
        p = constitution.principle(item["principle"])
        if p.preference_question:
            return p.preference_question
    tagged = [p for p in constitution.principles if item.get("principle_tag") in p.tags and p.preference_question]
    return tagged[0].preference_question if tagged else GENERIC_QUESTION


def self_check(engine: Engine, constitution: Constitution, settings: LabelSettings) -> dict:
    """The judge on known-answer pairs, both orders: accuracy (the better answer wins on
    average over the two orders), position consistency (both orders pick the same answer),
    mean choice mass; `passed` against the settings' thresholds. `rows` has every item."""
    items = calibration_items(constitution, settings)
    shots = _few_shot_turns(constitution, settings.few_shot)
    convs = []
    for it in items:
        msgs = [{"role": "user", "content": it["prompt"]}]
        q = _question(constitution, it)
        for a, b in ((it["better"], it["worse"]), (it["worse"], it["better"])):
            convs.append(shots + [{"role": "user", "content": judge_question(msgs, q, a, b)}])
    masses = engine.choice_mass(convs, [ANSWER_PREFIX] * len(convs), ("A", "B"), batch_size=settings.batch_size)
    rows = []
    for n, it in enumerate(items):
        (a0, b0), (a1, b1) = masses[2 * n], masses[2 * n + 1]
        p0 = a0 / (a0 + b0) if a0 + b0 > 0 else 0.5  # order 0: the better answer is A
        p1 = b1 / (a1 + b1) if a1 + b1 > 0 else 0.5  # order 1: the better answer is B
        mass = min(a0 + b0, a1 + b1)
        valid = mass >= settings.min_mass
        rows.append({"id": it["id"], "p_better_order0": round(p0, 4), "p_better_order1": round(p1, 4),
                     "mass": round(mass, 4), "valid": valid, "correct": valid and (p0 + p1) / 2 > 0.5,
                     "consistent": valid and (p0 > 0.5) == (p1 > 0.5)})
    n = len(rows) or 1
    acc = sum(r["correct"] for r in rows) / n
    cons = sum(r["consistent"] for r in rows) / n
    return {
        "items": len(rows), "accuracy": round(acc, 4), "position_consistency": round(cons, 4),
        "mean_choice_mass": round(sum(r["mass"] for r in rows) / n, 4), "invalid": sum(not r["valid"] for r in rows),
        "min_accuracy": settings.check_min_accuracy, "min_consistency": settings.check_min_consistency,
        "passed": acc >= settings.check_min_accuracy and cons >= settings.check_min_consistency, "rows": rows,
    }


def check_failed_line(judge: str, check: dict) -> str:
    """One line: the figures of a failed self-check and what to do."""
    return (f"label: the judge {judge} failed its self-check on {check['items']} known-answer pairs: accuracy "
            f"{check['accuracy']:.2f} (needs {check['min_accuracy']:.2f}), position consistency "
            f"{check['position_consistency']:.2f} (needs {check['min_consistency']:.2f}), mean choice mass "
            f"{check['mean_choice_mass']:.2f}; use a stronger judge (--judge SPEC or a judge server), or pair sources "
            "that need no judge (pairs.sources: [revision] or [contrastive]), or label.skip_check: true to label anyway")


def nothing_survived(stats: dict, judge: str) -> str:
    """One line: why no preference pair is left to train on, with the judge's figures."""
    parts = [f"no usable preference pairs: {stats['pairs_labeled']} labeled"]
    if stats.get("pairs_unlabeled_judge_failed"):
        parts.append(f"{stats['pairs_unlabeled_judge_failed']} left unlabeled because the judge failed its self-check")
    if stats["pairs_invalid"]:
        parts.append(f"{stats['pairs_invalid']} invalid (the judge put under min_mass on A/B; mean choice mass "
                     f"{stats['mean_choice_mass']})")
    if stats["pairs_below_margin"]:
        parts.append(f"{stats['pairs_below_margin']} below min_margin {stats['min_margin']} (position consistency "
                     f"{stats['position_consistency']})")
    check = stats.get("self_check")
    if check:
        parts.append(f"judge {judge} self-check accuracy {check['accuracy']:.2f}, position consistency "
                     f"{check['position_consistency']:.2f} ({'passed' if check['passed'] else 'failed'})")
    return "; ".join(parts) + ("; use a stronger judge, pair sources that need no judge (pairs.sources: [revision]), "
                               "more prompts, or a lower label.min_margin")


def judge_stats(rows: list[dict], settings: LabelSettings) -> dict:
    """The judge's figures for the manifest."""
    evals = [x for r in rows for x in r["principles"]]
    kept = [r for r in rows if r["valid"] and r["label_margin"] >= settings.min_margin]
    bins = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0001]
    hist = {f"{lo:.1f}-{min(hi, 1):.1f}": sum(1 for r in rows if r["valid"] and lo <= r["p_chosen"] < hi)
            for lo, hi in zip(bins, bins[1:])}
    return {
        "pairs_labeled": len(rows),
        "pairs_invalid": sum(1 for r in rows if not r["valid"]),
        "pairs_below_margin": sum(1 for r in rows if r["valid"] and r["label_margin"] < settings.min_margin),
        "pairs_kept": len(kept),
        "position_consistency": round(sum(x["consistent"] for x in evals) / len(evals), 4) if evals else None,
        "mean_choice_mass": round(sum((x["mass_order0"] + x["mass_order1"]) / 2 for x in evals) / len(evals), 4) if evals else None,
        "p_chosen_distribution": hist,
        "min_margin": settings.min_margin,
        "warnings": _warnings(rows, evals, kept),
    }


def _warnings(rows: list[dict], evals: list[dict], kept: list[dict]) -> list[str]:
    """Plain-language reasons to distrust this round's labels."""
    out = []
    if evals:
        consistency = sum(x["consistent"] for x in evals) / len(evals)
        if consistency < 0.5:
            out.append(f"position consistency {consistency:.2f}: the judge mostly answers by position, not content; "
                       "labels are near 0.5 after debiasing; use a stronger --judge")
        mass = sum((x["mass_order0"] + x["mass_order1"]) / 2 for x in evals) / len(evals)
        if mass < 0.5:
            out.append(f"mean choice mass {mass:.2f}: the judge often does not answer with A or B")
    if rows and not kept:
        out.append("no pair passed the margin threshold: nothing to train on")
    return out
