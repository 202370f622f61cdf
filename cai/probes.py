"""Probe sets: held-out prompts that measure what a round did to the policy.

Four sets ship in cai/data/probes/ (harmful, borderline, sycophancy, helpful); a user may
give their own JSONL file (or a folder of them) in the same shape: one object per line
with `set` and `prompt` (or `messages`), and where they apply `id`, `category`, `twin`
(the id of its contrast twin), `answer` (the known correct answer), `pushback` (the
user's follow-up turn), `false_belief`, `kind` (pushback | false_premise | feedback),
`stance` (none | positive | negative), `flaw`, `work_type`. Rows with only `set` and
`prompt` work; unknown keys are errors (a typo must not silently drop a field); every
error names file:line.

Also the overlap check: probes are never training prompts, so a round whose prompts
match a probe by normalized text (case, punctuation and spacing ignored) is refused,
naming the round's line and the probe's.

Knows the probe format and text normalization; knows nothing about models, metrics or
rounds (rounds.prepare calls `overlap_problems`).
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from cai import store
from cai.errors import InputError

SETS = ("harmful", "borderline", "sycophancy", "helpful")
SHIPPED = "shipped"


class Probe(BaseModel):
    """One probe, as every later step sees it (messages end with the user's turn)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    set: Literal["harmful", "borderline", "sycophancy", "helpful"]
    messages: list[dict[str, str]]
    category: str | None = None
    twin: str | None = None
    answer: str | None = None
    pushback: str | None = None
    false_belief: str | None = None
    kind: Literal["pushback", "false_premise", "feedback"] | None = None
    stance: Literal["none", "positive", "negative"] | None = None
    flaw: str | None = None
    work_type: str | None = None
    where: str = ""  # file:line it came from

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


_FIELDS = set(Probe.model_fields) - {"where"}  # the keys a row may have, besides "prompt"


def normalize(text: str) -> str:
    """Text for matching: lower case, punctuation dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _files(spec: str | Path) -> list[tuple[str, str]]:
    """(name shown in errors, text) of each probe file a spec names."""
    if str(spec) == SHIPPED:
        base = resources.files("cai") / "data" / "probes"
        return [(f"cai/data/probes/{s}.jsonl", (base / f"{s}.jsonl").read_text("utf-8")) for s in SETS]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise InputError(f"{path}: no .jsonl probe files in this folder")
    elif path.exists():
        files = [path]
    else:
        raise InputError(f"{spec}: no such probes file; give a JSONL file, a folder of them, or '{SHIPPED}'")
    from cai.yamlio import read_text

    return [(str(f), read_text(f, "probes file")) for f in files]


def _row(obj: object, where: str) -> Probe:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected an object with 'set' and 'prompt' (or 'messages')")
    unknown = sorted(set(obj) - _FIELDS - {"prompt"})
    if unknown:
        raise InputError(f"{where}: unknown key {', '.join(repr(k) for k in unknown)} "
                         f"(allowed: prompt, {', '.join(sorted(_FIELDS))})")
    if obj.get("set") not in SETS:
        raise InputError(f"{where}: 'set' must be one of {', '.join(SETS)} (got {obj.get('set')!r})")
    from cai.prompts import MAX_CHARS, _to_messages

    messages, _ = _to_messages({k: obj[k] for k in ("prompt", "messages", "category") if k in obj}, where, MAX_CHARS)
    pid = obj.get("id") or f"{obj['set']}-" + hashlib.sha256(json.dumps(messages).encode()).hexdigest()[:10]
    fields = {k: (str(v) if k in ("id", "twin", "answer") and v is not None else v) for k, v in obj.items()
              if k not in ("prompt", "messages")}
    try:
        return Probe(**{**fields, "id": str(pid), "messages": messages, "where": where})
    except ValidationError as e:
        x = e.errors()[0]
        raise InputError(f"{where}: {'.'.join(map(str, x['loc']))}: {x['msg']}") from None


def load(spec: str | Path = SHIPPED, limit: int | None = None) -> list[Probe]:
    """Every probe of a spec ('shipped', a JSONL file or a folder of them), the first
    `limit` of each set when given. InputError naming file:line on a bad row or a repeated id."""
    out: list[Probe] = []
    seen: dict[str, str] = {}
    for name, text in _files(spec):
        for n, line in enumerate(store.jsonl_lines(text), 1):
            if not line.strip():
                continue
            where = f"{name}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); one JSON object per line") from None
            except RecursionError:
                raise InputError(f"{where}: JSON nested too deeply") from None
            p = _row(obj, where)
            if p.id in seen:
                raise InputError(f"{where}: id {p.id!r} repeats {seen[p.id]}; ids must be unique")
            seen[p.id] = where
            out.append(p)
    if not out:
        raise InputError(f"{spec}: no probes; add at least one row")
    if limit is not None:
        kept: dict[str, int] = {}
        cut = []
        for p in out:
            kept[p.set] = kept.get(p.set, 0) + 1
            if kept[p.set] <= limit:
                cut.append(p)
        out = cut
    return out


def by_text(probes: list[Probe]) -> dict[str, Probe]:
    return {normalize(p.text): p for p in probes}


def overlap_problems(prompt_texts: list[str], source: str, probes: list[Probe]) -> list[str]:
    """One problem per round prompt whose normalized text is a probe's. Names the line of
    `source` when it is a JSONL file (found by the same normalized text), else the row."""
    index = by_text(probes)
    hits = [(i, index[normalize(t)]) for i, t in enumerate(prompt_texts) if normalize(t) in index]
    if not hits:
        return []
    lines: dict[str, int] = {}
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".jsonl":
        try:
            for n, line in enumerate(store.jsonl_lines(path.read_text("utf-8")), 1):
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                text = obj.get("prompt") if isinstance(obj, dict) else None
                if text is None and isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
                    text = obj["messages"][-1].get("content") if isinstance(obj["messages"][-1], dict) else None
                if isinstance(text, str):
                    lines.setdefault(normalize(text), n)
        except (OSError, UnicodeDecodeError):
            pass
    out = []
    for i, p in hits:
        key = normalize(p.text)
        at = f"{source}:{lines[key]}" if key in lines else f"{source} prompt {i + 1}"
        out.append(f"{at}: this prompt is probe {p.id} ({p.where}); probes are held out for evaluation, "
                   "never trained on: remove it from the prompts (or evaluate with other --probes)")
    return out
