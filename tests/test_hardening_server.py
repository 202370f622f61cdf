"""Hardening of the server engine (issue 16 items 1, 4, 8, 9; issue 15 item 3's URL form),
against a small HTTP server of the test's own on 127.0.0.1: it echoes the request's
headers into a 500, trickles a byte a second, takes a connection and never answers,
answers malformed JSON, a list or no choices, and serves only under /v1/.

Each test is one defect class and takes seconds: a key in an error, a request past its
deadline or threads outliving a call, a traceback for a bad answer, a wrong word for a
silent server or a 401, the OpenAI form of the URL refused, an infinite timeout accepted.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cai import server
from cai.config import ServerSettings
from cai.generation import Sampling

KEY = "cai-hardening-key-3b9e1f7a0c2d4e6f"
MODELS = {"object": "list", "data": [{"id": "m", "object": "model", "root": "m", "parent": None}]}
CHAT_OK = {"choices": [{"message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
           "usage": {"completion_tokens": 1}}
ONE = [[{"role": "user", "content": "hi"}]]


class Handler(BaseHTTPRequestHandler):
    """Looks the request's path up in the server's routes: a callable(handler) that answers."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _route(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(n) if n else b""
        route = self.server.routes.get(self.path)
        if route is None:
            return self.answer(404, {"detail": "Not Found"})
        route(self)

    do_GET = do_POST = _route

    def answer(self, status: int, body, raw: bool = False) -> None:
        data = body.encode() if raw else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def trickle(self, data: bytes) -> None:
        """`data` a byte a second, straight onto the socket (status line included)."""
        for i in range(len(data)):
            if self.server.closing.wait(1.0):
                return
            try:
                self.wfile.write(data[i:i + 1])
            except OSError:  # the client hung up
                return
        self.close_connection = True

    def silent(self) -> None:
        """Hold the connection, answer nothing, until the client hangs up (or the test ends)."""
        while not self.server.closing.is_set():
            ready, _, _ = select.select([self.connection], [], [], 0.1)
            if ready and not self.connection.recv(1):
                break
        self.close_connection = True


@pytest.fixture
def fake():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.routes, srv.closing = {}, threading.Event()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.closing.set()
        srv.shutdown()
        srv.server_close()


def ours(baseline: set) -> list[threading.Thread]:
    """Threads started since `baseline` that are not the fake server's."""
    return [t for t in threading.enumerate() if t not in baseline and "process_request_thread" not in t.name
            and t.is_alive()]


def settings(fake, **kw) -> ServerSettings:
    return ServerSettings(url=kw.pop("url", fake.url), **{"timeout": 5, "retries": 0, "concurrency": 4, **kw})


# ---------------------------------------------------------------- 1. the key in no error, status or log


def test_server_text_never_carries_the_key(fake, monkeypatch, caplog):
    monkeypatch.setenv(server.KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)

    def echo(h):  # a debug proxy: the request's headers, a URL with credentials, the key again across character 300
        text = "upstream said:\n" + "".join(f"{k}: {v}\n" for k, v in h.headers.items())
        text += "via http://admin:hunter2@10.0.0.1:8000/v1\nkey="
        h.answer(500, text + "x" * max(0, 290 - len(text)) + KEY, raw=True)

    fake.routes.update({"/v1/models": echo})
    with pytest.raises(server.ServerError) as e:
        server.ServerEngine(settings(fake))
    fake.routes.update({"/v1/models": lambda h: h.answer(200, MODELS),
                        "/v1/chat/completions": lambda h: h.answer(500, {"error": {"message": dict(h.headers.items())}})})
    with pytest.raises(server.ServerError) as chat:
        server.ServerEngine(settings(fake)).generate(ONE, Sampling(max_new_tokens=4))
    for err in (e.value, chat.value):
        text = " ".join([str(err), getattr(err, "reason", ""), err.body or "", repr(err.args)])
        assert "HTTP 500" in str(err) and "Bearer ***" in text, text
        assert KEY[:12] not in text and "hunter2" not in text, text
    assert KEY[:12] not in caplog.text
    assert server.scrub(f"Authorization: Bearer {KEY}, http://u:p@h/") == "Authorization: Bearer ***, http://***@h/"


def test_a_401_says_where_the_key_is_missing(fake, monkeypatch):
    fake.routes["/v1/models"] = lambda h: h.answer(401, {"error": {"message": "Unauthorized"}})
    monkeypatch.delenv(server.KEY_ENV, raising=False)
    with pytest.raises(server.ServerError) as e:
        server.served_models(server.Client(fake.url, retries=0))
    assert e.value.status == 401 and "refused the API key" in str(e.value)
    assert "CAI_ENGINE_API_KEY is not set in this process's environment" in str(e.value)
    assert "worker" in str(e.value)


# ---------------------------------------------------------------- 4. a deadline per request, threads freed


@pytest.mark.parametrize("phase", ["status line", "body"])
def test_a_trickling_server_is_cut_at_the_deadline(fake, phase):
    """A byte a second never trips a per-read timeout; the whole request must end at its
    deadline, with its retries within timeout x (retries + 1), and leave no thread."""
    body = json.dumps(CHAT_OK).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)

    def trickle(h):
        if phase == "body":
            h.wfile.write(head)
            h.trickle(body)
        else:
            h.trickle(head + body)

    fake.routes.update({"/v1/models": lambda h: h.answer(200, MODELS), "/v1/chat/completions": trickle})
    engine = server.ServerEngine(settings(fake, timeout=1.5, retries=1))
    baseline = set(threading.enumerate())
    got: dict = {}

    def call():
        t0 = time.monotonic()
        try:
            engine.generate(ONE * 4, Sampling(max_new_tokens=4))
        except Exception as e:  # noqa: BLE001 - the test looks at it
            got["error"] = e
        got["took"] = time.monotonic() - t0

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(10)
    assert not caller.is_alive(), "the request outlived its deadline by far"
    assert isinstance(got.get("error"), server.ServerError), got
    assert 2.9 <= got["took"] <= 3.6, got["took"]  # 1.5 s x 2 tries, backoff included
    msg = str(got["error"])
    assert "/v1/chat/completions: not answering within 1.5 s (2 tries over" in msg and "since" in msg, msg
    assert ours(baseline) == []


def test_the_first_failure_frees_every_thread_at_once(fake):
    """One request is refused (400) while its siblings hang on a silent server: the call
    raises at once and no request thread outlives it."""
    lock, seen = threading.Lock(), []

    def chat(h):
        with lock:
            seen.append(1)
            first = len(seen) == 1
        if first:
            time.sleep(0.3)  # the siblings are in flight by now
            return h.answer(400, {"error": {"message": "bad request"}})
        h.silent()

    fake.routes.update({"/v1/models": lambda h: h.answer(200, MODELS), "/v1/chat/completions": chat})
    engine = server.ServerEngine(settings(fake, timeout=30, retries=3))
    baseline = set(threading.enumerate())
    t0 = time.monotonic()
    with pytest.raises(server.ServerError, match="HTTP 400: bad request"):
        engine.generate(ONE * 4, Sampling(max_new_tokens=4))
    assert time.monotonic() - t0 < 2
    assert ours(baseline) == []
    fake.routes["/v1/chat/completions"] = lambda h: h.answer(200, CHAT_OK)
    assert [g.text for g in engine.generate(ONE * 2, Sampling(max_new_tokens=4))] == ["hello", "hello"]  # usable again


def test_a_silent_server_is_not_answering_not_unreachable(fake, tmp_path):
    """A server that takes the connection and says nothing: the error, the status line
    (waiting_on) and the preflight say "not answering within N s"."""
    fake.routes.update({"/v1/models": lambda h: h.silent()})
    client = server.Client(fake.url, timeout=1, retries=0)
    seen: list = []

    def look():
        time.sleep(0.5)
        seen.append(server.waiting_on())

    t = threading.Thread(target=look)
    t.start()
    with pytest.raises(server.ServerError) as e:
        server.served_models(client)
    t.join()
    assert "not answering within 1 s" in str(e.value) and e.value.timed_out, str(e.value)
    assert seen[0].startswith(f"waiting on {fake.url}/v1/models since ") and seen[0].endswith("1 request in flight")
    assert server.waiting_on() is None
    # the preflight: one line, exit 2, and it says what happened
    cfg = tmp_path / "round.yaml"
    cfg.write_text(f"engine: {{url: '{fake.url}/v1', timeout: 1}}\n")
    r = subprocess.run([sys.executable, "-m", "cai.cli", "round", "run", "--config", str(cfg), "--prompts", "sample",
                        "--stages", "respond", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=60, env={**os.environ, server.KEY_ENV: ""})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"--engine-url {fake.url}: takes connections but is not answering within 1 s" in lines[0], lines[0]
    assert "not reachable" not in lines[0]


# ---------------------------------------------------------------- 8. one line, never a traceback


@pytest.mark.parametrize("path,answer,expect", [
    ("/v1/models", '{"object": "list", "data": [{"id": "m"', "malformed JSON"),
    ("/v1/models", '[{"id": "m"}]', "answered a JSON list, not an OpenAI model list"),
    ("/v1/chat/completions", '{"choices": [{"message": ', "malformed JSON"),
    ("/v1/chat/completions", '{"choices": []}', 'answered without a choice: {"choices": []}'),
    ("/v1/chat/completions", '{"choices": [{"message": "hello"}]}', "answered in a shape cai can't read"),
])
def test_an_unreadable_answer_is_one_line(fake, path, answer, expect):
    fake.routes.update({"/v1/models": lambda h: h.answer(200, MODELS), "/v1/chat/completions": lambda h: h.answer(200, CHAT_OK)})
    fake.routes[path] = lambda h: h.answer(200, answer, raw=True)
    with pytest.raises(server.ServerError) as e:
        server.ServerEngine(settings(fake)).generate(ONE, Sampling(max_new_tokens=4))
    msg = str(e.value)
    assert type(e.value) is server.ServerError and len(msg.splitlines()) == 1, msg
    assert msg.startswith(f"{fake.url}{path}: ") and expect in msg, msg


# ---------------------------------------------------------------- the URL as OpenAI clients write it


def test_the_openai_form_of_the_url_works(fake):
    """http://host:8000/v1 as OpenAI clients and vLLM's docs write it; the bare host still works."""
    fake.routes.update({"/v1/models": lambda h: h.answer(200, MODELS), "/v1/chat/completions": lambda h: h.answer(200, CHAT_OK)})
    for suffix in ("/v1", "/v1/", ""):
        engine = server.ServerEngine(ServerSettings(url=fake.url + suffix))
        assert [g.text for g in engine.generate(ONE, Sampling(max_new_tokens=4))] == ["hello"]
        assert engine.client.shown == fake.url and engine.name == f"server {fake.url} model m"


# ---------------------------------------------------------------- 9. a timeout that is no number of seconds


def test_an_endless_timeout_is_refused_at_validation():
    """`engine.timeout: .inf` (then OverflowError in every unit), .nan, or more than a day."""
    import yaml
    from pydantic import ValidationError

    from cai import config
    from cai.errors import InputError

    for value in (".inf", ".nan", "1e300"):
        with pytest.raises(ValidationError):
            ServerSettings(url="http://127.0.0.1:8000", timeout=yaml.safe_load(value))
        with pytest.raises(InputError) as e:
            config.resolve({"prompts": "sample", "engine": {"url": "http://127.0.0.1:8000", "timeout": yaml.safe_load(value)}})
        assert any(p.startswith("round config: engine.timeout: ") for p in e.value.problems), (value, e.value.problems)
