"""Safe YAML → pydantic with errors that name file, line, column and field path.

Refuses YAML tags that construct objects, anchors/aliases (no expansion bombs),
duplicate keys, deep nesting, lone surrogates and oversized files; maps each pydantic error back to the YAML node it came from. Knows
nothing about what the models mean.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from cai.errors import InputError

MAX_BYTES = 1_000_000
MAX_DEPTH = 50  # nesting of mappings/sequences; the shipped formats need 4


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases (no 'billion laughs' expansions), nesting
    deeper than MAX_DEPTH (no RecursionError), duplicate keys (the last would silently
    win) and lone surrogates from escapes such as "\\ud800" (not writable as UTF-8)."""

    _depth = 0

    def compose_node(self, parent, index):  # type: ignore[override]
        ev = self.peek_event()
        if self.check_event(yaml.AliasEvent):
            raise yaml.MarkedYAMLError(None, None, "aliases (*name) are not allowed here; write the value out", ev.start_mark)
        if self._depth >= MAX_DEPTH:
            raise yaml.MarkedYAMLError(None, None, f"nested more than {MAX_DEPTH} levels deep; flatten the value", ev.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.ScalarNode):
            try:
                node.value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise yaml.MarkedYAMLError(None, None, f"a lone surrogate ({node.value[e.start]!a}) is not valid Unicode "
                                           "text; remove it or write the full surrogate pair", node.start_mark) from None
        return node

    def compose_mapping_node(self, anchor):  # type: ignore[override]
        node = super().compose_mapping_node(anchor)
        first: dict = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            seen = first.setdefault((key.tag, key.value), key)
            if seen is not key:
                raise yaml.MarkedYAMLError(None, None, f"duplicate key {key.value!r} (first at line {seen.start_mark.line + 1}); "
                                           "each key may appear once, remove or rename one", key.start_mark)
        return node


def read_bytes(path: Path, what: str = "file") -> bytes:
    """The bytes of a plain file, or InputError (one line). Opened without blocking and
    checked on the open descriptor: a FIFO (which would block forever), a device such as
    /dev/zero (which never ends) or a folder is refused, never read."""
    import os
    import stat

    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what}; check the path") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a {what}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise InputError(f"{path}: is a directory, expected a {what}")
        if not stat.S_ISREG(mode):
            kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "not a plain file")
            raise InputError(f"{path}: is {kind}, not a plain file; give the {what} as a plain file (copy it to one first)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def read_text(path: Path, what: str = "file") -> str:
    """Read a UTF-8 text file (a plain file only, see read_bytes) or raise InputError
    naming the bad byte's line."""
    raw = read_bytes(path, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None


def _node_at(node, loc: tuple):
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            hit = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
            if hit is None:
                return node
            node = hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
    return node


def _key_node(node, loc: tuple):
    parent = _node_at(node, loc[:-1])
    if isinstance(parent, yaml.MappingNode):
        for k, _ in parent.value:
            if getattr(k, "value", None) == loc[-1]:
                return k
    return parent


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that holds the last key of loc (for 'allowed keys')."""
    cur: typing.Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        ann = cur.model_fields[part].annotation
        for arg in (ann, *typing.get_args(ann)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                cur = arg
                break
        else:
            cur = None
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _members(ann) -> list:
    """The types of a field's annotation: a union's members (None left out), else itself."""
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(ann) if a is not type(None)]
    return [ann]


def _tag(member) -> str:
    """The name pydantic puts into an error's loc for a union member ('str', 'Gate', 'list[str]')."""
    if isinstance(member, type) and typing.get_origin(member) is None:
        return member.__name__
    return repr(member).replace("typing.", "")


def _model_in(member) -> type[BaseModel] | None:
    for arg in (member, *typing.get_args(member)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _without_union_tags(cls: type[BaseModel], loc: tuple) -> tuple[tuple, int | None, typing.Any]:
    """pydantic names the union member inside the loc of an error in a union field
    (evaluate.gate.Gate.rules[0].metric for `gate: str | Gate`): the loc without those
    names, where the union sits in it (None if none was crossed), and the member."""
    cur: typing.Any = cls
    out: list = []
    at, member = None, None
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        out.append(part)
        if isinstance(part, int) or not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            continue
        members = _members(cur.model_fields[part].annotation)
        if len(members) > 1 and parts and isinstance(parts[0], str) and parts[0] in {_tag(m) for m in members}:
            name = parts.pop(0)
            member = next(m for m in members if _tag(m) == name)
            at, members = len(out), [member]
        cur = next((m for m in map(_model_in, members) if m is not None), None)
    return tuple(out), at, member


def _fits(node, member) -> bool:
    """The YAML value is written as this union member (a mapping for a model, a list for a list)."""
    if isinstance(node, yaml.MappingNode):
        return _model_in(member) is not None and typing.get_origin(member) is None
    if isinstance(node, yaml.SequenceNode):
        return typing.get_origin(member) is list
    return _model_in(member) is None and typing.get_origin(member) is not list


def _relevant(cls: type[BaseModel], root, errors: list[dict]) -> list[tuple[tuple, dict]]:
    """(loc, error) for each error, union member names taken out of the loc; of a union
    field's errors only those of the member the YAML value is written as (a mapping under
    `gate: str | Gate` is not told it should be a string), unless no member fits."""
    found = [(err, *_without_union_tags(cls, tuple(err["loc"]))) for err in errors]
    fitting = {loc[:at] for _, loc, at, member in found if at is not None and _fits(_node_at(root, loc[:at]), member)}
    return [(loc, err) for err, loc, at, member in found
            if at is None or loc[:at] not in fitting or _fits(_node_at(root, loc[:at]), member)]


def fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _friendly(err: dict) -> str:
    kind, loc = err["type"], err["loc"]
    if kind == "missing":
        return f"missing required key '{loc[-1]}'"
    if kind == "string_pattern_mismatch":
        return f"{err['input']!r} is not a valid id: use only lowercase a-z, 0-9, '-' and '_'"
    if kind == "too_short":
        return "must not be empty" + ("; add at least one principle" if loc == ("principles",) else "")
    if kind == "greater_than":
        return f"must be greater than {err['ctx']['gt']} (got {err['input']})"
    return err["msg"]


def parse(text: str, source: str, cls: type[BaseModel], what: str = "file"):
    """Parse YAML text into cls; InputError with one line per problem."""
    if len(text.encode()) > MAX_BYTES:
        raise InputError(f"{source}: file is larger than {MAX_BYTES} bytes; a {what} should be small")
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
    except RecursionError:  # MAX_DEPTH stops this first; kept as a guard
        raise InputError(f"{source}: invalid YAML: nested too deeply; flatten the value") from None
    if data is None:
        raise InputError(f"{source}: the file is empty; expected a {what}")
    if not isinstance(data, dict):
        raise InputError(f"{source}:1:1: expected a mapping of keys for a {what}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        problems = []
        for loc, err in _relevant(cls, root, e.errors()):
            if err["type"] == "value_error":
                # cross-field checks put the path first: "principles[2].id: ..."
                msg = err["msg"].removeprefix("Value error, ")
                m = re.match(r"^(\w+)\[(\d+)\]\.(\w+): ", msg)
                if m:
                    loc, msg = (m.group(1), int(m.group(2)), m.group(3)), msg[m.end():]
                node = _node_at(root, loc)
            elif err["type"] == "extra_forbidden":
                node = _key_node(root, loc)
                holder = _model_at(cls, loc[:-1])
                allowed = list(holder.model_fields) if holder else []
                msg = f"unknown key '{loc[-1]}'" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
            else:
                node = _node_at(root, loc)
                msg = _friendly(err)
            mark = node.start_mark if node is not None else None
            where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
            problems.append(f"{where}: {fmt_loc(loc)}: {msg}")
        raise InputError(problems) from None
