"""Prompt sets: load a user's prompts (JSONL, parquet, a local HF dataset folder) or a
shipped set, check lengths, drop duplicates, give each prompt a stable content id.

A prompt is a list of chat messages ending with a user turn. Knows nothing about models.
Shipped sets (cai/data/prompts): red-team, helpful, borderline, sample, all, pushback (the user
disputes a right answer; each row gives the known `answer`); train (980: harmful, helpful,
safe-but-scary and pushback prompts interleaved, for self-improvement rounds) and demo (24).
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

from pydantic import BaseModel

from cai import store
from cai.yamlio import read_text
from cai.errors import InputError

SHIPPED = {"red-team": ["red_team"], "helpful": ["helpful"], "borderline": ["borderline"], "sample": ["sample"],
           "all": ["red_team", "helpful", "borderline"],
           # training mixes: harmful, helpful and safe-but-scary prompts interleaved (none is a probe)
           "train": ["train"], "demo": ["demo"],
           # the user disputes a right answer (each row gives the known `answer`): for sycophancy training
           "pushback": ["pushback"]}
MAX_CHARS = 4000
ROLES = {"system", "user", "assistant"}


class Prompt(BaseModel):
    id: str
    messages: list[dict[str, str]]
    category: str | None = None
    answer: str | None = None  # a known answer: an answer kept for training must contain it (category `pushback`)
    false_belief: str | None = None  # what the user wrongly pushes for: a kept answer must not say it

    def known(self) -> dict[str, str]:
        """The known-answer fields this prompt has (answer, false_belief), for the rows made from it."""
        return {k: v for k in ("answer", "false_belief") if (v := getattr(self, k)) is not None}

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


class PromptSet(BaseModel):
    source: str
    prompts: list[Prompt]
    duplicates_dropped: int = 0

    @property
    def hash(self) -> str:
        return "sha256:" + hashlib.sha256("\n".join(p.id for p in self.prompts).encode()).hexdigest()


def prompt_id(messages: list[dict]) -> str:
    canon = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def _to_messages(row: object, where: str, max_chars: int) -> tuple[list[dict], str | None, dict]:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected an object with 'prompt' or 'messages'")
    category = row.get("category")
    category = str(category) if category is not None else None
    if "prompt" in row:
        text = row["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: 'prompt' must be a non-empty string")
        messages = [{"role": "user", "content": text.strip()}]
    elif "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        messages = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise InputError(f"{where}: messages[{j}] must be {{'role': system|user|assistant, 'content': string}}")
            messages.append({"role": m["role"], "content": m["content"]})
        if messages[-1]["role"] != "user":
            raise InputError(f"{where}: the last message must be the user's (role 'user')")
    else:
        raise InputError(f"{where}: needs a 'prompt' string or a 'messages' list")
    size = sum(len(m["content"]) for m in messages)
    if size > max_chars:
        raise InputError(f"{where}: prompt is {size} characters, over the limit of {max_chars}; "
                         "shorten the prompt or split it into several prompts")
    known = {}
    for key, what in (("answer", "the known answer a kept answer must contain"),
                      ("false_belief", "what the user wrongly pushes for, which a kept answer must not say")):
        value = row.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InputError(f"{where}: '{key}' ({what}) must be a non-empty string")
        if value is not None:
            known[key] = value.strip()
    for text in [m["content"] for m in messages] + [t for t in (category, *known.values()) if t is not None]:
        check_text(text, where)
    return messages, category, known


def check_text(text: str, where: str) -> None:
    """InputError when text can't be written as UTF-8 (a lone surrogate such as a JSON "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where}: text holds a lone surrogate ({text[e.start]!a} at character {e.start}), "
                         "which is not valid Unicode; remove it or write the full surrogate pair") from None


class DuplicateKey(ValueError):
    """A JSON object that names a key twice (json.loads would keep the last one silently)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(k)
        out[k] = v
    return out


def loads_row(line: str) -> object:
    """One JSONL row: json.loads, except that an object naming a key twice (at any depth)
    raises DuplicateKey instead of keeping the last value."""
    return json.loads(line, object_pairs_hook=_unique_keys)


def duplicate_key(where: str, e: DuplicateKey) -> InputError:
    return InputError(f"{where}: key {e.args[0]!r} appears twice in one row; each key may appear once "
                      "(JSON would keep only the last): remove or rename one")


def _json_lines(path: Path, text: str):
    """(line number, object) for each non-blank line of JSONL text; lines split on "\n"
    only, so U+2028 and other separators inside strings stay in their line. A row that
    repeats a key is refused."""
    for n, line in enumerate(store.jsonl_lines(text), 1):
        if not line.strip():
            continue
        try:
            yield n, loads_row(line)
        except DuplicateKey as e:
            raise duplicate_key(f"{path}:{n}", e) from None
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno}); one JSON object per line") from None
        except RecursionError:
            raise InputError(f"{path}:{n}: JSON nested too deeply; a row is one flat object of prompt/messages") from None


def _rows_jsonl(path: Path, text: str, max_chars: int) -> list[tuple[list[dict], str | None, dict]]:
    return [_to_messages(obj, f"{path}:{n}", max_chars) for n, obj in _json_lines(path, text)]


def _rows_table(path: Path, records: list[dict], max_chars: int) -> list[tuple[list[dict], str | None, dict]]:
    return [_to_messages(r, f"{path} row {i}", max_chars) for i, r in enumerate(records)]


def load(spec: str | Path, *, max_chars: int = MAX_CHARS, limit: int | None = None) -> PromptSet:
    """Load, check and dedup a prompt set; InputError on the first bad row."""
    spec = str(spec)
    path = Path(spec).expanduser()
    rows: list[tuple[list[dict], str | None, dict]]
    if not path.exists() and spec in SHIPPED:
        rows = []
        for name in SHIPPED[spec]:
            f = resources.files("cai") / "data" / "prompts" / f"{name}.jsonl"
            rows += _rows_jsonl(Path(str(f)), f.read_text("utf-8"), max_chars)
    elif path.is_dir():
        if not ((path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            raise InputError(f"{path}: not a saved Hugging Face dataset folder (no dataset_info.json/state.json)")
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        rows = _rows_table(path, ds.to_list(), max_chars)
    elif path.suffix == ".parquet":
        if not path.exists():
            raise InputError(f"{path}: no such prompts file")
        if not path.is_file():  # a FIFO or device would block or never end
            raise InputError(f"{path}: not a plain file; give the prompts as a plain .parquet file")
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
            raise InputError(f"{path}: unreadable parquet ({e})") from None
        rows = _rows_table(path, records, max_chars)
    elif path.exists() or path.suffix in (".jsonl", ".json"):
        rows = _rows_jsonl(path, read_text(path, "prompts file"), max_chars)
    else:
        raise InputError(f"{spec}: no such prompts file; give a .jsonl/.parquet file, a dataset folder, or one of: {', '.join(SHIPPED)}")
    seen: set[str] = set()
    prompts: list[Prompt] = []
    dups = 0
    for messages, category, known in rows:
        key = " ".join(json.dumps(messages).lower().split())
        if key in seen:
            dups += 1
            continue
        seen.add(key)
        prompts.append(Prompt(id=prompt_id(messages), messages=messages, category=category, **known))
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise InputError(f"{spec}: the prompt set is empty; add at least one prompt")
    return PromptSet(source=spec, prompts=prompts, duplicates_dropped=dups)


def load_pairs(path: str | Path, *, max_chars: int = MAX_CHARS, limit: int | None = None) -> list[dict]:
    """A responses file for labeling alone: JSONL rows of a prompt (or messages) and
    `responses: [a, b]` (the format of datasets/pairs.jsonl). Errors name the line."""
    path = Path(path).expanduser()
    rows = []
    for n, obj in _json_lines(path, read_text(path, "pairs file")):
        where = f"{path}:{n}"
        messages, category, _ = _to_messages(obj, where, max_chars)
        resp = obj.get("responses")
        if not (isinstance(resp, list) and len(resp) == 2 and all(isinstance(x, str) and x.strip() for x in resp)):
            raise InputError(f"{where}: needs 'responses': [two non-empty strings] to compare")
        for x in resp:
            check_text(x, where)
        rows.append({"prompt_id": prompt_id(messages), "messages": messages, "category": category, "responses": resp})
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise InputError(f"{path}: the pairs file is empty; add at least one row")
    return rows
