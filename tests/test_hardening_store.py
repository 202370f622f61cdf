"""Issue 9, the store's side: a store two uids share (one group, umask 0002), copies that
never follow a link (pull and a parent's adapter), and a Redis password that is never
shown, whatever form of URL carries it."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import pytest

from cai import store
from cai.errors import InputError
from cai.train import common

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- two uids, one store

GID, UID_A, UID_B = 47100, 47101, 47102  # no passwd entries needed: setuid takes numbers


def as_user(uid: int, fn) -> None:
    """Run fn in a forked child as uid (group GID only, umask 0002), as a worker in the other
    image of the compose deployment would; raise with the child's traceback if it failed.
    (A fork, not a new interpreter: the interpreter may live where only root can read.)"""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(r)
            os.setgroups([GID])
            os.setgid(GID)
            os.setuid(uid)
            os.umask(0o002)
            fn()
            code = 0
        except BaseException:
            os.write(w, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        err = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"as uid {uid} (gid {GID}, umask 0002):\n{err}"


class _Saver:
    """Stands in for a peft model / tokenizer: save_pretrained writes with a plain open(), as they do."""

    def __init__(self, name: str):
        self.name = name

    def save_pretrained(self, path) -> None:
        (Path(path) / f"{self.name}.bin").write_bytes(b"weights")


def _card(kind: str) -> dict:
    return {"base_model": "tiny", "kind": kind, "round": "r1"}


def test_two_uids_with_one_group_share_a_round_folder():
    if os.geteuid() != 0:
        pytest.fail("this test needs root: it switches to two uids to check that they can share the store "
                    "(CI runs it as root)")
    shared = Path(tempfile.mkdtemp(prefix="cai-uids-", dir="/tmp"))  # not tmp_path: its parents are 0700
    try:
        os.chown(shared, 0, GID)
        os.chmod(shared, 0o2777)  # the store volume's root: setgid, so everything in it gets the group
        rnd = shared / "rounds" / "r1"

        def uid_a_writes():
            tmp = store.tmp_dir_beside(rnd)
            store.write_json(tmp / "round.json", {"by": "A"})
            store.write_jsonl(tmp / "inputs" / "prompts.jsonl", [{"id": "p0"}])
            assert store.commit_dir(tmp, rnd)
            assert store.create_json(rnd / "work" / "units" / "respond-0000.json", {"by": "A"})
            assert common.commit_adapter(_Saver("adapter"), _Saver("tokenizer"), rnd / "adapters" / "policy", _card("policy"))

        def uid_b_reads_adds_and_replaces():
            assert store.read_json(rnd / "round.json") == {"by": "A"}
            assert store.read_jsonl(rnd / "inputs" / "prompts.jsonl") == [{"id": "p0"}]
            assert store.read_json(rnd / "adapters" / "policy" / "cai.json")["kind"] == "policy"
            assert (rnd / "adapters" / "policy" / "adapter.bin").read_bytes() == b"weights"
            store.write_json(rnd / "manifest.json", {"by": "B"})  # a new file in A's folder
            store.write_json(rnd / "round.json", {"by": "B"})  # replaces A's file
            store.write_jsonl(rnd / "inputs" / "prompts.jsonl", [{"id": "p1"}])  # and one in A's subfolder
            assert store.create_json(rnd / "work" / "units" / "respond-0001.json", {"by": "B"})
            assert not store.create_json(rnd / "work" / "units" / "respond-0000.json", {"by": "B"})  # still exclusive
            assert common.commit_adapter(_Saver("adapter"), _Saver("tokenizer"), rnd / "adapters" / "reward", _card("reward"))
            store.pull(rnd, shared / "pulled-by-b")

        def uid_a_reads_b():
            assert store.read_json(rnd / "round.json") == {"by": "B"}
            assert store.read_json(rnd / "manifest.json") == {"by": "B"}
            assert store.read_json(rnd / "adapters" / "reward" / "cai.json")["kind"] == "reward"
            store.write_json(rnd / "manifest.json", {"by": "A"})

        as_user(UID_A, uid_a_writes)
        as_user(UID_B, uid_b_reads_adds_and_replaces)
        as_user(UID_A, uid_a_reads_b)
        owners, wrong = set(), []
        for p in [shared / "rounds", *sorted((shared / "rounds").rglob("*")), *sorted((shared / "pulled-by-b").rglob("*"))]:
            st = p.lstat()
            owners.add(st.st_uid)
            want = 0o2775 if p.is_dir() else 0o664  # 0777/0666 & ~0002, setgid kept on folders
            if st.st_mode & 0o7777 != want or st.st_gid != GID:
                wrong.append(f"{p.relative_to(shared)}: {oct(st.st_mode & 0o7777)} gid {st.st_gid}")
        assert not wrong, wrong
        assert owners == {UID_A, UID_B}
        assert not list(shared.rglob(".*.tmp"))
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_store_files_follow_the_umask():
    old = os.umask(0o027)
    try:
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            store.write_json(d / "a" / "x.json", {})
            store.create_json(d / "a" / "y.json", {})
            t = store.tmp_dir_beside(d / "a" / "z")
            modes = {p.name: p.stat().st_mode & 0o777 for p in (d / "a", d / "a" / "x.json", d / "a" / "y.json", t)}
    finally:
        os.umask(old)
    assert modes == {"a": 0o750, "x.json": 0o640, "y.json": 0o640, t.name: 0o750}


# ---------------------------------------------------------------- links are never followed


def _parent_round(root: Path, round_id: str = "rparent") -> Path:
    rd = root / "rounds" / round_id
    store.write_json(rd / store.ROUND_FILE, {"round_id": round_id})
    store.write_json(rd / "adapters" / "policy" / "adapter_config.json", {"base_model_name_or_path": "smollm2-135m"})
    (rd / "adapters" / "policy" / "adapter_model.safetensors").write_bytes(b"w")
    return rd


def test_a_link_in_the_parents_policy_is_refused(tmp_path, monkeypatch):
    from cai import rounds
    from cai.config import RoundConfig

    monkeypatch.setenv("CAI_STORE", str(tmp_path / "store"))
    policy = _parent_round(tmp_path / "store") / "adapters" / "policy"
    (policy / "etc").symlink_to("/etc", target_is_directory=True)
    cfg = RoundConfig(prompts="sample", limit=2, stages=["respond"], parent="rparent")
    with pytest.raises(InputError) as e:
        rounds.prepare(tmp_path / "child", cfg)
    assert len(e.value.problems) == 1 and re.search(r"policy/etc: is a link", e.value.problems[0]), e.value.problems
    assert not (tmp_path / "child").exists() or not any((tmp_path / "child").rglob("hostname"))
    (policy / "etc").unlink()  # without the link, the same parent is copied
    rounds.prepare(tmp_path / "child2", cfg)
    assert (tmp_path / "child2" / "inputs" / "parent_policy" / "adapter_model.safetensors").read_bytes() == b"w"


def test_pull_refuses_links_and_special_files_and_leaves_nothing(tmp_path):
    rd = _parent_round(tmp_path / "store", "r1")
    store.write_jsonl(rd / "datasets" / "sft.jsonl", [{"a": 1}])
    (rd / "datasets" / "escape.jsonl").symlink_to("/etc/hostname")
    (rd / "report").symlink_to("/etc", target_is_directory=True)
    os.mkfifo(rd / "adapters" / "fifo")
    with pytest.raises(InputError) as e:
        store.pull(rd, tmp_path / "out")
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 3, text
    assert "escape.jsonl: is a link" in text and "report: is a link" in text and "fifo: is not a plain file" in text
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError):
        store.pull(rd, tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []  # an empty folder the user made stays, empty
    for bad in ("escape.jsonl",):
        (rd / "datasets" / bad).unlink()
    (rd / "report").unlink()
    (rd / "adapters" / "fifo").unlink()
    files = store.pull(rd, tmp_path / "out")
    assert sorted(map(str, files)) == ["adapters/policy/adapter_config.json", "adapters/policy/adapter_model.safetensors",
                                       "datasets/sft.jsonl"]
    assert (tmp_path / "out" / "datasets" / "sft.jsonl").read_text() == '{"a": 1}\n'


def test_pull_never_copies_a_link_swapped_in_during_the_copy(tmp_path):
    rd = _parent_round(tmp_path / "store", "r1")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT\n")
    target = rd / "datasets" / "sft.jsonl"
    store.write_jsonl(target, [{"a": 1}])
    (rd / "work").mkdir()
    plain, link = rd / "work" / "plain", rd / "work" / "link"  # made beside, outside what pull copies
    stop = threading.Event()

    def swap():  # the name always exists: a plain file or a link to the secret, renamed in atomically
        while not stop.is_set():
            plain.write_text('{"a": 1}\n')
            os.replace(plain, target)
            link.unlink(missing_ok=True)
            link.symlink_to(secret)
            os.replace(link, target)

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    outcomes = {"copied": 0, "refused": 0}
    try:
        for i in range(150):
            dest = tmp_path / f"pull{i}"
            try:
                store.pull(rd, dest)
                outcomes["copied"] += 1
            except InputError as e:
                assert all("is a link" in p for p in e.problems), e.problems
                outcomes["refused"] += 1
            if dest.exists():
                for f in dest.rglob("*"):
                    assert not f.is_symlink() and (f.is_dir() or b"TOP-SECRET" not in f.read_bytes()), f
                shutil.rmtree(dest)
    finally:
        stop.set()
        swapper.join()
    assert outcomes["copied"] and outcomes["refused"], outcomes  # the race was really run both ways


# ---------------------------------------------------------------- the Redis password is never shown

PIECES = ("Zq9", "Xk7", "Wv5", "Jm2")  # every password below is made of these, so any shown piece is caught


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _urls(port: int, sock: str) -> list[str]:
    h = f"127.0.0.1:{port}"
    return [
        f"redis://:Zq9Xk7Wv5@{h}/0",
        f"redis://cai:Zq9Xk7Wv5@{h}/0",
        f"redis://Zq9Xk7Wv5@{h}/0",  # a password written where the user goes
        f"rediss://:Zq9Xk7Wv5@{h}/0",
        f"rediss://cai:Zq9Xk7@{h}/1?ssl_cert_reqs=none",
        f"unix://{sock}?password=Zq9Xk7Wv5",
        f"unix://:Zq9Xk7Wv5@{sock}",
        f"redis://{h}/0?password=Zq9Xk7Wv5",
        f"redis://{h}/0?db=0&password=Zq9%23Xk7",
        f"redis://:Zq9%23Xk7%2FWv5%40Jm2@{h}/0",  # '#', '/', '@' encoded
        f"redis://:Zq9%20Xk7@{h}/0",
        f"redis://:Zq9#Xk7@{h}/0",  # unencoded '#': not a URL redis-py can read, and still not shown
        f"redis://:Zq9/Xk7@{h}/0",
        f"redis://:Zq9?Xk7@{h}/0",
        f"redis://:Zq9@Xk7@{h}/0",
        f"redis://:Zq9 Xk7 Wv5@{h}/0",
        f"redis://:Zq9:Xk7@{h}/0",
        f"redis://:Zq9Xk7Wv5@[::1]:{port}/0",
    ]


def _leaks(text: str) -> list[str]:
    return [p for p in PIECES if p in text or p.lower() in text.lower()]


def test_safe_url_never_shows_the_password():
    from workers.settings import safe_url

    for url in _urls(_closed_port(), "/tmp/no-such-cai.sock") + ["redis:/:Zq9Xk7@h", "Zq9Xk7"]:
        shown = safe_url(url)
        assert not _leaks(shown), (url, shown)
    assert safe_url("redis://:Zq9Xk7@127.0.0.1:6379/0") == "redis://:**@127.0.0.1:6379/0"  # still says where
    assert safe_url("redis://127.0.0.1:6379/0?password=Zq9Xk7") == "redis://127.0.0.1:6379/0"


# One interpreter imports the CLI once, then forks a child per case: each child is a real
# `cai ...` process (its own environment, argv, stdout/stderr files and exit status; an
# uncaught exception prints its traceback as the interpreter would), 36 of them in ~1 s
# instead of ~25 s of interpreter starts.
_FORKING_CLI = r"""
import json, os, sys, traceback
import cai.cli, celery, kombu, redis, workers.client  # noqa: E401,F401 - imported once, before the forks
cases = json.load(open(sys.argv[1]))
for i, (url, args) in enumerate(cases):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, name in ((1, "out"), (2, "err")):
                os.dup2(os.open(f"{sys.argv[2]}/{i}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            os.environ["CAI_REDIS_URL"] = url
            sys.argv = ["cai", *args]
            try:
                cai.cli.main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    open(f"{sys.argv[2]}/{i}.rc", "w").write(str(os.waitstatus_to_exitcode(status)))
"""


def test_cli_errors_never_show_the_password(tmp_path):
    import json

    port = _closed_port()
    cases = [(u, a) for u in _urls(port, str(tmp_path / "no-such.sock")) for a in (["round", "status", "r-x"], ["worker"])]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "runs").mkdir()
    env = {**os.environ, "CAI_STORE": str(tmp_path / "store"), "PYTHONPATH": str(REPO)}
    env.pop("CAI_REDIS_URL", None)
    r = subprocess.run([sys.executable, "-c", _FORKING_CLI, str(tmp_path / "cases.json"), str(tmp_path / "runs")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    bad = []
    for i, (url, args) in enumerate(cases):
        rc = int((tmp_path / "runs" / f"{i}.rc").read_text())
        out, err = ((tmp_path / "runs" / f"{i}.{n}").read_text() for n in ("out", "err"))
        lines = [x for x in err.splitlines() if x.strip()]
        if rc != 2 or len(lines) != 1 or "Traceback" in err or _leaks(out + err):
            bad.append(f"{url} {' '.join(args)}: exit {rc}: {out + err}")
    assert not bad, "\n".join(bad)
