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
