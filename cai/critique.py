"""Stages 1-2: respond, then critique-and-revise against sampled principles.

Each function takes a shard of prompts (and an engine) and returns plain records;
all prompts of a shard advance through every pass together as one batched generation.
Knows the constitution and the generation helpers; knows nothing about files, queues or
round folders (the caller writes what these functions return).
"""

from __future__ import annotations

import random
import re

from pydantic import BaseModel, ConfigDict, Field

from cai.constitution import Constitution, Principle
from cai.engine import Engine
from cai.generation import Sampling
from cai.prompts import Prompt


class CritiqueSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    passes: int = Field(2, ge=1, le=8)
    few_shot: int = Field(4, ge=0, description="How many of the constitution's worked examples go in front.")
    drop_degenerate: bool = True


def sample_principle(constitution: Constitution, seed: int, prompt_id: str, n: int, salt: str = "critique") -> Principle:
    """Weighted, seeded choice that depends only on (seed, prompt, pass): shard-independent."""
    rng = random.Random(f"{salt}:{seed}:{prompt_id}:{n}")
    ps = constitution.principles
    return rng.choices(ps, weights=[p.weight for p in ps], k=1)[0]


def respond(engine: Engine, prompts: list[Prompt], sampling: Sampling) -> list[dict]:
    """Stage 1: the policy's first answer to every prompt (one batched call)."""
    gens = engine.generate([p.messages for p in prompts], sampling)
    return [
        {"prompt_id": p.id, "messages": p.messages, "category": p.category,
         "response": g.text, "n_tokens": g.n_tokens, "finished": g.finished}
        for p, g in zip(prompts, gens)
    ]


def _few_shot_turns(constitution: Constitution, k: int) -> list[dict]:
    turns = []
    for ex in constitution.few_shot[:k]:
        p = constitution.principle(ex.principle) if ex.principle else constitution.principles[0]
        turns += [
            {"role": "user", "content": ex.prompt},
            {"role": "assistant", "content": ex.response},
            {"role": "user", "content": f"Critique request: {p.critique_request}"},
            {"role": "assistant", "content": ex.critique},
            {"role": "user", "content": f"Revision request: {p.revision_request}"},
            {"role": "assistant", "content": ex.revision},
        ]
    return turns


_LABEL = re.compile(r"^\s*(?:\*\*)?(revised response|revision|revised answer|rewritten response|critique|response)\s*:?(?:\*\*)?\s*:?\s*", re.I)


def clean(text: str) -> str:
    return _LABEL.sub("", text, count=1).strip()


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def repetitive(text: str) -> bool:
    words = text.lower().split()
    if len(words) >= 16:
        grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
        if len(set(grams)) / len(grams) < 0.5:
            return True
    lines = [_norm(line) for line in text.splitlines() if len(line.strip()) > 8]
    return any(lines.count(line) >= 3 for line in set(lines))


def degenerate(revision: str, previous: str, finished: bool) -> str | None:
    """Why a revision is unusable (empty, unchanged, truncated, repetitive), or None."""
    if not revision.strip():
        return "empty"
    if _norm(revision) == _norm(previous):
        return "unchanged"
    if not finished:
        return "truncated"
    if repetitive(revision):
        return "repetitive"
    return None


def critique_revise(engine: Engine, constitution: Constitution, responses: list[dict], settings: CritiqueSettings,
                    sampling: Sampling, provenance: dict) -> tuple[list[dict], list[dict]]:
    """Stage 2: n passes of critique then revision for a shard, batched per step.

    Returns (sft_rows, critique_rows). A degenerate revision is flagged and does not
    replace the current answer; a prompt with no accepted revision gets no SFT row when
    settings.drop_degenerate (the caller counts drops from the critique rows).
    """
    shots = _few_shot_turns(constitution, settings.few_shot)
    current = [r["response"] for r in responses]
    accepted = [0] * len(responses)
    used: list[list[str]] = [[] for _ in responses]
    crit_rows: list[dict] = []
    for n in range(settings.passes):
        principles = [sample_principle(constitution, sampling.seed, r["prompt_id"], n) for r in responses]
        base = [shots + r["messages"] + [{"role": "assistant", "content": cur}] for r, cur in zip(responses, current)]
        ask_c = [b + [{"role": "user", "content": f"Critique request: {p.critique_request}"}] for b, p in zip(base, principles)]
        critiques = engine.generate(ask_c, sampling.derived("critique", n))
        ask_r = [
            a + [{"role": "assistant", "content": clean(c.text)},
                 {"role": "user", "content": f"Revision request: {p.revision_request}"}]
            for a, c, p in zip(ask_c, critiques, principles)
        ]
        revisions = engine.generate(ask_r, sampling.derived("revise", n))
        for i, (r, p, c, v) in enumerate(zip(responses, principles, critiques, revisions)):
            text = clean(v.text)
            why = degenerate(text, current[i], v.finished)
            crit_rows.append({
                "prompt_id": r["prompt_id"], "pass": n, "principle": p.id,
                "before": current[i], "critique": clean(c.text), "revision": text,
                "revision_tokens": v.n_tokens, "degenerate": why,
                "provenance": provenance,
            })
            used[i].append(p.id)
            if why is None:
                current[i] = text
                accepted[i] += 1
    sft_rows = []
    for i, r in enumerate(responses):
        if settings.drop_degenerate and accepted[i] == 0:
            continue
        sft_rows.append({
            "messages": r["messages"] + [{"role": "assistant", "content": current[i]}],
            "prompt_id": r["prompt_id"], "category": r.get("category"),
            "initial_response": r["response"], "revisions_accepted": accepted[i],
            "provenance": {**provenance, "principles": used[i]},
        })
    return sft_rows, crit_rows
