"""Constitution: pydantic models for the YAML, safe loading, content hash, diff.

Knows the YAML contract of DESIGN.md and how to report a problem with file, line,
column and field path. Does not know about models, prompts or rounds.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from cai.errors import InputError

MAX_BYTES = 1_000_000
Id = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]+$", min_length=1, max_length=64)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Tag = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]+$")]


class Principle(BaseModel):
    """One principle: how to critique, how to revise, and how to compare two responses."""

    model_config = ConfigDict(extra="forbid")

    id: Id
    critique_request: Text
    revision_request: Text
    preference_question: Text | None = Field(
        None, description="Asked for A/B feedback; needed by the label stage."
    )
    weight: float = Field(1.0, gt=0, description="Sampling weight, > 0.")
    tags: list[Tag] = Field(default_factory=list)


class FewShot(BaseModel):
    """A worked example: a flawed response, its critique and its revision."""

    model_config = ConfigDict(extra="forbid")

    principle: Id | None = Field(None, description="Id of the principle the critique applies.")
    prompt: Text
    response: Text
    critique: Text
    revision: Text


class Constitution(BaseModel):
    """A named list of principles plus optional worked examples."""

    model_config = ConfigDict(extra="forbid")

    name: Id
    description: str = ""
    principles: list[Principle] = Field(min_length=1)
    few_shot: list[FewShot] = Field(default_factory=list)

    @model_validator(mode="after")
    def _ids(self) -> "Constitution":
        seen: set[str] = set()
        for i, p in enumerate(self.principles):
            if p.id in seen:
                raise ValueError(f"principles[{i}].id: duplicate principle id '{p.id}'; ids must be unique")
            seen.add(p.id)
        for i, ex in enumerate(self.few_shot):
            if ex.principle is not None and ex.principle not in seen:
                raise ValueError(
                    f"few_shot[{i}].principle: '{ex.principle}' is not a principle id "
                    f"(known: {', '.join(sorted(seen))})"
                )
        return self

    @property
    def hash(self) -> str:
        """Canonical content hash: the constitution's version."""
        canon = json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()

    def principle(self, pid: str) -> Principle:
        return next(p for p in self.principles if p.id == pid)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100)


# ---------------------------------------------------------------- loading


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases (no 'billion laughs' expansions)."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            raise yaml.MarkedYAMLError(
                None, None, "aliases (*name) are not allowed in a constitution; write the text out", ev.start_mark
            )
        return super().compose_node(parent, index)


def _node_at(node: yaml.Node | None, loc: tuple) -> yaml.Node | None:
    """The YAML node at a pydantic error location (as deep as it exists)."""
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            nxt = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if nxt is None:
                key = next((k for k, v in node.value if getattr(k, "value", None) == part), None)
                return key or node
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
    return node


def _key_node(node: yaml.Node | None, loc: tuple) -> yaml.Node | None:
    """For 'extra key' errors: the key node itself, so the line points at the typo."""
    parent = _node_at(node, loc[:-1])
    if isinstance(parent, yaml.MappingNode):
        for k, _ in parent.value:
            if getattr(k, "value", None) == loc[-1]:
                return k
    return parent


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


_ALLOWED = {
    "Constitution": list(Constitution.model_fields),
    "Principle": list(Principle.model_fields),
    "FewShot": list(FewShot.model_fields),
}


def _allowed_for(loc: tuple) -> list[str]:
    if len(loc) == 1:
        return _ALLOWED["Constitution"]
    if loc[0] == "principles":
        return _ALLOWED["Principle"]
    if loc[0] == "few_shot":
        return _ALLOWED["FewShot"]
    return []


def read_text(path: Path, what: str = "file") -> str:
    """Read a UTF-8 text file or raise InputError naming the bad byte's line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what}; check the path") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a {what}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None


def _friendly(err: dict, msg: str) -> str:
    kind = err["type"]
    if kind == "missing":
        return f"missing required key '{err['loc'][-1]}'"
    if kind == "string_pattern_mismatch":
        return f"{err['input']!r} is not a valid id: use only lowercase a-z, 0-9, '-' and '_'"
    if kind == "too_short":
        return "must not be empty" + ("; add at least one principle" if err["loc"] == ("principles",) else "")
    if kind == "greater_than":
        return f"must be greater than 0 (got {err['input']})"
    return msg


def parse(text: str, source: str = "<string>") -> Constitution:
    """Parse and validate constitution YAML text; InputError lists every problem."""
    if len(text.encode()) > MAX_BYTES:
        raise InputError(f"{source}: file is larger than {MAX_BYTES} bytes; a constitution should be small")
    try:
        root = yaml.compose(text, Loader=_NoAliasLoader)
        data = yaml.load(text, Loader=_NoAliasLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        msg = (e.problem or str(e)).strip()
        if isinstance(e, yaml.constructor.ConstructorError) and "tag" in msg:
            msg = f"{msg}; YAML tags that construct objects are not allowed, use plain strings"
        raise InputError(f"{where}: invalid YAML: {msg}") from None
    except yaml.YAMLError as e:
        raise InputError(f"{source}: invalid YAML: {e}") from None
    if data is None:
        raise InputError(f"{source}: the file is empty; a constitution needs name and principles")
    if not isinstance(data, dict):
        raise InputError(f"{source}:1:1: expected a mapping with keys name, principles, ...")
    try:
        return Constitution.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(err["loc"])
            msg = err["msg"]
            if err["type"] == "value_error":
                # our own cross-field checks put the path first: "principles[2].id: ..."
                msg = msg.removeprefix("Value error, ")
                m = re.match(r"^(\w+)\[(\d+)\]\.(\w+): ", msg)
                if m:
                    loc = (m.group(1), int(m.group(2)), m.group(3))
                    msg = msg[m.end():]
            if err["type"] == "extra_forbidden":
                node = _key_node(root, loc)
                allowed = _allowed_for(loc)
                msg = f"unknown key '{loc[-1]}'" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
            else:
                node = _node_at(root, loc)
                msg = _friendly(err, msg)
            mark = node.start_mark if node is not None else None
            where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
            problems.append(f"{where}: {_fmt_loc(loc)}: {msg}")
        raise InputError(problems) from None


def load(path: str | Path) -> Constitution:
    """Load and validate a constitution file."""
    path = Path(path)
    return parse(read_text(path, "constitution file"), str(path))


def json_schema() -> dict[str, Any]:
    schema = Constitution.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "cai constitution"
    return schema


# ---------------------------------------------------------------- diff


def diff(a: Constitution, b: Constitution) -> dict[str, Any]:
    """Principles added, removed and changed (with the changed fields) from a to b."""
    pa = {p.id: p for p in a.principles}
    pb = {p.id: p for p in b.principles}
    changed = {}
    for pid in pa.keys() & pb.keys():
        da, db = pa[pid].model_dump(), pb[pid].model_dump()
        fields = {k: {"from": da[k], "to": db[k]} for k in da if da[k] != db[k]}
        if fields:
            changed[pid] = fields
    return {
        "from": {"name": a.name, "hash": a.hash},
        "to": {"name": b.name, "hash": b.hash},
        "added": [pid for pid in pb if pid not in pa],
        "removed": [pid for pid in pa if pid not in pb],
        "changed": dict(sorted(changed.items())),
        "description_changed": a.description != b.description,
        "few_shot_changed": a.few_shot != b.few_shot,
    }
