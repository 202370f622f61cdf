"""Issue 9, input and output hardening: text that splits JSONL lines, input that used to end
in a traceback, terminal escapes from the store, misleading messages and exits, duplicate
YAML keys. Real parts: the `cai` command in a subprocess, the tiny random model, a real
redis-server on loopback (for the commands that talk to Redis), /dev/full for ENOSPC."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_constitution import GOOD

CAI = [sys.executable, "-m", "cai.cli"]
SEPARATED = ["a\u2028b says hi", "c\u2029d is here", "e\u0085f and g"]  # str.splitlines() breaks on each
ESC = "\x1b]8;;http://evil.example/\x1b\\click me\x1b]8;;\x1b\\ \x1b[2J\x1b[31mred \x9b31m \x07"


def cai(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(CAI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_pair(tmp_path_factory):
    """Two real redis-servers: one open, one with a password. Yields (open_url, auth_port)."""
    import redis

    assert shutil.which("redis-server"), "redis-server is not installed: apt-get install redis-server"
    folder = tmp_path_factory.mktemp("redis")
    procs, ports = [], [free_port(), free_port()]
    for port, extra in zip(ports, ([], ["--requirepass", "right-pass"])):
        procs.append(subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                                       "--save", "", "--appendonly", "no", *extra],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for port, pw in zip(ports, (None, "right-pass")):
        for _ in range(100):
            try:
                if redis.Redis(port=port, password=pw).ping():
                    break
            except redis.RedisError:
                time.sleep(0.1)
    try:
        yield f"redis://127.0.0.1:{ports[0]}/0", ports[1]
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


def write_prompts(path: Path, prompts: list[str], crlf: bool = False) -> Path:
    end = "\r\n" if crlf else "\n"
    path.write_bytes("".join(json.dumps({"prompt": p}, ensure_ascii=False) + end for p in prompts).encode("utf-8"))
    return path


@pytest.fixture(scope="module")
def store_round(tmp_path_factory, tiny_model_dir):
    """A finished respond-only round on the tiny model, from `cai round run`, moved into a store."""
    root = tmp_path_factory.mktemp("store-round")
    prompts = write_prompts(root / "prompts.jsonl", SEPARATED + ["plain\u2028one\u2029two\u0085three"], crlf=True)
    out = root / "out"
    r = cai("round", "run", "--stages", "respond", "--prompts", prompts, "--model", tiny_model_dir, "--shard-size", "2",
            "--max-new-tokens", "4", "--out", out, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    round_id = json.loads((out / "round.json").read_text())["round_id"]
    store = root / "store"
    (store / "rounds").mkdir(parents=True)
    shutil.copytree(out, store / "rounds" / round_id)
    return {"out": out, "store": store, "id": round_id, "prompts": prompts}


# ---------------------------------------------------------------- 1. JSONL split on "\n" only


def test_prompts_with_unicode_line_separators_run_and_read_back(store_round):
    from cai import prompts, store

    out = store_round["out"]
    want = SEPARATED + ["plain\u2028one\u2029two\u0085three"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["finished"] and man["counts"]["prompts"] == 4
    assert man["stages"]["respond"]["units"] == 2  # 4 prompts, shard size 2
    rows = store.read_jsonl(out / "datasets" / "responses.jsonl")
    assert [r["messages"][-1]["content"] for r in rows] == want
    # the file is plain JSONL to any reader that splits on "\n" (datasets, TRL)
    raw = (out / "datasets" / "responses.jsonl").read_text("utf-8").split("\n")
    assert [json.loads(x)["messages"][-1]["content"] for x in raw if x] == want
    assert [p.text for p in prompts.load(store_round["prompts"]).prompts] == want
    pairs = store_round["out"].parent / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p\u2028q", "responses": ["x\u2029y", "z\u0085w"]}, ensure_ascii=False) + "\n")
    assert prompts.load_pairs(pairs)[0]["responses"] == ["x\u2029y", "z\u0085w"]


# ---------------------------------------------------------------- 10. one line and exit 2, not a traceback


def test_deep_nesting_surrogates_enospc_bad_url_and_corrupt_round_are_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    deep_yaml = tmp_path / "deep.yaml"
    deep_yaml.write_text("name: " + "[" * 100_000 + "]" * 100_000 + "\n")
    line = one_line(cai("constitution", "validate", deep_yaml))
    assert line.startswith(f"{deep_yaml}:1:") and "nested" in line

    deep_cfg = tmp_path / "round.yaml"
    deep_cfg.write_text("sampling:\n" + "".join("  " * i + "x:\n" for i in range(1, 400)))
    line = one_line(cai("round", "run", "--config", deep_cfg, "--out", tmp_path / "o1"))
    assert line.startswith(f"{deep_cfg}:") and "nested" in line and not (tmp_path / "o1").exists()

    deep_json = tmp_path / "deep.jsonl"
    deep_json.write_text('{"prompt": "ok"}\n{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    line = one_line(cai("round", "run", "--stages", "respond", "--prompts", deep_json, "--model", tiny_model_dir,
                        "--out", tmp_path / "o2"))
    assert line.startswith(f"{deep_json}:2:") and "nested" in line and not (tmp_path / "o2").exists()

    lone = tmp_path / "lone.jsonl"
    lone.write_text('{"prompt": "fine"}\n{"prompt": "half a pair \\ud800 here"}\n')  # valid JSON, not valid Unicode
    line = one_line(cai("round", "run", "--stages", "respond", "--prompts", lone, "--model", tiny_model_dir,
                        "--out", tmp_path / "o3"))
    assert line.startswith(f"{lone}:2:") and "surrogate" in line and not (tmp_path / "o3").exists()
    cons = tmp_path / "lone.yaml"
    cons.write_text(GOOD + 'description: "x\\ud800y"\n')
    assert '"x\\ud800y"' in cons.read_text()
    line = one_line(cai("constitution", "validate", cons))
    assert line.startswith(f"{cons}:") and "surrogate" in line

    line = one_line(cai("constitution", "schema", "--out", "/dev/full"))  # a real ENOSPC
    assert "no space left" in line

    for url in ("http://127.0.0.1:6379/0", "127.0.0.1:6379"):
        line = one_line(cai("round", "status", "r-x", env={"CAI_REDIS_URL": url, "CAI_STORE": str(tmp_path / "s")}))
        assert "CAI_REDIS_URL" in line and "not a Redis URL" in line
    line = one_line(cai("round", "status", "r-x", env={"CAI_REDIS_URL": "redis://:pa/ss#w@127.0.0.1:notaport/0"}))
    assert "CAI_REDIS_URL" in line and "pa/ss" not in line and "ss#w" not in line

    from cai import plan
    from cai.errors import InputError

    for text in ("{not json", "\xff", "[" * 100_000, json.dumps({"round_id": 5})):
        (tmp_path / "r" / "round.json").parent.mkdir(exist_ok=True)
        (tmp_path / "r" / "round.json").write_bytes(text.encode("latin-1"))
        with pytest.raises(InputError) as e:
            plan.load_config(tmp_path / "r")
        assert e.value.problems[0].startswith(f"{tmp_path / 'r' / 'round.json'}: ")

    from cai import cli

    def copy_failed():
        raise shutil.Error([("/src/a.bin", "/dst/a.bin", "[Errno 13] Permission denied: '/src/a.bin'")])

    monkeypatch.setattr(cli, "app", copy_failed)
    with pytest.raises(SystemExit) as ex:
        cli.main()
    assert ex.value.code == 2
    assert capsys.readouterr().err.strip() == "/src/a.bin: could not copy ([Errno 13] Permission denied: '/src/a.bin')"


# ---------------------------------------------------------------- 11. terminal escapes


def test_control_characters_from_the_store_and_input_are_escaped(store_round, redis_pair, tmp_path):
    open_url, _ = redis_pair
    store, round_id = tmp_path / "store", store_round["id"]
    shutil.copytree(store_round["store"], store)
    rd = store / "rounds" / round_id
    (rd / "work" / "status.json").write_text(json.dumps({"status": "failed", "error": ESC, "at": time.time()}))
    cfg = json.loads((rd / "round.json").read_text())
    (rd / "round.json").write_text(json.dumps({**cfg, "model": "tiny" + ESC}))
    env = {"CAI_REDIS_URL": open_url, "CAI_STORE": str(store)}

    r = cai("round", "status", round_id, env=env)
    assert r.returncode == 0, r.stderr
    assert "click me" in r.stdout and "\\x1b]8;;http://evil.example/" in r.stdout
    r2 = cai("round", "watch", round_id, env=env)
    assert r2.returncode == 1 and "click me" in r2.stderr
    r3 = cai("round", "list", env=env)
    assert r3.returncode == 0 and "tiny\\x1b]8;;" in r3.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD + '"nam\\ee\\x9b": x\n')  # YAML escapes: an ESC and a C1 CSI in an (unknown) key
    r4 = cai("constitution", "validate", bad)
    assert r4.returncode == 2 and "nam\\x1be\\x9b" in r4.stderr
    for text in (r.stdout + r.stderr, r2.stdout + r2.stderr, r3.stdout + r3.stderr, r4.stderr):
        assert not any(c in text for c in ("\x1b", "\x9b", "\x07")), text


# ---------------------------------------------------------------- 12. messages and exits that say what is true


def test_pull_refuses_unfinished_round_prompt_limit_and_auth_messages(store_round, redis_pair, tmp_path, tiny_model_dir,
                                                                      monkeypatch):
    from cai import config, prompts, rounds

    store = tmp_path / "store"
    shutil.copytree(store_round["store"], store)
    monkeypatch.setenv("CAI_STORE", str(store))
    cfg = config.resolve({"prompts": str(store_round["prompts"]), "model": str(tiny_model_dir), "stages": ["respond"]})
    rounds.prepare(store / "rounds" / "r-unfinished", cfg, round_id="r-unfinished")  # queued, nothing run yet
    env = {"CAI_STORE": str(store)}

    line = one_line(cai("round", "pull", "r-unfinished", "--to", tmp_path / "p1", env=env))
    assert "has not finished" in line and "--partial" in line and not (tmp_path / "p1").exists()
    r = cai("round", "pull", "r-unfinished", "--to", tmp_path / "p2", "--partial", env=env)
    assert r.returncode == 0 and "partial" in r.stderr and (tmp_path / "p2" / "round.yaml").exists()
    r = cai("round", "pull", store_round["id"], "--to", tmp_path / "p3", env=env)
    assert r.returncode == 0 and "partial" not in r.stderr
    assert (tmp_path / "p3" / "datasets" / "responses.jsonl").exists()

    long = write_prompts(tmp_path / "long.jsonl", ["x" * (prompts.MAX_CHARS + 1)])
    with pytest.raises(Exception) as e:
        prompts.load(long)
    assert "--max-prompt-chars" not in str(e.value) and "shorten the prompt or split it" in str(e.value)

    _, auth_port = redis_pair
    for url in (f"redis://127.0.0.1:{auth_port}/0", f"redis://:wrong-pass@127.0.0.1:{auth_port}/0"):
        line = one_line(cai("round", "status", "r-x", env={"CAI_REDIS_URL": url}))
        assert "password in CAI_REDIS_URL" in line and "start redis-server" not in line and "wrong-pass" not in line


# ---------------------------------------------------------------- 13. duplicate YAML keys


def test_duplicate_yaml_keys_are_refused_with_file_line_col(tmp_path):
    from cai import config
    from cai.errors import InputError
    from cai.train import recipe

    cons = tmp_path / "dup.yaml"
    cons.write_text(GOOD.replace("    weight: 2\n", "    weight: 2\n    weight: 0.5\n", 1))
    assert cons.read_text().count("weight: 0.5") == 1
    n = cons.read_text().splitlines().index("    weight: 0.5") + 1
    line = one_line(cai("constitution", "validate", cons))
    assert line.startswith(f"{cons}:{n}:5:") and "duplicate key 'weight'" in line

    cfg = tmp_path / "round.yaml"
    cfg.write_text("prompts: sample\nseed: 1\nsampling: {max_new_tokens: 8, max_new_tokens: 9}\n")
    with pytest.raises(InputError) as e:
        config.load(cfg)
    assert e.value.problems[0].startswith(f"{cfg}:3:31:") and "duplicate key 'max_new_tokens'" in e.value.problems[0]
    rec = tmp_path / "recipe.yaml"
    rec.write_text("name: a\nname: b\n")
    with pytest.raises(InputError) as e:
        recipe.load(str(rec))
    assert e.value.problems[0].startswith(f"{rec}:2:1:") and "duplicate key 'name'" in e.value.problems[0]
