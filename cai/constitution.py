"""Constitution: pydantic models for the YAML, safe loading, content hash, diff.

Knows the YAML contract of DESIGN.md and how to report a problem with file, line,
column and field path. Does not know about models, prompts or rounds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from cai import yamlio

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
    follow_prompt: Text | None = Field(
        None, description="Contrastive pairs (RLCD): a system prompt asking to follow this principle; give with violate_prompt."
    )
    violate_prompt: Text | None = Field(
        None, description="Contrastive pairs (RLCD): a system prompt asking for the opposite; give with follow_prompt."
    )

    @model_validator(mode="after")
    def _both_prompts(self) -> "Principle":
        if (self.follow_prompt is None) != (self.violate_prompt is None):
            have, lack = ("follow_prompt", "violate_prompt") if self.violate_prompt is None else ("violate_prompt", "follow_prompt")
            raise ValueError(f"{have} is given but {lack} is not; give both (contrastive pairs need the two) or neither")
        return self


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
        data = self.model_dump(mode="json")
        for p in data["principles"]:  # optional keys added later: absent ones leave older hashes unchanged
            for key in ("follow_prompt", "violate_prompt"):
                if p.get(key) is None:
                    p.pop(key, None)
        canon = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()

    def principle(self, pid: str) -> Principle:
        return next(p for p in self.principles if p.id == pid)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100)


# ---------------------------------------------------------------- loading


def parse(text: str, source: str = "<string>") -> Constitution:
    """Parse and validate constitution YAML text; InputError lists every problem."""
    return yamlio.parse(text, source, Constitution, what="constitution")


def load(path: str | Path) -> Constitution:
    """Load and validate a constitution file."""
    path = Path(path)
    return parse(yamlio.read_text(path, "constitution file"), str(path))


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
