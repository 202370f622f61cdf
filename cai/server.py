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

A round's adapter is loaded into the server once with runtime LoRA loading, under a
name that carries a hash of its content (a new adapter in the same folder gets a new
name, so no stale prefix-cache block is reused), and requests name it as `model`. The
adapter's folder must be readable by the server at the same path (the shared store).

`check` is the preflight: each problem one line (server unreachable or refusing the
key, serving another model, runtime LoRA off or a max rank below the round's adapters,
no log-probs for labels). `describe` is what the manifest records of each server: URL
without credentials, served model, version. The API key comes from the environment
(CAI_ENGINE_API_KEY, sent as a bearer token) and is never written, logged or put in
an error.

Knows HTTP (the standard library only: `import cai` stays light), the OpenAI and vLLM
request shapes and which stages use which server role (ROLES); knows nothing about
round folders, queues or models beyond cai.models' spec resolution.
"""

from __future__ import annotations

import hashlib
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
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cai.generation import Generation, Sampling, derive_seed

KEY_ENV = "CAI_ENGINE_API_KEY"

# Which server role (a RoundConfig field) a stage generates through, when the round has
# that server. Every model call of these stages goes through Ctx.engine, so with a server
# they hold no model (cai.plan.queue_of sends them to the cpu queue).
ROLES = {"respond": "engine", "critique": "engine", "pairs": "engine", "label": "judge_engine"}
FLAGS = {"engine": "--engine-url", "judge_engine": "--judge-url"}

PROBE_RANK = 1 << 20  # a rank no server allows: its refusal tells the server's max rank
_TOP = 20  # top_logprobs asked for when logprob_token_ids is not available (vLLM's default cap)


def settings_for(cfg, stage: str):
    """The server settings a stage of this round uses, or None (in process)."""
    role = ROLES.get(stage)
    return getattr(cfg, role, None) if role else None


def safe_url(url: str) -> str:
    """The URL as it may be recorded or shown: scheme, host, port and path; no user info,
    query or fragment (where credentials could hide)."""
    p = urlsplit(url)
    host = p.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{p.port}" if p.port else "")
    return urlunsplit((p.scheme, netloc, p.path.rstrip("/"), "", ""))


class ServerError(RuntimeError):
    """A request to the server failed after its retries (or can't succeed)."""

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status, self.body = status, body


@dataclass
class Response:
    status: int
    text: str

    def json(self):
        return json.loads(self.text)


def _error_message(text: str) -> str:
    """The server's own error line from an error body ({"error": {"message"}} or FastAPI's {"detail"})."""
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


class Client:
    """JSON over HTTP to one server: bearer key from the environment, a timeout per
    request, retries with exponential backoff and jitter on connection errors, timeouts,
    429 and 5xx. `stop` (an Event) ends retrying early when a sibling request has failed."""

    RETRY_STATUS = (429, 500, 502, 503, 504)

    def __init__(self, url: str, *, timeout: float = 300, retries: int = 4, backoff: float = 0.5, backoff_max: float = 8) -> None:
        self.url, self.shown = url.rstrip("/"), safe_url(url)
        self.timeout, self.retries, self.backoff, self.backoff_max = timeout, retries, backoff, backoff_max
        self._key = os.environ.get(KEY_ENV) or None
        self.stop = threading.Event()

    def __repr__(self) -> str:  # never the key
        return f"Client({self.shown})"

    def _once(self, method: str, path: str, body) -> Response:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return Response(r.status, r.read().decode("utf-8", "replace"))
        except urllib.error.HTTPError as e:
            try:
                text = e.read().decode("utf-8", "replace")
            except Exception:  # noqa: BLE001 - the body is only for the message
                text = ""
            return Response(e.code, text)

    def request(self, method: str, path: str, body=None, *, retry_status: tuple[int, ...] | None = None,
                retries: int | None = None) -> Response:
        """One request; a non-retryable HTTP status is returned, not raised. Raises
        ServerError when the server can't be reached (or keeps answering 429/5xx) after
        the retries, or when it refuses the API key."""
        retry_status = self.RETRY_STATUS if retry_status is None else retry_status
        retries = self.retries if retries is None else retries
        why, status = "", None
        for attempt in range(retries + 1):
            if attempt:
                delay = min(self.backoff_max, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random())
                if self.stop.wait(delay):
                    break
            try:
                r = self._once(method, path, body)
            except (urllib.error.URLError, HTTPException, OSError) as e:  # refused, reset, timed out, DNS
                reason = getattr(e, "reason", e)
                why = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
                status = None
                continue
            if r.status == 401:
                raise ServerError(f"{self.shown}: refused the API key (401 Unauthorized); set {KEY_ENV} to the server's key",
                                  401, r.text)
            if r.status in retry_status:
                why, status = f"HTTP {r.status}: {_error_message(r.text)}", r.status
                continue
            return r
        raise ServerError(f"{self.shown}{path}: {why or 'stopped'} (after {retries + 1} tries)", status)

    def get_json(self, path: str, **kw):
        r = self.request("GET", path, **kw)
        if r.status != 200:
            raise ServerError(f"{self.shown}{path}: HTTP {r.status}: {_error_message(r.text)}", r.status, r.text)
        return r.json()

    def post_json(self, path: str, body: dict, **kw):
        r = self.request("POST", path, body, **kw)
        if r.status != 200:
            raise ServerError(f"{self.shown}{path}: HTTP {r.status}: {_error_message(r.text)}", r.status, r.text)
        return r.json()


# ---------------------------------------------------------------- what a server serves


def served_models(client: Client, **kw) -> list[dict]:
    """/v1/models entries: base models (parent None) first, as the server lists them."""
    data = client.get_json("/v1/models", **kw).get("data") or []
    return sorted(data, key=lambda m: m.get("parent") is not None)


def pick_model(entries: list[dict], name: str | None) -> dict | None:
    """The served entry a setting names, or the first base model when it names none."""
    if name:
        return next((m for m in entries if m.get("id") == name), None)
    return next((m for m in entries if m.get("parent") is None), entries[0] if entries else None)


def version(client: Client) -> str | None:
    try:
        return str(client.get_json("/version", retries=1).get("version"))
    except (ServerError, ValueError, AttributeError):
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
            raise ServerError(f"{self.client.shown}: serves no model named {settings.model}" if settings.model
                              else f"{self.client.shown}: serves no model")
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
        raise ServerError(f"{self.client.shown}: could not load adapter {self.adapter}: "
                          + _lora_refusal(r), r.status, r.text)

    # -------------------------------------------------------- requests, many in flight

    def _map(self, fn, n: int) -> list:
        """fn(i) for i in range(n), at most `concurrency` at once, results in order. The
        first failure stops the others' retries and is raised."""
        if n == 0:
            return []
        self.client.stop.clear()
        out: list = [None] * n
        pool = ThreadPoolExecutor(max_workers=min(self.settings.concurrency, n), thread_name_prefix="cai-server")
        futures = {pool.submit(fn, i): i for i in range(n)}
        try:
            for f in futures:
                out[futures[f]] = f.result()
        except BaseException:
            self.client.stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return out

    def _chat(self, body: dict) -> dict:
        """POST a chat completion for this engine's model; reloads the adapter once when the
        server no longer knows it (it restarted since it was loaded)."""
        body = {**body, "model": self.model}
        r = self.client.request("POST", "/v1/chat/completions", body)
        if r.status == 404 and self.adapter and "does not exist" in r.text:
            self._ensure_adapter(force=True)
            r = self.client.request("POST", "/v1/chat/completions", body)
        if r.status != 200:
            raise ServerError(f"{self.client.shown}/v1/chat/completions: HTTP {r.status}: {_error_message(r.text)}",
                              r.status, r.text)
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
            c = r["choices"][0]
            text = (c.get("message") or {}).get("content") or ""
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
                toks = r.json().get("tokens") or []
                if len(toks) == 1 and toks[0] not in found:
                    found.append(int(toks[0]))
            if ids is None:
                break
            if not found:
                raise ServerError(f"{self.client.shown}: the served model {self.base} has no single token for {letter!r}; "
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
        content = ((r["choices"][0].get("logprobs") or {}).get("content") or [{}])[0]
        entries = content.get("top_logprobs") or []
        if mode == "ids":
            lp = {}
            for e in entries:
                tok = str(e.get("token", ""))
                if tok.startswith("token_id:"):
                    lp[int(tok.split(":", 1)[1])] = float(e["logprob"])
            missing = [t for letter in choices for t in ids[letter] if t not in lp]
            if missing:
                raise _NoIds(f"no log-probs for token ids {missing}")
            return [sum(math.exp(lp[t]) for t in ids[letter]) for letter in choices]
        return [sum(math.exp(float(e["logprob"])) for e in entries if str(e.get("token", "")).strip() == letter)
                for letter in choices]

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
            raise ServerError(f"{self.client.shown}: gives no log-probs for the choice letters ({why}); "
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


def _ranks_needed(cfg, role: str, parent_policy: str | None) -> list[tuple[str, int]]:
    """(what, rank) for every adapter the round will load into this server."""
    from cai.models import judge_spec as _judge

    out: list[tuple[str, int]] = []
    used = [s for s in cfg.stages if ROLES.get(s) == role]
    spec = cfg.model if role == "engine" else _judge(cfg.model, cfg.judge)
    own = spec_adapter(spec)
    if own:
        out.append((f"adapter {own}", adapter_rank(own)))
    if role == "engine":
        if parent_policy and (Path(parent_policy) / "adapter_config.json").exists():
            out.append((f"parent round {cfg.parent}'s policy adapter", adapter_rank(parent_policy)))
        if "pairs" in used and "train-sft" in cfg.stages:
            from cai.train import recipe as recipe_mod

            rec = recipe_mod.load(cfg.recipe)
            out.append((f"recipe {rec.name}'s SFT adapter (pairs samples from it)", rec.lora.r))
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


def check(cfg, where: Path, parent_policy: str | None = None) -> list[str]:
    """Problems with the round's servers, one line each, before any work: unreachable or
    refusing the key; serving another model; runtime LoRA off, unreadable adapter folders
    or a max rank below the round's adapters (when it will load any); no log-probs for
    the label stage. `where` is a folder on the file system of the round (a probe adapter
    is written there for a moment). Empty when the round uses no server."""
    from cai.errors import InputError
    from cai.models import judge_spec as _judge

    problems: list[str] = []
    for role, flag in FLAGS.items():
        s = getattr(cfg, role, None)
        used = [st for st in cfg.stages if ROLES.get(st) == role]
        if s is None or not used:
            continue
        client = Client(s.url, timeout=min(s.timeout, 60), retries=1)
        head = f"{flag} {client.shown}"
        try:
            entries = served_models(client)
        except ServerError as e:
            if e.status == 401:
                problems.append(f"{head}: refused the API key (401); set {KEY_ENV} to the server's key")
            elif e.status is None:
                problems.append(f"{head}: not reachable ({str(e).split(': ', 1)[-1]}); start a server "
                                f"(cai engine serve) or fix {flag}")
            else:
                problems.append(f"{head}: /v1/models answered HTTP {e.status}; is it an OpenAI-compatible server?")
            continue
        entry = pick_model(entries, s.model)
        if entry is None:
            served = ", ".join(str(m.get("id")) for m in entries) or "nothing"
            problems.append(f"{head}: serves no model named {s.model} (it serves: {served})" if s.model
                            else f"{head}: serves no model")
            continue
        try:
            spec = cfg.model if role == "engine" else _judge(cfg.model, cfg.judge)
        except InputError:
            continue  # the model spec itself is refused elsewhere
        what = "policy" if role == "engine" else "judge"
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
            needed = _ranks_needed(cfg, role, parent_policy)
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
        if role == "judge_engine" and "label" in used:
            s_check = s.model_copy(update={"timeout": min(s.timeout, 120), "retries": 1, "model": entry["id"]})
            try:
                ServerEngine(s_check).logprob_mode(("A", "B"))
            except ServerError as e:
                problems.append(f"{head}: no log-probs for the label stage ({str(e).split(': ', 1)[-1]})")
    return problems


def describe(cfg) -> dict:
    """What the manifest records of each server the round uses: URL (no credentials),
    served model and root, server version."""
    out = {}
    for role in FLAGS:
        s = getattr(cfg, role, None)
        if s is None or not any(ROLES.get(st) == role for st in cfg.stages):
            continue
        client = Client(s.url, timeout=min(s.timeout, 30), retries=1)
        info: dict = {"url": client.shown, "model": s.model, "root": None, "version": None}
        try:
            entry = pick_model(served_models(client), s.model) or {}
            info.update(model=entry.get("id", s.model), root=entry.get("root"), version=version(client))
        except ServerError:
            pass
        out[role] = info
    return out


def wait_healthy(url: str, timeout: float, proc=None) -> bool:
    """Poll GET /health until it answers 200 (True), the process exits or time runs out (False)."""
    client = Client(url, timeout=5, retries=0)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if client._once("GET", "/health", None).status == 200:
                return True
        except (urllib.error.URLError, HTTPException, OSError, socket.timeout):
            pass
        time.sleep(0.5)
    return False
