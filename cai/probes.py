"""Probe sets: held-out prompts that measure what a round did to the policy.

Four sets ship in cai/data/probes/ (harmful, borderline, sycophancy, helpful); a user may
give their own JSONL file (or a folder of them) in the same shape: one object per line
with `set` and `prompt` (or `messages`), and where they apply `id`, `category`, `twin`
(the id of its contrast twin), `answer` (the known correct answer), `pushback` (the
user's follow-up turn), `false_belief`, `kind` (pushback | false_premise | feedback),
`stance` (none | positive | negative), `flaw`, `work_type`, `benchmark` (the standard
benchmark a row is from). Rows with only `set` and `prompt` work; unknown keys are errors
(a typo must not silently drop a field); every error names file:line.

Standard benchmarks ship beside them as harmful sets, vendored with their licenses
(cai/data/probes/LICENSES/) and described in cai/data/probes/benchmarks.json (name,
upstream version, carrier package, license, citation, named subsets): HarmBench's 200
standard behaviours (`harmbench`, `harmbench:test`, `harmbench:val`) and StrongREJECT's 313
forbidden prompts (`strongreject`, `strongreject:small`, `strongreject:custom`). A probes
spec is 'shipped', a shipped set's name, a benchmark (or benchmark:subset), a JSONL file or
a folder of them, or several of these joined by commas ("shipped,harmbench").

Also the overlap check: probes are never training prompts, so a round whose prompts
match a probe by normalized text (case, punctuation and spacing ignored) is refused,
naming the round's line and the probe's.

Knows the probe format and text normalization; knows nothing about models, metrics or
rounds (rounds.prepare calls `overlap_problems`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

from cai import store
from cai.errors import InputError
from cai.prompts import DuplicateKey, duplicate_key, loads_row

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
    benchmark: str | None = None  # e.g. "harmbench": limits count it as its own set; the report names its version
    where: str = ""  # file:line it came from

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


_FIELDS = set(Probe.model_fields) - {"where"}  # the keys a row may have, besides "prompt"


def normalize(text: str) -> str:
    """Text for matching: lower case, punctuation dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def contains(text: str, answer: str) -> bool:
    """The known answer appears in the text (normalized: case, punctuation, spacing)."""
    a = normalize(answer)
    return bool(a) and f" {a} " in f" {normalize(text)} "


@functools.cache
def benchmarks() -> dict[str, dict]:
    """The shipped benchmarks' manifest (cai/data/probes/benchmarks.json), by name."""
    return json.loads((resources.files("cai") / "data" / "probes" / "benchmarks.json").read_text("utf-8"))


def _names() -> str:
    subsets = [f"{b}:{s}" for b, m in benchmarks().items() for s in m.get("subsets", {})]
    return ", ".join([SHIPPED, *SETS, *benchmarks(), *subsets])


def _parts(spec: str | Path) -> list[str]:
    """The entries of a spec: one, or several joined by commas (a path that exists is one entry)."""
    text = str(spec)
    if "," not in text or Path(text).expanduser().exists():
        return [text]
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise InputError(f"{spec}: an empty entry in the probes list; join entries with single commas, "
                         f"e.g. 'shipped,harmbench'")
    return parts


def absolute(spec: str) -> str:
    """The spec with each entry that is an existing path made absolute (names stay as they are)."""
    out = []
    for part in _parts(spec):
        named = part == SHIPPED or part in SETS or part.split(":", 1)[0] in benchmarks()
        out.append(part if named or not Path(part).expanduser().exists() else str(Path(part).expanduser().resolve()))
    return ",".join(out)


def _files(spec: str | Path) -> list[tuple[str, str, set[str] | None]]:
    """(name shown in errors, text, the ids kept or None for all) of each probe file a spec
    names; a file named twice is read once (subsets of one benchmark join)."""
    out: dict[str, tuple[str, set[str] | None]] = {}
    for part in _parts(spec):
        for name, text, ids in _entry(part):
            if name in out:
                before = out[name][1]
                ids = None if before is None or ids is None else before | ids
            out[name] = (text, ids)
    return [(name, text, ids) for name, (text, ids) in out.items()]


def _entry(spec: str) -> list[tuple[str, str, set[str] | None]]:
    base = resources.files("cai") / "data" / "probes"

    def shipped(file: str, ids: set[str] | None = None) -> tuple[str, str, set[str] | None]:
        return f"cai/data/probes/{file}", (base / file).read_text("utf-8"), ids

    if spec == SHIPPED:
        return [shipped(f"{s}.jsonl") for s in SETS]
    if spec in SETS:
        return [shipped(f"{spec}.jsonl")]
    name, _, subset = spec.partition(":")
    if name in benchmarks():
        m = benchmarks()[name]
        if not subset:
            return [shipped(m["file"])]
        if subset not in m.get("subsets", {}):
            raise InputError(f"{spec}: {name} has no subset {subset!r} "
                             f"(subsets: {', '.join(m.get('subsets', {})) or 'none'})")
        return [shipped(m["file"], set(m["subsets"][subset]))]
    return [(name, text, None) for name, text in _paths(spec)]


def _paths(spec: str) -> list[tuple[str, str]]:
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise InputError(f"{path}: no .jsonl probe files in this folder")
    elif path.exists():
        files = [path]
    else:
        raise InputError(f"{spec}: no such probes file; give a JSONL file, a folder of them, or a name "
                         f"({_names()}); join several with commas")
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

    messages, _, _ = _to_messages({k: obj[k] for k in ("prompt", "messages", "category") if k in obj}, where, MAX_CHARS)
    pid = obj.get("id") or f"{obj['set']}-" + hashlib.sha256(json.dumps(messages).encode()).hexdigest()[:10]
    fields = {k: (str(v) if k in ("id", "twin", "answer") and v is not None else v) for k, v in obj.items()
              if k not in ("prompt", "messages")}
    if obj["set"] == "sycophancy":
        fields["kind"] = _sycophancy_kind(obj, where)
    try:
        return Probe(**{**fields, "id": str(pid), "messages": messages, "where": where})
    except ValidationError as e:
        x = e.errors()[0]
        raise InputError(f"{where}: {'.'.join(map(str, x['loc']))}: {x['msg']}") from None


def _sycophancy_kind(obj: dict, where: str) -> object:
    """A sycophancy probe's kind: as given, or inferred from the fields that say it
    ('pushback' -> pushback, 'false_belief' -> false_premise, 'stance' -> feedback). A probe
    that no sycophancy metric would score is refused rather than silently left out."""
    kind = obj.get("kind")
    if kind is None:
        kind = ("pushback" if obj.get("pushback") else "false_premise" if obj.get("false_belief")
                else "feedback" if obj.get("stance") is not None else None)
    if kind is None:
        raise InputError(f"{where}: a sycophancy probe needs 'kind' (pushback, false_premise or feedback) or the "
                         "fields that say it ('pushback' with 'answer', 'false_belief', or 'stance'); as it is, no "
                         "metric scores it")
    if kind == "pushback" and not (obj.get("answer") and obj.get("pushback")):
        raise InputError(f"{where}: a pushback probe needs 'answer' (the known right answer) and 'pushback' (the "
                         "user's follow-up turn); without them no metric scores it")
    return kind


def load(spec: str | Path = SHIPPED, limit: int | Mapping[str, int] | None = None) -> list[Probe]:
    """Every probe of a spec (see the module's doc), cut by `limit` when given: an int keeps
    the first N of each set, a mapping ({"harmful": 16, "harmbench": 32, ...}) the first N of
    each set it names (0 drops a set; a set it does not name is kept whole). A benchmark
    counts as a set of its own: its key caps it, else its set's key does (a separate N of
    it), and its cut is spread over its categories. InputError naming file:line on a bad row
    or a repeated id, and on a bad limit."""
    out: list[Probe] = []
    seen: dict[str, str] = {}
    for name, text, ids in _files(spec):
        for n, line in enumerate(store.jsonl_lines(text), 1):
            if not line.strip():
                continue
            where = f"{name}:{n}"
            try:
                obj = loads_row(line)
            except DuplicateKey as e:
                raise duplicate_key(where, e) from None
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); one JSON object per line") from None
            except RecursionError:
                raise InputError(f"{where}: JSON nested too deeply") from None
            p = _row(obj, where)
            if ids is not None and p.id not in ids:
                continue
            if p.id in seen:
                raise InputError(f"{where}: id {p.id!r} repeats {seen[p.id]}; ids must be unique")
            seen[p.id] = where
            out.append(p)
    if not out:
        raise InputError(f"{spec}: no probes; add at least one row")
    if limit is not None:
        out = _limited(out, limit)
        if not out:
            raise InputError(f"{spec}: the limit {limit} keeps no probes")
    return out


def check_limit(limit: object, known: set[str] | None = None) -> None:
    """InputError unless `limit` is None, an int >= 1, or a mapping of set name to an int >= 0
    whose keys are shipped sets or benchmarks (or in `known`; with known=None keys are not
    checked: a user's file may name its own benchmark)."""
    if limit is None:
        return
    if isinstance(limit, Mapping):
        names = None if known is None else set(SETS) | set(benchmarks()) | set(known)
        for k, v in limit.items():
            if names is not None and k not in names:
                raise InputError(f"probe limit: unknown set {k!r} (sets: {', '.join(sorted(names))})")
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"probe limit: {k}: expected a whole number >= 0 (got {v!r})")
    elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InputError(f"probe limit: expected a whole number >= 1 or a mapping of set to number (got {limit!r})")


def parse_limit(text: str) -> int | dict[str, int]:
    """A command line's limit: "16" (each set) or "harmful=16,borderline=16,sycophancy=8"."""
    text = text.strip()
    if text.isdigit():
        out: int | dict[str, int] = int(text)
    else:
        out = {}
        for part in text.split(","):
            k, sep, v = (x.strip() for x in part.partition("="))
            if not sep or not k or not v.isdigit():
                raise InputError(f"probe limit: {part.strip()!r}: expected SET=N (e.g. harmful=16,borderline=16) or one number")
            if k in out:
                raise InputError(f"probe limit: {k} given twice")
            out[k] = int(v)
    check_limit(out, known=set())
    return out


def _limited(probes: list[Probe], limit: int | Mapping[str, int]) -> list[Probe]:
    """The probes a limit keeps, in their order (see load)."""
    check_limit(limit, known={p.benchmark for p in probes if p.benchmark})
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(probes):
        groups.setdefault(p.benchmark or p.set, []).append(i)
    keep: set[int] = set()
    for idx in groups.values():
        p = probes[idx[0]]
        if not isinstance(limit, Mapping):
            n = limit
        else:
            n = limit.get(p.benchmark) if p.benchmark in limit else limit.get(p.set)
        if n is None or n >= len(idx):
            keep.update(idx)
        elif p.benchmark:  # round-robin over its categories, each in file order: a cut keeps every category
            by_cat: dict[str | None, list[int]] = {}
            for i in idx:
                by_cat.setdefault(probes[i].category, []).append(i)
            spread = [i for rank in zip(*(c + [None] * (len(idx) - len(c)) for c in by_cat.values()))
                      for i in rank if i is not None]
            keep.update(spread[:n])
        else:
            keep.update(idx[:n])
    return [p for i, p in enumerate(probes) if i in keep]


def describe(probes: list[Probe]) -> list[dict]:
    """For the report: each benchmark the probes hold, with the shipped copy's name, version,
    upstream, carrier, license and citation (from benchmarks.json; only for rows read from
    the shipped file), how many of its probes were evaluated and how many of those lie in
    each named subset (so a figure can be set beside a published one)."""
    out: dict[str, dict] = {}
    for p in probes:
        if not p.benchmark:
            continue
        if p.benchmark not in out:
            m = benchmarks().get(p.benchmark)
            mine = m is not None and p.where.startswith(f"cai/data/probes/{m['file']}:")
            out[p.benchmark] = {"benchmark": p.benchmark, **({k: m[k] for k in (
                "name", "version", "what", "upstream", "carriers", "license", "citation", "count")} if mine else
                {"name": p.benchmark, "version": None, "source": p.where.rsplit(":", 1)[0]}), "evaluated": 0}
            out[p.benchmark]["_ids"] = []
        out[p.benchmark]["evaluated"] += 1
        out[p.benchmark]["_ids"].append(p.id)
    for name, d in out.items():
        ids = set(d.pop("_ids"))
        if "count" in d:
            d["subsets"] = {s: len(ids & set(v)) for s, v in benchmarks()[name].get("subsets", {}).items()}
    return list(out.values())


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
