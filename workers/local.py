"""Start and stop a local redis-server and worker process (for `cai demo` and tests).

Starts Redis only on a loopback address and only when nothing answers there. Knows
process handling and the `cai worker` command line; nothing about rounds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from cai.errors import InputError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def redis_answers(url: str) -> bool:
    from workers.settings import answers

    return answers(url, timeout=1.0) is None


def start_redis(url: str, data_dir: Path | None = None, appendonly: bool = False) -> subprocess.Popen:
    """A redis-server on the URL's loopback port, in the foreground of a child process."""
    from workers.settings import safe_url

    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK:
        raise InputError(f"redis at {safe_url(url)}: not answering, and it is not on loopback, so it is not started here; "
                         "start it or set CAI_REDIS_URL")
    exe = shutil.which("redis-server")
    if not exe:
        raise InputError("redis-server: not found; install it (apt-get install redis-server) or set CAI_REDIS_URL to a running Redis")
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="cai-redis-"))
    args = [exe, "--port", str(parts.port or 6379), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", "",
            "--appendonly", "yes" if appendonly else "no", "--maxmemory-policy", "noeviction"]
    if parts.password:
        args += ["--requirepass", parts.password]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 10
    while time.time() < deadline:
        if redis_answers(url):
            return proc
        if proc.poll() is not None:
            raise InputError(f"redis-server exited with code {proc.returncode} (port {parts.port or 6379} taken?)")
        time.sleep(0.1)
    stop(proc)
    raise InputError("redis-server did not answer within 10 s")


def start_worker(log_path: Path, queues: str = "generate,train,cpu", concurrency: int = 1,
                 env: dict | None = None, name: str | None = None) -> subprocess.Popen:
    """`cai worker` as a child process in its own process group, logging to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "cai.cli", "worker", "--queues", queues, "--concurrency", str(concurrency)]
    if name:
        cmd += ["--hostname", name]
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)


def wait_ready(proc: subprocess.Popen, log_path: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise InputError(f"worker exited with code {proc.returncode} before it was ready; see {log_path}")
        if log_path.exists() and " ready." in log_path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise InputError(f"worker not ready after {timeout:g} s; see {log_path}")


def stop(proc: subprocess.Popen | None, grace: float = 30) -> None:
    """TERM the process group (a warm shutdown for a worker), then KILL it after grace seconds."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
