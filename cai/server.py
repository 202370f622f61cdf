"""The engine seam over an OpenAI-compatible inference server (vLLM first), and the
checks a round makes of its servers before any work starts.

`ServerEngine` answers `generate` with chat completions (one request per row, a seed
per row, many in flight so the server batches them, retries with backoff on connection
errors, 429 and 5xx) and `choice_mass` with one-token completions that continue a
partial assistant turn and return log-probs: for exactly the token ids that spell each
letter (`logprob_token_ids`, vLLM >= 0.32), else the top 20 log-probs. The server
renders its own chat template, so no local tokenizer is needed. A request that still
fails makes the whole call raise `ServerError`: the caller (a unit) fails as a unit and
commits nothing.

Time is bounded: `timeout` is a deadline for a whole request (a server trickling a byte
at a time is cut at it), a request with its retries ends within timeout x (retries + 1),
the first request that fails cuts its siblings' connections, and a call returns or raises
only once all its threads have returned. A server answer that cai can't read (malformed
JSON, a list for /v1/models, no choices) is one ServerError line, never a traceback.
The URL may be the host (http://host:8000) or the OpenAI form (http://host:8000/v1):
`root_url` is where the one becomes the other.

A round's adapter is loaded into the server once with runtime LoRA loading, under a
name that carries a hash of its content (a new adapter in the same folder gets a new
name, so no stale prefix-cache block is reused), and requests name it as `model`. The
adapter's folder must be readable by the server at the same path (the shared store).

`check` is the preflight: each problem one line (server unreachable or refusing the
key, serving another model, runtime LoRA off or a max rank below the round's adapters,
no log-probs for labels). `describe` is what the manifest records of each server: URL
without credentials, served model, version. The API key comes from the environment
(CAI_ENGINE_API_KEY, sent as a bearer token) and is never written, logged or put in
an error: every text a server sent is `scrub`bed (the key, `Bearer ...` tokens, URL
credentials) before it becomes an error, a problem line or a manifest entry.

Knows HTTP and the OpenAI and vLLM request shapes; knows nothing about round folders,
queues, which stage uses which server (cai.roles, cai.stages) or models beyond cai.models'
spec resolution. HTTP is the standard library's, not the `openai` client's: openai's
timeout is httpx's (per connect or read, so a trickle never ends) and its retries run
inside one call, so an honest whole-request deadline and cut-off siblings would need our
own retry loop and cancellation around it anyway, for a dependency of no other use here.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import math
import os
import random
import re
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cai.generation import Generation, Sampling, derive_seed

KEY_ENV = "CAI_ENGINE_API_KEY"

# Which stage uses which server is the stage table's (rows name their roles) and
# cai.roles' (a role's server): cai.roles.served(cfg, stages) lists them.

PROBE_RANK = 1 << 20  # a rank no server allows: its refusal tells the server's max rank
_TOP = 20  # top_logprobs asked for when logprob_token_ids is not available (vLLM's default cap)
CHAT = "/v1/chat/completions"


def root_url(url: str) -> str:
    """The server's root, the one form cai addresses it by (it appends /v1/... and vLLM's
    /tokenize itself): the URL without trailing slashes or a final /v1, so the form OpenAI
    clients and vLLM's docs write (http://host:8000/v1) and the bare host both work."""
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def safe_url(url: str) -> str:
    """The URL as it may be recorded or shown: scheme, host, port and path; no user info,
    query or fragment (where credentials could hide)."""
    p = urlsplit(url)
    host = p.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{p.port}" if p.port else "")
    return urlunsplit((p.scheme, netloc, p.path.rstrip("/"), "", ""))


# ---------------------------------------------------------------- secrets out of server text

_KEYS: set[str] = set()  # the keys clients of this process have sent (the environment's may change after)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]+")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@\"']*@")


def scrub(text: str) -> str:
    """`text` (anything a server sent) with the API key, `Bearer ...` tokens and URL
    credentials replaced by ***. Applied where server text becomes an error or a status
    line: ServerError (message and body), `_error_message` (before it cuts the text),
    and check's and describe's lines."""
    for key in _KEYS | {os.environ.get(KEY_ENV) or ""}:
        if key:
            text = text.replace(key, "***")
    return _USERINFO.sub(r"\1***@", _BEARER.sub(r"\1 ***", text))


class ServerError(RuntimeError):
    """A request to the server failed after its retries (or can't succeed). `where` is the
    server (and path) as it may be shown, `reason` the rest of the line; both scrubbed.
    `timed_out`: the server took the connection but did not answer in time."""

    def __init__(self, where: str, reason: str, status: int | None = None, body: str = "", *,
                 timed_out: bool = False) -> None:
        self.where, self.reason = scrub(where), scrub(reason)
        super().__init__(f"{self.where}: {self.reason}")
        self.status, self.body, self.timed_out = status, scrub(body), timed_out


@dataclass
class Response:
    status: int
    text: str
    where: str = ""  # server and path, as shown

    def json(self):
        """The body as JSON; ServerError (one line) when it is not JSON."""
        try:
            return json.loads(self.text)
        except ValueError as e:
            raise ServerError(self.where, f"answered HTTP {self.status} with malformed JSON "
                              f"({getattr(e, 'msg', e)}, {len(self.text)} characters): {_error_message(self.text)[:120]}",
                              self.status, self.text) from None


def _error_message(text: str) -> str:
    """The server's own error line from an error body ({"error": {"message"}} or FastAPI's
    {"detail"}), scrubbed before it is cut (a key cut in half would not match)."""
    text = scrub(text)
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:300]
    if isinstance(body, dict):
        e = body.get("error")
        if isinstance(e, dict) and e.get("message"):
            return str(e["message"])[:500]
        if isinstance(e, str):
            return e[:300]
        if body.get("detail"):
            return str(body["detail"])[:300]
    return text.strip()[:300]


@contextmanager
def _answer(where: str):
    """A server's answer in a shape cai can't read (a missing field, a wrong type) as one
    ServerError line instead of a KeyError or TypeError from deep in the parsing."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise ServerError(where, f"answered in a shape cai can't read ({type(e).__name__}: {e})", 200) from None


def _first_choice(r, where: str) -> dict:
    choices = r.get("choices") if isinstance(r, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ServerError(where, f"answered without a choice: {_error_message(json.dumps(r))[:120]}", 200)
    return choices[0]


# ---------------------------------------------------------------- one request, one deadline


class _NotAnswering(TimeoutError):
    """The server took the connection but did not answer before the request's deadline."""


class _Stopped(Exception):
    """The client was aborted (a sibling request failed) before this request could start."""


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, each allowed only the time left to a deadline, so a server that
    trickles bytes cannot stretch a request past it (a socket timeout alone is per read)."""

    def __init__(self, raw, sock, deadline: float) -> None:
        self.raw, self.sock, self.deadline = raw, sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's deadline passed")
        self.sock.settimeout(left)
        return self.raw.readinto(b)

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """An HTTP response read under the request's deadline: the status line, the headers
    and the body alike."""

    def __init__(self, sock, *args, deadline: float, **kw) -> None:
        super().__init__(sock, *args, **kw)
        self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, deadline))


# in-flight requests of this process: what a unit is waiting on (waiting_on)
_IN_FLIGHT: dict[int, tuple[str, float]] = {}
_FLIGHTS_LOCK = threading.Lock()


def waiting_on() -> str | None:
    """The server request this process has waited on longest, as a status line ("waiting
    on http://host:8000/v1/chat/completions since 12:00:01 UTC, 16 requests in flight"),
    or None when none is in flight."""
    with _FLIGHTS_LOCK:
        flights = list(_IN_FLIGHT.values())
    if not flights:
        return None
    where, since = min(flights, key=lambda f: f[1])
    return f"waiting on {where} since {_clock(since)}, {len(flights)} request{'s' * (len(flights) > 1)} in flight"


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(t))


class Client:
    """JSON over HTTP to one server: bearer key from the environment, retries with
    exponential backoff and jitter on connection errors, timeouts, 429 and 5xx.

    `timeout` is a deadline for a whole request (connect, send, every read), and a request
    with its retries and their backoff ends within timeout x (retries + 1) of its start.
    `abort()` (a sibling request failed) ends retrying and cuts the connections in flight,
    so their threads return at once. Standard library HTTP, no proxies."""

    RETRY_STATUS = (429, 500, 502, 503, 504)

    def __init__(self, url: str, *, timeout: float = 300, retries: int = 4, backoff: float = 0.5, backoff_max: float = 8) -> None:
        self.url = root_url(url)
        self.shown = safe_url(self.url)
        self.timeout, self.retries, self.backoff, self.backoff_max = timeout, retries, backoff, backoff_max
        self._key = os.environ.get(KEY_ENV) or None
        if self._key:
            _KEYS.add(self._key)
        self.stop = threading.Event()
        self._live: set[http.client.HTTPConnection] = set()
        self._live_lock = threading.Lock()

    def __repr__(self) -> str:  # never the key
        return f"Client({self.shown})"

    def abort(self) -> None:
        """Stop every request of this client: no more tries, connections in flight cut.
        The caller clears `stop` once its requests have returned."""
        with self._live_lock:
            self.stop.set()
            for conn in self._live:
                try:
                    if conn.sock is not None:
                        conn.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading it
                except OSError:
                    pass

    def _once(self, method: str, path: str, body, timeout: float) -> Response:
        """One try within `timeout` seconds. Raises _NotAnswering when the server took the
        connection but did not answer in time; OSError or HTTPException when it could not
        be reached or broke the connection."""
        deadline = time.monotonic() + timeout
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        p = urlsplit(self.url)
        kind = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
        conn = kind(p.hostname, p.port, timeout=timeout)
        conn.response_class = partial(_DeadlineResponse, deadline=deadline)
        try:
            conn.connect()  # refused, unreachable, DNS: OSError (a connect that hangs ends at `timeout`)
            with self._live_lock:
                if self.stop.is_set():
                    raise _Stopped
                self._live.add(conn)
            try:
                conn.sock.settimeout(max(deadline - time.monotonic(), 1e-3))  # sendall: a total bound
                conn.request(method, p.path + path, body=data, headers=headers)
                r = conn.getresponse()
                return Response(r.status, r.read().decode("utf-8", "replace"), self.shown + path)
            except TimeoutError:
                raise _NotAnswering() from None
        finally:
            with self._live_lock:
                self._live.discard(conn)
            conn.close()

    def request(self, method: str, path: str, body=None, *, retry_status: tuple[int, ...] | None = None,
                retries: int | None = None) -> Response:
        """One request; a non-retryable HTTP status is returned, not raised. Raises
        ServerError when the server can't be reached, does not answer, or keeps answering
        429/5xx through the retries, and when it refuses the API key."""
        retry_status = self.RETRY_STATUS if retry_status is None else retry_status
        tries = (self.retries if retries is None else retries) + 1
        where, since, start = self.shown + path, time.time(), time.monotonic()
        end = start + self.timeout * tries
        why, status, timed_out, made = "", None, False, 0
        with _FLIGHTS_LOCK:
            _IN_FLIGHT[threading.get_ident()] = (where, since)
        try:
            for attempt in range(tries):
                if attempt:
                    delay = min(self.backoff_max, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random())
                    if self.stop.wait(min(delay, max(0.0, end - time.monotonic()))):
                        break
                left = min(self.timeout, end - time.monotonic())
                if self.stop.is_set() or left <= 0:
                    break
                made += 1
                try:
                    r = self._once(method, path, body, left)
                except _Stopped:
                    break
                except _NotAnswering:
                    why, status, timed_out = f"not answering within {self.timeout:g} s", None, True
                    continue
                except (http.client.HTTPException, OSError) as e:  # refused, reset, DNS, a connect timeout
                    why, status, timed_out = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, None, False
                    continue
                if r.status == 401:
                    raise ServerError(self.shown, _refused_key(self._key), 401, r.text)
                if r.status in retry_status:
                    why, status, timed_out = f"HTTP {r.status}: {_error_message(r.text)}", r.status, False
                    continue
                return r
        finally:
            with _FLIGHTS_LOCK:
                _IN_FLIGHT.pop(threading.get_ident(), None)
        if self.stop.is_set():
            raise ServerError(where, "stopped: another request of the call failed")
        took = time.monotonic() - start
        raise ServerError(where, f"{why} ({made} {'try' if made == 1 else 'tries'} over {took:.1f} s since {_clock(since)})",
                          status, timed_out=timed_out)

    def get_json(self, path: str, **kw):
        r = self.request("GET", path, **kw)
        if r.status != 200:
            raise ServerError(r.where, f"HTTP {r.status}: {_error_message(r.text)}", r.status, r.text)
        return r.json()

    def post_json(self, path: str, body: dict, **kw):
        r = self.request("POST", path, body, **kw)
        if r.status != 200:
            raise ServerError(r.where, f"HTTP {r.status}: {_error_message(r.text)}", r.status, r.text)
        return r.json()


def _refused_key(key: str | None) -> str:
    """What a 401 means here: the key missing from this process's environment (on a worker,
    its own environment, not the submitter's) or not the server's."""
    if not key:
        return (f"refused the API key (401 Unauthorized): none was sent, {KEY_ENV} is not set in this process's "
                f"environment (a worker needs it in its own environment); set it to the server's key")
    return (f"refused the API key (401 Unauthorized); set {KEY_ENV} to the server's key (on a worker, in the "
            f"worker's own environment)")


# ---------------------------------------------------------------- what a server serves


def served_models(client: Client, **kw) -> list[dict]:
    """/v1/models entries: base models (parent None) first, as the server lists them.
    ServerError when the answer is not an OpenAI model list."""
    where = client.shown + "/v1/models"
    answer = client.get_json("/v1/models", **kw)
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
        shape = f"a JSON {type(answer).__name__}" if not isinstance(answer, dict) else "an object without a model list"
        raise ServerError(where, f"answered {shape}, not an OpenAI model list ({{\"data\": [{{\"id\": ...}}]}}); "
                                 "is it an OpenAI-compatible server?", 200)
    return sorted(data, key=lambda m: m.get("parent") is not None)


def pick_model(entries: list[dict], name: str | None) -> dict | None:
    """The served entry a setting names, or the first base model when it names none."""
    if name:
        return next((m for m in entries if m.get("id") == name), None)
    return next((m for m in entries if m.get("parent") is None), entries[0] if entries else None)


def version(client: Client) -> str | None:
    try:
        return str(client.get_json("/version", retries=1).get("version"))
    except (ServerError, AttributeError):
        return None


# process-wide caches, per server: what the choice letters are and how log-probs are asked
_LETTERS: dict[tuple, dict[str, list[int]] | None] = {}
_LOGPROB_MODE: dict[tuple, str] = {}
_HASHES: dict[tuple, str] = {}
_LOCK = threading.Lock()


def adapter_name(path: str | Path) -> str:
    """The served name of an adapter folder: its folder name and a hash of its content
    (adapter_config.json and the weights), cached per (path, size, mtime)."""
    p = Path(path).resolve()
    files = [p / "adapter_config.json"] + [f for f in (p / "adapter_model.safetensors", p / "adapter_model.bin") if f.exists()][:1]
    stamp = (str(p),) + tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    with _LOCK:
        digest = _HASHES.get(stamp)
    if digest is None:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        digest = h.hexdigest()
        with _LOCK:
            _HASHES[stamp] = digest
    slug = re.sub(r"[^a-z0-9]+", "-", p.name.lower()).strip("-")[:40] or "adapter"
    return f"cai-{slug}-{digest[:16]}"


def adapter_rank(path: str | Path) -> int:
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    return max([int(cfg.get("r") or 0), *[int(v) for v in (cfg.get("rank_pattern") or {}).values()]])


# ---------------------------------------------------------------- the engine


class ServerEngine:
    """The engine seam (cai.engine.Engine) over an OpenAI-compatible server.

    `settings` is a cai.config.ServerSettings (url, model, concurrency, timeout, retries).
    With `adapter` (a PEFT folder the server can read at the same path), it is loaded by
    runtime LoRA once and every request names it."""

    def __init__(self, settings, *, adapter: str | Path | None = None) -> None:
        self.settings = settings
        self.client = Client(settings.url, timeout=settings.timeout, retries=settings.retries)
        entry = pick_model(served_models(self.client), settings.model)
        if entry is None:
            raise ServerError(self.client.shown, f"serves no model named {settings.model}" if settings.model
                              else "serves no model")
        self.base = entry["id"]
        self.adapter = str(Path(adapter).resolve()) if adapter else None
        self.model = self.base
        if self.adapter:
            self.model = adapter_name(self.adapter)
            self._ensure_adapter()
        self.name = f"server {self.client.shown} model {self.model}"

    # -------------------------------------------------------- adapters

    def _ensure_adapter(self, force: bool = False) -> None:
        if not force and any(m.get("id") == self.model for m in served_models(self.client)):
            return
        r = self.client.request("POST", "/v1/load_lora_adapter", {"lora_name": self.model, "lora_path": self.adapter},
                                retry_status=(429, 502, 503, 504))  # a 500 here is the adapter's fault (e.g. its rank)
        if r.status == 200 or (r.status == 400 and "already been loaded" in r.text):
            return
        raise ServerError(self.client.shown, f"could not load adapter {self.adapter}: {_lora_refusal(r)}", r.status, r.text)

    # -------------------------------------------------------- requests, many in flight

    def _map(self, fn, n: int) -> list:
        """fn(i) for i in range(n), at most `concurrency` at once, results in order. The
        first failure (or an interrupt, e.g. the task's time limit) aborts the others'
        requests and is raised once every thread has returned: none outlives the call."""
        if n == 0:
            return []
        pool = ThreadPoolExecutor(max_workers=min(self.settings.concurrency, n), thread_name_prefix="cai-server")
        try:
            futures = [pool.submit(fn, i) for i in range(n)]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f.done() and f.exception() is not None), None)
            if failed is not None:
                raise failed.exception()
            return [f.result() for f in futures]
        except BaseException:
            self.client.abort()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.client.stop.clear()

    def _chat(self, body: dict) -> dict:
        """POST a chat completion for this engine's model; reloads the adapter once when the
        server no longer knows it (it restarted since it was loaded)."""
        body = {**body, "model": self.model}
        r = self.client.request("POST", CHAT, body)
        if r.status == 404 and self.adapter and "does not exist" in r.text:
            self._ensure_adapter(force=True)
            r = self.client.request("POST", CHAT, body)
        if r.status != 200:
            raise ServerError(r.where, f"HTTP {r.status}: {_error_message(r.text)}", r.status, r.text)
        return r.json()

    def generate(self, conversations: list[list[dict]], sampling: Sampling, *,
                 prefixes: list[str] | None = None) -> list[Generation]:
        def one(i: int) -> Generation:
            messages = list(conversations[i])
            body = {"messages": messages, "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                    "seed": derive_seed(sampling.seed, "row", i), "n": 1}
            if sampling.temperature > 0:
                body["top_p"] = sampling.top_p
            if prefixes:
                body["messages"] = messages + [{"role": "assistant", "content": prefixes[i]}]
                body.update(add_generation_prompt=False, continue_final_message=True)
            r = self._chat(body)
            where = self.client.shown + CHAT
            c = _first_choice(r, where)
            with _answer(where):
                text = str((c.get("message") or {}).get("content") or "")
                n = int((r.get("usage") or {}).get("completion_tokens") or 0)
                finished = c.get("finish_reason") == "stop"
                if finished and "stop_reason" in c and c["stop_reason"] is None:
                    n -= 1  # vLLM counts the EOS token it stopped at; the in-process engine counts the answer's tokens
            return Generation(text.strip(), max(n, 0), finished)

        return self._map(one, len(conversations))

    # -------------------------------------------------------- choice probabilities

    def _key(self) -> tuple:
        return (self.client.url, self.base)

    def letter_ids(self, choices: tuple[str, ...]) -> dict[str, list[int]] | None:
        """Token ids spelling each letter (alone or after a space), from the server's
        /tokenize; None when the server has no /tokenize (then only top log-probs work)."""
        key = (*self._key(), choices)
        with _LOCK:
            if key in _LETTERS:
                return _LETTERS[key]
        ids: dict[str, list[int]] | None = {}
        for letter in choices:
            found: list[int] = []
            for text in (letter, " " + letter):
                r = self.client.request("POST", "/tokenize", {"model": self.base, "prompt": text, "add_special_tokens": False})
                if r.status != 200:
                    ids = None
                    break
                with _answer(r.where):
                    toks = r.json().get("tokens") or []
                    if len(toks) == 1 and toks[0] not in found:
                        found.append(int(toks[0]))
            if ids is None:
                break
            if not found:
                raise ServerError(self.client.shown, f"the served model {self.base} has no single token for {letter!r}; "
                                  "choose another judge")
            ids[letter] = found
        with _LOCK:
            _LETTERS[key] = ids
        return ids

    def _mass_request(self, conversation: list[dict], prefix: str, choices: tuple[str, ...], mode: str,
                      ids: dict[str, list[int]] | None) -> list[float]:
        body = {"messages": list(conversation) + [{"role": "assistant", "content": prefix}],
                "add_generation_prompt": False, "continue_final_message": True,
                "max_tokens": 1, "temperature": 0, "logprobs": True}
        if mode == "ids":
            body["logprob_token_ids"] = [t for letter in choices for t in ids[letter]]
            body["return_tokens_as_token_ids"] = True
        else:
            body["top_logprobs"] = int(mode.removeprefix("top"))
        r = self._chat(body)
        where = self.client.shown + CHAT
        c = _first_choice(r, where)
        with _answer(where):
            content = ((c.get("logprobs") or {}).get("content") or [{}])[0]
            entries = content.get("top_logprobs") or []
            if mode != "ids":
                return [sum(math.exp(float(e["logprob"])) for e in entries if str(e.get("token", "")).strip() == letter)
                        for letter in choices]
            lp = {}
            for e in entries:
                tok = str(e.get("token", ""))
                if tok.startswith("token_id:"):
                    lp[int(tok.split(":", 1)[1])] = float(e["logprob"])
        missing = [t for letter in choices for t in ids[letter] if t not in lp]
        if missing:
            raise _NoIds(f"no log-probs for token ids {missing}")
        return [sum(math.exp(lp[t]) for t in ids[letter]) for letter in choices]

    def logprob_mode(self, choices: tuple[str, ...] = ("A", "B")) -> str:
        """How this server gives choice log-probs: "ids" (logprob_token_ids) or "topN"
        (top_logprobs, N <= 20); learned with one request, cached per server and model.
        Raises ServerError when it gives none."""
        key = (*self._key(), choices)
        with _LOCK:
            if key in _LOGPROB_MODE:
                return _LOGPROB_MODE[key]
        probe = [{"role": "user", "content": "Answer with A or B: which letter comes first?"}]
        ids = self.letter_ids(choices)
        mode, why = None, ""
        if ids is not None:
            try:
                self._mass_request(probe, "The answer is (", choices, "ids", ids)
                mode = "ids"
            except _NoIds as e:
                why = str(e)
            except ServerError as e:
                if e.status != 400:
                    raise
                why = _error_message(e.body)
        top = _TOP
        while mode is None and top > 0:
            try:
                self._mass_request(probe, "The answer is (", choices, f"top{top}", None)
                mode = f"top{top}"
            except ServerError as e:
                if e.status != 400:
                    raise
                why = _error_message(e.body)
                m = re.search(r"max allowed: (\d+)", why)
                top = int(m.group(1)) if m and int(m.group(1)) < top else 0
        if mode is None:
            raise ServerError(self.client.shown, f"gives no log-probs for the choice letters ({why}); "
                              "start vLLM with --max-logprobs 20", 400)
        with _LOCK:
            _LOGPROB_MODE[key] = mode
        return mode

    def choice_mass(self, conversations: list[list[dict]], prefixes: list[str], choices: tuple[str, ...] = ("A", "B"), *,
                    groups: list | None = None, batch_size: int = 16) -> list[list[float]]:
        """`groups` and `batch_size` are the in-process engine's; the server batches on its
        own and its prefix cache shares long passages (in whole KV blocks)."""
        mode = self.logprob_mode(choices)
        ids = self.letter_ids(choices) if mode == "ids" else None

        def one(i: int) -> list[float]:
            return self._mass_request(conversations[i], prefixes[i], choices, mode, ids)

        return self._map(one, len(conversations))


class _NoIds(Exception):
    """The server answered a logprob_token_ids request without those ids (it ignores the field)."""


def _lora_refusal(r: Response) -> str:
    """Why the server refused to load an adapter, in words that say what to do."""
    msg = _error_message(r.text)
    if r.status == 404 and msg == "Not Found":
        return ("runtime LoRA loading is off (no /v1/load_lora_adapter); start vLLM with "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora (cai engine serve does)")
    if "No adapter found" in msg:
        return (f"the server can't read the adapter's folder ({msg}); adapters are loaded from the round folder, "
                "which must be on a file system the server reads at the same path (the shared store)")
    return f"HTTP {r.status}: {msg}"


# ---------------------------------------------------------------- preflight


def spec_adapter(spec: str) -> str | None:
    p = Path(spec).expanduser()
    return str(p) if (p / "adapter_config.json").exists() else None


def _spec_names(spec: str) -> set[str]:
    """Names a served model may carry if it is this spec: the spec, its base (a hub id or a
    folder: its path and its folder name), and the embedded model's hub id."""
    from cai import models
    from cai.errors import InputError

    names = {spec, Path(spec).name}
    try:
        r = models.resolve(spec)
    except InputError:
        return {n.casefold() for n in names if n}
    names |= {r.base, Path(r.base).name}
    if Path(r.base).exists():
        names.add(str(Path(r.base).resolve()))
    if r.embedded:
        names |= {models.EMBEDDED, "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"}
    return {n.casefold() for n in names if n}


def _entry_names(entry: dict) -> set[str]:
    names = {str(entry.get("id") or "")}
    root = entry.get("root")
    if root:
        names |= {str(root), Path(str(root)).name}
        if Path(str(root)).exists():
            names.add(str(Path(str(root)).resolve()))
    return {n.casefold() for n in names if n}


def _ranks_needed(cfg, use: dict, parent_policy: str | None) -> list[tuple[str, int]]:
    """(what, rank) for every adapter the round will load into this server: the spec's own,
    the parent's policy, and the adapters this round trains that a served stage starts
    from or evaluates (use["loads_trained"]; every training stage uses the recipe's rank)."""
    out: list[tuple[str, int]] = []
    own = spec_adapter(use["spec"])
    if own:
        out.append((f"adapter {own}", adapter_rank(own)))
    if use["role"] == "policy":
        if parent_policy and (Path(parent_policy) / "adapter_config.json").exists():
            out.append((f"parent round {cfg.parent}'s policy adapter", adapter_rank(parent_policy)))
        if use["loads_trained"]:
            from cai.train import recipe as recipe_mod

            rec = recipe_mod.load(cfg.recipe)
            out.append((f"recipe {rec.name}'s adapters ({', '.join(use['loads_trained'])} load them)", rec.lora.r))
    return out


def _probe_lora(client: Client, where: Path) -> tuple[int | None, str | None]:
    """Learn the server's max LoRA rank by loading an adapter config of an impossible rank
    (from a folder beside the round, so this also tells whether the server reads it).
    Returns (max rank or None, a problem or None). Nothing stays loaded."""
    where = next(p for p in [where, *where.parents] if p.is_dir())
    probe = Path(tempfile.mkdtemp(prefix=".cai-lora-probe-", dir=where))
    try:
        os.chmod(probe, 0o755)
        (probe / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": PROBE_RANK, "lora_alpha": 16,
            "target_modules": ["q_proj"], "bias": "none"}))
        os.chmod(probe / "adapter_config.json", 0o644)
        r = client.request("POST", "/v1/load_lora_adapter", {"lora_name": probe.name, "lora_path": str(probe.resolve())},
                           retry_status=(429, 502, 503, 504), retries=1)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    if r.status == 200:  # it took a rank no server should: unload it, and say the rank can't be known
        client.request("POST", "/v1/unload_lora_adapter", {"lora_name": probe.name}, retries=1)
        return None, None
    m = re.search(r"max_lora_rank (\d+)", r.text)
    if m:
        return int(m.group(1)), None
    return None, _lora_refusal(r)


def check(cfg, where: Path, parent_policy: str | None, servers: dict[str, dict]) -> list[str]:
    """Problems with the round's servers, one line each, before any work: unreachable or
    refusing the key; serving another model; runtime LoRA off, unreadable adapter folders
    or a max rank below the round's adapters (when it will load any); no log-probs for
    the label stage. `where` is a folder on the file system of the round (a probe adapter
    is written there for a moment). `servers` is cai.stages.served(cfg, stages): which
    server each role of the round's (remaining) stages uses. Empty when none."""
    from cai.errors import InputError

    problems: list[str] = []
    for key, use in servers.items():
        s, flag, used, role = use["settings"], use["flag"], use["stages"], use["role"]
        client = Client(s.url, timeout=min(s.timeout, 60), retries=1)
        head = f"{flag} {client.shown}"
        try:
            entries = served_models(client)
        except ServerError as e:
            if e.status in (401, 200):  # the key refused; an answer that is no model list
                problems.append(f"{head}: {e.reason}")
            elif e.timed_out:
                problems.append(f"{head}: takes connections but is {e.reason}; is it still loading, overloaded or "
                                f"hung? (engine.timeout sets the wait)")
            elif e.status is None:
                problems.append(f"{head}: not reachable ({e.reason}); start a server (cai engine serve) or fix {flag}")
            else:
                problems.append(f"{head}: /v1/models answered HTTP {e.status}; is it an OpenAI-compatible server?")
            continue
        entry = pick_model(entries, s.model)
        if entry is None:
            served = ", ".join(str(m.get("id")) for m in entries) or "nothing"
            problems.append(f"{head}: serves no model named {s.model} (it serves: {served})" if s.model
                            else f"{head}: serves no model")
            continue
        spec, what = use["spec"], role
        want = _spec_names(spec)
        own = spec_adapter(spec)
        if own:  # an adapter spec: the server serves its base
            from cai import models

            try:
                want = _spec_names(models.resolve(spec).base)
            except InputError:
                pass
        if not (_entry_names(entry) & want):
            problems.append(f"{head} serves {entry.get('id')} ({entry.get('root')}), not the round's {what} model {spec}; "
                            f"serve that model (cai engine serve --model {spec}) or name another server")
            continue
        try:
            needed = _ranks_needed(cfg, use, parent_policy)
        except (InputError, OSError, ValueError) as e:
            needed = []
            problems.append(f"{head}: can't read the round's adapter ranks ({e})")
        if needed:
            try:
                max_rank, why = _probe_lora(client, where)
            except ServerError as e:
                max_rank, why = None, str(e)
            if why:
                problems.append(f"{head}: {why}")
            elif max_rank is not None:
                for name, rank in needed:
                    if rank > max_rank:
                        problems.append(f"{head}: {name} has LoRA rank {rank}, above the server's --max-lora-rank "
                                        f"{max_rank}; restart it with --max-lora-rank {rank} or more")
        if "judge" in use["roles"] and ("label" in used or ("evaluate" in used and cfg.evaluate.judge)):
            s_check = s.model_copy(update={"timeout": min(s.timeout, 120), "retries": 1, "model": entry["id"]})
            try:
                ServerEngine(s_check).logprob_mode(("A", "B"))
            except ServerError as e:
                problems.append(f"{head}: no log-probs for the judge ({e.reason})")
    return [scrub(p) for p in problems]


def describe(servers: dict[str, dict]) -> dict:
    """What the manifest records of each server the round uses: URL (no credentials),
    served model and root, server version."""
    out = {}
    for role, use in servers.items():
        s = use["settings"]
        client = Client(s.url, timeout=min(s.timeout, 30), retries=1)
        info: dict = {"url": client.shown, "model": s.model, "root": None, "version": None}
        try:
            entry = pick_model(served_models(client), s.model) or {}
            info.update(model=entry.get("id", s.model), root=entry.get("root"), version=version(client))
        except ServerError:
            pass
        out[role] = {k: scrub(v) if isinstance(v, str) else v for k, v in info.items()}
    return out


def wait_healthy(url: str, timeout: float, proc=None) -> bool:
    """Poll GET /health until it answers 200 (True), the process exits or time runs out (False)."""
    client = Client(url, timeout=5, retries=0)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if client._once("GET", "/health", None, client.timeout).status == 200:
                return True
        except (http.client.HTTPException, OSError):  # refused, reset, not answering (a TimeoutError)
            pass
        time.sleep(0.5)
    return False
