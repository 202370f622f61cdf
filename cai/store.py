"""Artifact store: round folders, atomic writes, JSONL helpers.

Every output is committed by writing a temp file in the same folder and renaming it
into place, so a reader sees either nothing or the whole file; a present output means
that piece of work is done. Knows the round folder layout of DESIGN.md; knows nothing
about models or queues.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

ROUND_FILE = "round.json"  # the round's full config, written once at prepare time
MANIFEST = "manifest.json"


def new_round_id() -> str:
    return time.strftime("r%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text("utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def commit_dir(tmp: Path, target: Path) -> bool:
    """Move a finished folder into place; False (and tmp removed) if target already exists."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, target)
        return True
    except OSError:
        if target.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise


def tmp_dir_beside(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))


def read_json_yaml(path: Path) -> Any:
    """Read a YAML file this store wrote (plain mappings only)."""
    import yaml

    return yaml.safe_load(path.read_text("utf-8"))


# ---------------------------------------------------------------- the shared store of rounds
#
# Round folders live under one root that every worker and client sees (a shared disk or
# mount): $CAI_STORE, default $CAI_HOME/store (~/.cache/cai/store). Ids are folder names.

PULLED = ("manifest.json", "constitution.yaml", "datasets", "adapters", "report")  # the user-facing round folder
_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def store_root() -> Path:
    if os.environ.get("CAI_STORE"):
        return Path(os.environ["CAI_STORE"]).expanduser()
    home = os.environ.get("CAI_HOME") or Path.home() / ".cache" / "cai"
    return Path(home) / "store"


def rounds_root() -> Path:
    return store_root() / "rounds"


def check_round_id(round_id: str) -> str:
    from cai.errors import InputError

    if not round_id or len(round_id) > 100 or round_id.startswith(".") or not set(round_id) <= _ID_CHARS:
        raise InputError(f"round id {round_id!r}: not a round id (letters, digits, '.', '_' and '-' only)")
    return round_id


def round_path(round_id: str, must_exist: bool = True) -> Path:
    """The store folder of a round; InputError for a malformed or unknown id."""
    from cai.errors import InputError

    path = rounds_root() / check_round_id(round_id)
    if must_exist and not (path / ROUND_FILE).exists():
        raise InputError(f"round {round_id}: no such round in the store {rounds_root()} (see `cai round list`)")
    return path


def list_round_ids() -> list[str]:
    root = rounds_root()
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / ROUND_FILE).exists())


def pull(round_dir: Path, dest: Path) -> list[Path]:
    """Copy the user-facing part of a round folder (never work/ or inputs/) into dest.

    Refuses a non-empty dest, and any entry that is a link or would land outside dest.
    Returns the files written, relative to dest.
    """
    from cai.errors import InputError

    if dest.exists() and not dest.is_dir():
        raise InputError(f"{dest}: exists and is not a folder; pull into a new or empty folder")
    if dest.exists() and any(dest.iterdir()):
        raise InputError(f"{dest}: folder is not empty; pull into a new or empty folder")
    base = dest.resolve()
    plan: list[tuple[Path, Path]] = []
    problems = []
    for name in PULLED:
        src = round_dir / name
        if not src.exists() and not src.is_symlink():
            continue
        for path in [src, *sorted(src.rglob("*"))] if src.is_dir() and not src.is_symlink() else [src]:
            rel = path.relative_to(round_dir)
            target = (base / rel).resolve()
            if path.is_symlink():
                problems.append(f"{path}: is a link; pull copies plain files only")
            elif target != base and base not in target.parents:
                problems.append(f"{rel}: would be written outside {dest}")
            elif path.is_file():
                plan.append((path, rel))
    if problems:
        raise InputError(problems)
    for path, rel in plan:
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, base / rel)
    return [rel for _, rel in plan]


def create_json(path: Path, obj: Any) -> bool:
    """Commit a JSON file only if none exists yet (write temp, then hard-link into place:
    the link fails if another writer got there first). True if ours is the one in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write((json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)
