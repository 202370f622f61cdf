"""Stage 4: two answers per prompt to compare, from one of three sources.

- `samples`: two samples from the policy; which is better is for the judge to say.
- `revision`: the critique stage's accepted text (a revision, or a principle-driven
  answer by the critic) preferred to the policy's first answer (the open CAI recipe's
  choice); better by construction, and made only where the pair says what is to be
  learned: for a harmful prompt, a refusal over a first answer that complied (a pair of
  two refusals teaches nothing about harm); for a benign one, a real answer (the critique
  stage's kind check) over the first answer. The row's `source` is the text's
  (`revision` or `principle-driven`).
- `contrastive` (RLCD, Yang et al. 2023): one answer under a system prompt that asks to
  follow a principle and one under its opposite (the principle's `follow_prompt` and
  `violate_prompt`, or a fallback built from its preference question); better by
  construction.

Every row says its `source` and, when the better answer is known by construction, its
index `better` (else None). Knows the constitution and the engine seam; knows nothing
about files or queues.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cai.constitution import Constitution, Principle
from cai.critique import sample_principle
from cai.engine import Engine
from cai.generation import Sampling
from cai.prompts import Prompt

Source = Literal["samples", "revision", "contrastive"]


class PairSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[Source] = Field(
        default_factory=lambda: ["samples", "revision"],
        description="Where pairs come from; samples need a judge that passes its self-check, the others don't.")


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def _row(p: Prompt | dict, responses: list[str], finished: list[bool], source: str, better: int | None,
         principle: str | None = None) -> dict:
    get = (lambda k: p[k]) if isinstance(p, dict) else (lambda k: getattr(p, k))
    pid = get("prompt_id") if isinstance(p, dict) else p.id
    return {"prompt_id": pid, "messages": get("messages"), "category": get("category"), "responses": responses,
            "finished": finished, "source": source, "better": better, "principle": principle}


def sample_pairs(engine: Engine, prompts: list[Prompt], sampling: Sampling) -> tuple[list[dict], int]:
    """Two sampled responses per prompt (one batched call); identical pairs skipped and counted."""
    gens = engine.generate([p.messages for p in prompts for _ in (0, 1)], sampling)
    rows, identical = [], 0
    for i, p in enumerate(prompts):
        a, b = gens[2 * i], gens[2 * i + 1]
        if _same(a.text, b.text):
            identical += 1
            continue
        rows.append(_row(p, [a.text, b.text], [a.finished, b.finished], "samples", None))
    return rows, identical


def revision_pairs(sft_rows: list[dict]) -> list[dict]:
    """(accepted text, first answer) for every prompt with an accepted text that differs from
    the first answer, except harmful prompts whose first answer already refused."""
    from cai import refusal
    from cai.critique import HARMFUL

    out = []
    for r in sft_rows:
        final, first = r["messages"][-1]["content"], r["initial_response"]
        if r.get("revisions_accepted", 0) == 0 or _same(final, first):
            continue
        if r.get("category") in HARMFUL and refusal.detect(first) != "none":
            continue
        out.append(_row({**r, "messages": r["messages"][:-1]}, [final, first], [True, True], r.get("source", "revision"), 0,
                        ",".join(r["provenance"].get("principles", [])) or None))
    return out


def contrast_prompts(p: Principle) -> tuple[str, str]:
    """The principle's two system prompts, or a fallback built from its preference question."""
    if p.follow_prompt and p.violate_prompt:
        return p.follow_prompt, p.violate_prompt
    q = p.preference_question or p.critique_request
    return (f"You are a careful, honest and helpful assistant. Write the answer a thoughtful reviewer would choose "
            f"when asked: \"{q}\"",
            f"You are a careless assistant. Write the answer a thoughtful reviewer would NOT choose when asked: \"{q}\"")


def contrastive_pairs(engine: Engine, constitution: Constitution, prompts: list[Prompt], sampling: Sampling,
                      seed: int) -> tuple[list[dict], int]:
    """One answer following and one violating a principle sampled per prompt (seeded); identical
    skipped, and so is a pair whose following answer is unusable or misses the prompt's kind
    (cai.critique.degenerate with the category): counted with the identical ones."""
    from cai.critique import degenerate
    principles = [sample_principle(constitution, seed, p.id, 0, salt="contrastive") for p in prompts]
    convs = []
    for p, pr in zip(prompts, principles):
        follow, violate = contrast_prompts(pr)
        user = [m for m in p.messages if m["role"] != "system"]
        convs += [[{"role": "system", "content": follow}] + user, [{"role": "system", "content": violate}] + user]
    gens = engine.generate(convs, sampling)
    rows, identical = [], 0
    for i, (p, pr) in enumerate(zip(prompts, principles)):
        good, bad = gens[2 * i], gens[2 * i + 1]
        if _same(good.text, bad.text) or degenerate(good.text, bad.text, good.finished, category=p.category):
            identical += 1
            continue
        rows.append(_row(p, [good.text, bad.text], [good.finished, bad.finished], "contrastive", 0, pr.id))
    return rows, identical
