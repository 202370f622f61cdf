"""Stages 1-2: respond, then make a better answer under the constitution, two ways:

- `revise` (the paper's critique-and-revise): n passes of critique then revision of the
  policy's first answer, a principle per pass (drawn by weight among those whose tags fit
  the prompt's kind, or among all);
- `principle-driven` (SELF-ALIGN, Sun et al. 2023; context distillation): the critic
  answers the prompt itself with the constitution's principles as its system prompt.

Either way a text is kept only if it is usable (not empty, unchanged, truncated,
repetitive, a copy of the critique or a worked example, or "meta" text about "the
response") and fits the prompt's kind: for a harmful prompt it declines or safely
redirects, for a helpful or safe-but-scary one it answers for real (cai.refusal reads
which). Every SFT row says its `source`.

Each function takes a shard of prompts (and an engine) and returns plain records;
all prompts of a shard advance through every pass together as one batched generation.
Knows the constitution, the refusal reader and the generation helpers; knows nothing
about files, queues or round folders (the caller writes what these functions return).
"""

from __future__ import annotations

import dataclasses
import random
import re

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cai.constitution import Constitution, Principle
from cai.engine import Engine
from cai.generation import Sampling
from cai.prompts import Prompt
from cai.textchecks import _norm, copies, repetitive, shares_run  # noqa: F401  (used here and by callers)


class CritiqueSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    passes: int = Field(2, ge=1, le=8)
    few_shot: int = Field(4, ge=0, description="How many of the constitution's worked examples go in front.")
    drop_degenerate: bool = True
    revision_candidates: int = Field(1, ge=1, le=8, description="Revisions sampled per request; the first usable one is kept "
                                     "(principle-driven: the extra ones are drawn only where the first did not fit).")
    mode: Literal["revise", "principle-driven"] = Field(
        "revise", description="revise: critique then revise the policy's answer; principle-driven: the critic answers "
                              "with the constitution's principles as its system prompt.")
    max_repeats: int | None = Field(
        2, ge=1, description="Principle-driven: the same kept answer (case and spacing aside) at most this many times "
                             "per shard; a further copy is a misfit ('repeated') and another candidate is drawn. One "
                             "refusal sentence kept for most harmful prompts teaches a template the student then says "
                             "to safe prompts too. null: no cap.")
    fit_kind: bool = Field(True, description="Drop texts that refuse a benign prompt or comply with a harmful one "
                                             "(by the prompt's category and the refusal reader).")
    principle_tags: dict[str, list[str]] = Field(
        default_factory=lambda: {"red_team": ["harmlessness"], "harmful": ["harmlessness"],
                                 "helpful": ["helpfulness"], "borderline": ["helpfulness"],
                                 "pushback": ["sycophancy", "honesty"]},
        description="Prompt category -> principle tags a critique's principle is drawn from (all principles when none fit).")
    kind_guidance: dict[str, str] = Field(
        default_factory=lambda: dict(KIND_GUIDANCE),
        description="Prompt category -> what a principle-driven answer to that kind must do, added to the critic's system "
                    "prompt (the student never sees it: context distillation). A category not named gets none.")


_ANSWER = ("This request is safe, even if some of its words sound alarming. Answer it fully and directly, with no "
           "warnings, disclaimers or moralizing.")
# none for harmful kinds: the preamble's "decline briefly" is what the 0.5B teacher follows; a longer
# instruction to explain its refusal made it comply with 25 of 30 harmful prompts (bench, 3 candidates)
KIND_GUIDANCE = {"helpful": _ANSWER, "borderline": _ANSWER,
                 "pushback": ("The user disputes your earlier answer. If it was right, keep it: say politely that it is "
                              "correct, state it again, and give the reason. Change it only if the user shows it was wrong.")}

HARMFUL = ("red_team", "harmful")   # prompt categories an assistant should decline or safely redirect
BENIGN = ("helpful", "borderline", "pushback")  # categories it should answer for real (borderline: safe but
# scary-sounding; pushback: the user disputes a right answer, and a kept answer must still hold the known one)


_GIVES_IN = re.compile(r"\b(you'?re|you are) (absolutely |completely |quite |totally )?(right|correct)\b|\bi apologi[sz]e\b|"
                       r"\bmy (mistake|apologies|bad)\b|\bsorry for the (confusion|mistake|error)\b|\bi agree with you\b", re.I)


# "... I would be more than happy to assist you." after a refusal, about the harmful request itself
_OFFER = re.compile(r"\b(?:happy|glad|willing|pleased) to (?:help|assist)\b|\bhere(?:'s| is) how\b", re.I)
def offers_harm(text: str, request: str) -> bool:
    """A sentence that offers help (or says "here's how") and names the request (3 of its
    content words): the refusal takes itself back ("If you are seeking help with hijacking
    someone's Steam account ..., I would be more than happy to assist you.")."""
    from cai import refusal

    asked = refusal._stems(request)  # the classifier's own request-overlap stems
    return any(_OFFER.search(s) and len(refusal._stems(s) & asked) >= 3 for s in refusal.sentences(text))


def kind_misfit(text: str, category: str | None, answer: str | None = None, false_belief: str | None = None,
                request: str | None = None) -> str | None:
    """Why a text does not fit its prompt's kind, or None: `complies-harmful` (anything short of
    a full refusal of a harmful prompt: a partial one still gives part of the harm; one whose
    first sentence answers and only then warns, "The poison ... is X. However, it's important
    to note ..."; or one that offers help with the request after declining it, given the
    `request`),
    `refuses-benign` (a full or partial refusal of a benign one), `gives-in` (a pushback
    prompt's answer that no longer holds its known `answer`, names the user's `false_belief`,
    or concedes: "you're right", "I apologize": the sycophancy the probes count)."""
    from cai import refusal
    from cai.probes import contains

    if category in HARMFUL:
        first = refusal.sentences(text)[:1]
        if refusal.detect(text) != "full" or (first and refusal.detect(first[0]) == "none") \
                or (request and offers_harm(text, request)):
            return "complies-harmful"
        return None
    if category in BENIGN:
        if refusal.detect(text) != "none":
            return "refuses-benign"
        if category == "pushback" and ((answer and not contains(text, answer)) or _GIVES_IN.search(text)
                                       or (false_belief and contains(text, false_belief))):
            return "gives-in"
    return None


def sample_principle(constitution: Constitution, seed: int, prompt_id: str, n: int, salt: str = "critique",
                     tags: list[str] | None = None) -> Principle:
    """Weighted, seeded choice that depends only on (seed, prompt, pass): shard-independent;
    among the principles with one of `tags` when any has one."""
    rng = random.Random(f"{salt}:{seed}:{prompt_id}:{n}")
    ps = kind_principles(constitution, tags)
    return rng.choices(ps, weights=[p.weight for p in ps], k=1)[0]


PREAMBLE = ("You are a helpful, honest and harmless assistant. Answer the user directly. If a request would help "
            "someone cause real harm, decline briefly and offer a safe alternative; otherwise give a genuinely useful "
            "answer, even when the words sound alarming. You follow these principles:")


def kind_principles(constitution: Constitution, tags: list[str] | None) -> list[Principle]:
    """The principles whose tags meet `tags` (all of them when none does or no tags are given)."""
    return [p for p in constitution.principles if tags and set(p.tags) & set(tags)] or list(constitution.principles)


def principles_prompt(constitution: Constitution, tags: list[str] | None = None, guidance: str | None = None) -> str:
    """The system prompt of principle-driven answers: a short preamble, what an answer to
    the prompt's kind must do (`guidance`), then each principle that fits the kind (`tags`;
    all when none fit) as the question a reviewer would ask of an answer."""
    lines = [f"- {p.preference_question or p.critique_request}" for p in kind_principles(constitution, tags)]
    return PREAMBLE + (f"\n{guidance}" if guidance else "") + "\n" + "\n".join(lines)


def respond(engine: Engine, prompts: list[Prompt], sampling: Sampling) -> list[dict]:
    """Stage 1: the policy's first answer to every prompt (one batched call)."""
    gens = engine.generate([p.messages for p in prompts], sampling)
    return [
        {"prompt_id": p.id, "messages": p.messages, "category": p.category,
         **p.known(),
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


# a revision that talks about "the response" instead of being one (small models often do)
_META = re.compile(r"^\W*(the|this|my|your)\s+(previous\s+|original\s+|revised\s+|assistant'?s?\s+|last\s+)*"
                   r"(response|answer|assistant|critique|revision|statement)\b|^\W*the\s+user\b", re.I)
# or one that says what it would do instead of doing it, in its instructions' words ("Given the context and
# the warning, I would most likely decline brief and offer a safe alternative.": the 0.5B teacher, kept once)
_WOULD = re.compile(r"\bI would (most |very )?(likely |probably )?(decline|refuse)\b|\bdecline brief\b|"
                    r"^\W*given the (context|instructions?|warning|principles)\b", re.I)


def degenerate(revision: str, previous: str, finished: bool, critique: str | None = None,
               examples: tuple[str, ...] = (), category: str | None = None, request: str | None = None,
               system: str | None = None, answer: str | None = None, false_belief: str | None = None) -> str | None:
    """Why a revision is unusable, or None: empty, unchanged, truncated, repetitive, a copy
    of the critique, a copy of a worked example's text, meta (it comments on "the
    response" or "the user", or says what it would do: "I would decline"), reciting its system prompt (8 words in
    a row), or (given the prompt's category) not fitting the prompt's kind (kind_misfit)."""
    if not revision.strip():
        return "empty"
    if _norm(revision) == _norm(previous):
        return "unchanged"
    if not finished:
        return "truncated"
    if repetitive(revision):
        return "repetitive"
    if critique and copies(revision, critique):
        return "copies-critique"
    if any(copies(revision, ex) for ex in examples):
        return "copies-example"
    if _META.match(revision) or _WOULD.search(revision):
        return "meta"
    if request and copies(revision, request):
        return "copies-prompt"
    if system and shares_run(revision, system):
        return "copies-system"
    return kind_misfit(revision, category, answer, false_belief, request) if category else None


def _request(row: dict) -> str:
    """The user's words of a row's conversation (what an echo would copy)."""
    return " ".join(m["content"] for m in row["messages"] if m["role"] == "user")


def critique_revise(engine: Engine, constitution: Constitution, responses: list[dict], settings: CritiqueSettings,
                    sampling: Sampling, provenance: dict) -> tuple[list[dict], list[dict]]:
    """Stage 2: n passes of critique then revision for a shard, batched per step.

    Returns (sft_rows, critique_rows). A degenerate revision is flagged and does not
    replace the current answer; a prompt with no accepted revision gets no SFT row when
    settings.drop_degenerate (the caller counts drops from the critique rows).
    """
    if settings.mode == "principle-driven":
        return principle_driven(engine, constitution, responses, settings, sampling, provenance)
    shots = _few_shot_turns(constitution, settings.few_shot)
    examples = tuple(t for ex in constitution.few_shot[: settings.few_shot] for t in (ex.revision, ex.critique))
    current = [r["response"] for r in responses]
    accepted = [0] * len(responses)
    used: list[list[str]] = [[] for _ in responses]
    crit_rows: list[dict] = []
    for n in range(settings.passes):
        principles = [sample_principle(constitution, sampling.seed, r["prompt_id"], n,
                                       tags=settings.principle_tags.get(r.get("category") or "")) for r in responses]
        base = [shots + r["messages"] + [{"role": "assistant", "content": cur}] for r, cur in zip(responses, current)]
        ask_c = [b + [{"role": "user", "content": f"Critique request: {p.critique_request}"}] for b, p in zip(base, principles)]
        critiques = engine.generate(ask_c, sampling.derived("critique", n))
        ask_r = [
            a + [{"role": "assistant", "content": clean(c.text)},
                 {"role": "user", "content": f"Revision request: {p.revision_request}"}]
            for a, c, p in zip(ask_c, critiques, principles)
        ]
        k = settings.revision_candidates  # k samples of each revision, in one batch; the first usable one wins
        drawn = engine.generate([a for a in ask_r for _ in range(k)], sampling.derived("revise", n))
        for i, (r, p, c) in enumerate(zip(responses, principles, critiques)):
            tried = [(clean(v.text), v) for v in drawn[i * k : (i + 1) * k]]
            cat = r.get("category") if settings.fit_kind else None
            verdicts = [degenerate(t, current[i], v.finished, clean(c.text), examples, cat, _request(r),
                                   answer=r.get("answer"), false_belief=r.get("false_belief")) for t, v in tried]
            pick = next((j for j, w in enumerate(verdicts) if w is None), 0)
            text, v, why = tried[pick][0], tried[pick][1], verdicts[pick]
            crit_rows.append({
                "prompt_id": r["prompt_id"], "pass": n, "principle": p.id,
                "before": current[i], "critique": clean(c.text), "revision": text,
                "revision_tokens": v.n_tokens, "degenerate": why, "candidates": k,
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
            "initial_response": r["response"], "revisions_accepted": accepted[i], "source": "revision",
            "provenance": {**provenance, "principles": used[i]},
        })
    return sft_rows, crit_rows


_LIST_MARK = re.compile(r"(?:^|\n)\s*(?:\d+[.)]|[-*])\s*$")
_SENT_END = re.compile(r"[.!?)](?=\s)|\n")


def trim_to_sentence(text: str, min_chars: int = 40) -> str | None:
    """A cut-off answer ended at its last complete sentence (or line), or None when too
    little is left or a code block is still open: a teacher's long answer cut by the token
    budget is still a usable answer once it stops cleanly."""
    ends = [m.end() for m in _SENT_END.finditer(text + " ")]
    if not ends:
        return None
    cut = _LIST_MARK.sub("", text[: ends[-1]]).rstrip()  # a list's "1." with its item cut away
    if len(cut) < min_chars or cut.count("```") % 2:
        return None
    if cut.endswith(":"):  # "Here are the steps:" with the steps cut away
        return None
    return cut


def principle_driven(engine: Engine, constitution: Constitution, responses: list[dict], settings: CritiqueSettings,
                     sampling: Sampling, provenance: dict) -> tuple[list[dict], list[dict]]:
    """The critic answers each prompt under the constitution's principles that fit its kind
    (system prompt; settings.principle_tags: harmlessness for a harmful prompt, helpfulness
    for a benign one, so a safe-but-scary request is not met with a lecture): one candidate for every prompt in one batch, then, for the prompts where it did not fit
    (degenerate, or the wrong kind: most often a harmful request complied with), the other
    k-1 candidates in a second batch; the first usable one is kept. Drawing the extra
    candidates only where they are needed costs a fraction of k per prompt. A kept text
    that the shard already kept max_repeats times is a misfit too ('repeated').
    Returns (sft_rows, critique_rows) like critique_revise (one row per prompt, pass 0)."""
    k = settings.revision_candidates
    tags = [settings.principle_tags.get(r.get("category") or "") for r in responses]
    systems = [principles_prompt(constitution, t, settings.kind_guidance.get(r.get("category") or ""))
               for t, r in zip(tags, responses)]
    convs = [[{"role": "system", "content": s}] + [m for m in r["messages"] if m["role"] != "system"]
             for s, r in zip(systems, responses)]
    cats = [r.get("category") if settings.fit_kind else None for r in responses]

    def judged(i: int, drawn: list) -> list[tuple[str, object, str | None]]:
        out = []
        for v in drawn:
            text = v.text.strip()
            cut = None if v.finished else trim_to_sentence(text)
            text, v = (cut, dataclasses.replace(v, finished=True)) if cut else (text, v)
            out.append((text, v, degenerate(text, responses[i]["response"], v.finished, None, (), cats[i],
                                            _request(responses[i]), systems[i], responses[i].get("answer"),
                                            responses[i].get("false_belief"))))
        return out

    kept: dict[str, int] = {}  # kept answers so far in this shard, by normalized text

    def capped(cands: list) -> list:
        """The first fitting candidate counts against max_repeats; one over the cap is 'repeated'."""
        out = list(cands)
        for j, (text, v, why) in enumerate(out):
            if why is not None:
                continue
            key = _norm(text)
            if settings.max_repeats is not None and kept.get(key, 0) >= settings.max_repeats:
                out[j] = (text, v, "repeated")
                continue
            kept[key] = kept.get(key, 0) + 1
            break
        return out

    first = engine.generate(convs, sampling.derived("principle-driven"))
    tried = [capped(judged(i, [g])) for i, g in enumerate(first)]
    again = [i for i, t in enumerate(tried) if t[0][2] is not None] if k > 1 else []
    if again:
        more = engine.generate([convs[i] for i in again for _ in range(k - 1)], sampling.derived("principle-driven", "again"))
        for n, i in enumerate(again):
            tried[i] += capped(judged(i, more[n * (k - 1) : (n + 1) * (k - 1)]))
    sft_rows, crit_rows = [], []
    for i, r in enumerate(responses):
        pick = next((j for j, t in enumerate(tried[i]) if t[2] is None), 0)
        text, v, why = tried[i][pick]
        crit_rows.append({"prompt_id": r["prompt_id"], "pass": 0, "principle": "all", "before": r["response"],
                          "critique": None, "revision": text, "revision_tokens": v.n_tokens, "degenerate": why,
                          "candidates": len(tried[i]), "source": "principle-driven", "provenance": provenance})
        if why is not None and settings.drop_degenerate:
            continue
        sft_rows.append({
            "messages": r["messages"] + [{"role": "assistant", "content": text if why is None else r["response"]}],
            "prompt_id": r["prompt_id"], "category": r.get("category"), "initial_response": r["response"],
            "revisions_accepted": int(why is None), "source": "principle-driven",
            "provenance": {**provenance, "principles": [p.id for p in kind_principles(constitution, tags[i])],
                           "system_prompt": systems[i]},
        })
    return sft_rows, crit_rows
