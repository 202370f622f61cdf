"""Artifact store: round folders, atomic writes, JSONL helpers.

Every output is committed by writing a temp file in the same folder and renaming it
into place, so a reader sees either nothing or the whole file; a present output means
that piece of work is done. Knows the round folder layout of DESIGN.md; knows nothing
about models or queues.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

ROUND_FILE = "round.json"  # the round's full config, written once at prepare time
MANIFEST = "manifest.json"


def new_round_id() -> str:
    return time.strftime("r%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


# File modes: everything the store creates gets the mode a plain open() or mkdir() would
# give under the process umask (0666/0777 & ~umask), never tempfile's private 0600/0700,
# so workers running as different uids with a shared group and umask 0002 can read,
# add to and replace each other's files (deploy/README.md). Folders are made with
# mkdir, which keeps a parent's setgid bit (a chmod afterwards could clear it).


def _temp_file(parent: Path, name: str) -> tuple[int, Path]:
    """A new, empty, exclusively created temp file for `name` in parent: (fd, path)."""
    for _ in range(100):
        tmp = parent / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temp file name", str(parent / f".{name}.*.tmp"))


def _temp_dir(parent: Path, name: str) -> Path:
    """A new, empty temp folder for `name` in parent."""
    for _ in range(100):
        tmp = parent / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temp folder name", str(parent / f".{name}.*.tmp"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path.parent, path.name)
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


def read_json_input(path: Path, what: str = "JSON file", fix: str = "write it again") -> Any:
    """A JSON file that may be damaged (empty, truncated, not UTF-8, not a plain file):
    its content, or InputError with one line naming the file and what to do."""
    from cai.errors import InputError
    from cai.yamlio import read_text

    text = read_text(path, what)
    if not text.strip():
        raise InputError(f"{path}: the {what} is empty (a write cut short?); {fix}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}:{e.colno}: the {what} is not valid JSON ({e.msg}; truncated?); {fix}") from None
    except RecursionError:
        raise InputError(f"{path}: the {what} is nested too deeply to be one; {fix}") from None


def jsonl_lines(text: str) -> list[str]:
    """The lines of JSONL text, split on "\\n" only (a trailing "\\r" of CRLF dropped).

    Never str.splitlines(): it also breaks on U+2028, U+2029, U+0085, \\x0b, \\x0c and
    \\x1c-\\x1e, which json.dumps(ensure_ascii=False) leaves raw inside strings."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def read_jsonl_lines(path: Path) -> list[str]:
    return [line for line in jsonl_lines(path.read_text("utf-8")) if line.strip()]


def read_jsonl_slice(path: Path, start: int, stop: int | None) -> list[dict]:
    """Rows start..stop-1 of a JSONL file this store wrote (one row per "\n"-ended line),
    read without holding the rest of the file."""
    import itertools

    with open(path, encoding="utf-8", newline="\n") as f:
        return [json.loads(line) for line in itertools.islice(f, start, stop) if line.strip()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in read_jsonl_lines(path)]


def count_lines(path: Path) -> int:
    """Non-blank lines of a JSONL file this store wrote (cached while the file is unchanged)."""
    st = path.stat()
    return _count_lines(str(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=256)
def _count_lines(path: str, mtime_ns: int, size: int) -> int:
    return len(read_jsonl_lines(Path(path)))


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
    return _temp_dir(target.parent, target.name)


def read_json_yaml(path: Path) -> Any:
    """Read a YAML file this store wrote (plain mappings only)."""
    import yaml

    return yaml.safe_load(path.read_text("utf-8"))


# ---------------------------------------------------------------- the shared store of rounds
#
# Round folders live under one root that every worker and client sees (a shared disk or
# mount): $CAI_STORE, default $CAI_HOME/store (~/.cache/cai/store). Ids are folder names.

PULLED = ("manifest.json", "round.yaml", "constitution.yaml", "recipe.yaml", "datasets", "adapters", "report")  # the user-facing round folder
_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


STORE_ID = "store.json"  # {"id", "created"} in the store's root: its identity, made once


def store_root() -> Path:
    """The store's root, always absolute: a relative CAI_STORE is taken from the current
    folder here and now (workers refuse one: workers.settings), never reread elsewhere."""
    if os.environ.get("CAI_STORE"):
        return Path(os.environ["CAI_STORE"]).expanduser().absolute()
    home = os.environ.get("CAI_HOME") or Path.home() / ".cache" / "cai"
    return (Path(home) / "store").expanduser().absolute()


def store_identity(create: bool = False) -> str | None:
    """The store's identity: a random id written once into its root (store.json), the same
    on every machine that mounts this store, wherever it is mounted; so a worker can tell
    "this round is not in my store" from "this round was removed". None when the root has
    none (not a store yet, or not the store) and create is False."""
    path = store_root() / STORE_ID
    if create and not path.exists():
        create_json(path, {"id": secrets.token_hex(8), "created": time.time()})  # the first writer's id wins
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data["id"] if isinstance(data, dict) and isinstance(data.get("id"), str) else None


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

    Refuses a non-empty dest, and any entry that is a link or not a plain file or folder
    (copy_tree_nofollow: nothing is followed, so a link swapped in mid-copy is refused
    too); then nothing is left in dest. Returns the files written, relative to dest.
    """
    from cai.errors import InputError

    if dest.exists() and not dest.is_dir():
        raise InputError(f"{dest}: exists and is not a folder; pull into a new or empty folder")
    if dest.exists() and any(dest.iterdir()):
        raise InputError(f"{dest}: folder is not empty; pull into a new or empty folder")
    made = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    copied: list[Path] = []
    problems: list[str] = []
    try:
        for name in PULLED:
            try:
                files = copy_tree_nofollow(round_dir / name, dest / name)
            except FileNotFoundError as e:
                if e.filename is not None and os.fspath(e.filename) == os.fspath(round_dir / name):
                    continue  # not made (yet)
                raise
            except InputError as e:
                problems.extend(e.problems)
                continue
            copied.append(dest / name)
            written.extend(p.relative_to(dest) for p in files)
        if problems:
            raise InputError(problems)
    except BaseException:
        for p in copied:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        if made:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    return written


_MAX_DEPTH = 64
_OPEN_SRC = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def copy_tree_nofollow(src: Path, dst: Path) -> list[Path]:
    """Copy src (a plain file, or a folder of plain files and folders) to dst, which must
    not exist yet, never following a symbolic link.

    Every entry is opened with O_NOFOLLOW relative to its folder's open descriptor, and
    what it is (file, folder, other) is read from the open descriptor, never checked
    first and opened after: a link there, even one swapped in during the copy, is refused,
    not followed. The links of src's own parent folders are the caller's (a store root
    may be a link). The copy is made in a temp beside dst and renamed into place: on any
    problem nothing is left at dst. Entries removed while the copy runs are skipped.

    Raises InputError naming every link, and every entry that is not a plain file or
    folder (fifo, socket, device); FileNotFoundError when src does not exist.
    Returns the files written, as paths under dst.
    """
    from cai.errors import InputError

    src, dst = Path(src), Path(dst)
    if os.path.lexists(dst):
        raise InputError(f"{dst}: already exists; copy into a new path")
    try:
        fd = os.open(src, _OPEN_SRC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"{src}: is a link; only plain files and folders are copied, never followed") from None
        raise
    dst.parent.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    rels: list[str] = []
    tmp: Path | None = None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            out, tmp = _temp_file(dst.parent, dst.name)
            _copy_fd(fd, out, st)
            rels.append("")
        elif stat.S_ISDIR(st.st_mode):
            tmp = _temp_dir(dst.parent, dst.name)
            out = os.open(tmp, _OPEN_DIR)
            try:
                _copy_children(fd, out, str(src), "", 1, problems, rels)
            finally:
                os.close(out)
        else:
            problems.append(f"{src}: is not a plain file or folder; only those are copied")
        if problems:
            raise InputError(problems)
        os.rename(tmp, dst)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return [dst / r if r else dst for r in rels]


def _copy_fd(src_fd: int, out_fd: int, st: os.stat_result) -> None:
    """Copy an open file's bytes into out_fd (then closed), keeping its times."""
    try:
        while chunk := os.read(src_fd, 1 << 20):
            view = memoryview(chunk)
            while view:
                view = view[os.write(out_fd, view):]
        os.utime(out_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(out_fd)


def _copy_children(src_dir: int, dst_dir: int, shown: str, rel: str, depth: int,
                   problems: list[str], rels: list[str]) -> None:
    """Copy every entry of the open folder src_dir into the open folder dst_dir."""
    with os.scandir(src_dir) as it:
        names = sorted(e.name for e in it)
    for name in names:
        where, sub_rel = f"{shown}/{name}", f"{rel}{name}"
        try:
            fd = os.open(name, _OPEN_SRC, dir_fd=src_dir)
        except FileNotFoundError:
            continue  # removed (or renamed into place) since the listing
        except OSError as e:
            if e.errno == errno.ELOOP:
                problems.append(f"{where}: is a link; only plain files and folders are copied, never followed")
                continue
            raise
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                _copy_fd(fd, os.open(name, _CREATE, 0o666, dir_fd=dst_dir), st)
                rels.append(sub_rel)
            elif stat.S_ISDIR(st.st_mode):
                if depth >= _MAX_DEPTH:
                    problems.append(f"{where}: folders nested deeper than {_MAX_DEPTH}; not copied")
                    continue
                os.mkdir(name, 0o777, dir_fd=dst_dir)
                out = os.open(name, _OPEN_DIR, dir_fd=dst_dir)
                try:
                    _copy_children(fd, out, where, sub_rel + "/", depth + 1, problems, rels)
                finally:
                    os.close(out)
            else:
                problems.append(f"{where}: is not a plain file or folder; only those are copied")
        finally:
            os.close(fd)


def create_json(path: Path, obj: Any) -> bool:
    """Commit a JSON file only if none exists yet (write temp, then hard-link into place:
    the link fails if another writer got there first). True if ours is the one in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path.parent, path.name)
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
