"""The `cai` command (typer). Parses arguments, calls the library, prints results.

Bad input is reported as one line per problem on stderr with exit code 2; nothing here
holds logic the library doesn't. Light commands (constitution ...) never import torch.
"""

from __future__ import annotations

import json
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
out = Console()
err = Console(stderr=True, highlight=False, soft_wrap=True)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONSTITUTION = REPO / "constitution" / "default.yaml"


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

# The round options `run` and `submit` share, declared once.
ConstitutionOpt = Annotated[Path, typer.Option(help="Constitution YAML.")]
PromptsOpt = Annotated[Optional[str], typer.Option(help="Prompts: .jsonl, .parquet, a dataset folder, or a shipped set (sample, red-team, helpful, borderline, all).")]
StagesOpt = Annotated[Optional[str], typer.Option(help="Comma-separated stages (default: all of respond,critique,train-sft,pairs,label,train-rm,train-policy).")]
LimitOpt = Annotated[Optional[int], typer.Option(min=1, help="Use only the first N prompts.")]
PassesOpt = Annotated[int, typer.Option(min=1, max=8, help="Critique-revise passes per prompt.")]
MaxNewTokensOpt = Annotated[int, typer.Option(min=1, help="Tokens per generated answer.")]
BatchSizeOpt = Annotated[int, typer.Option(min=1, help="Generation batch size.")]
ShardSizeOpt = Annotated[int, typer.Option(min=1, help="Prompts per shard (one unit of work).")]
SeedOpt = Annotated[int, typer.Option(help="Round seed.")]
JudgeOpt = Annotated[Optional[str], typer.Option(help="Feedback model spec (default: the policy's base model).")]
PairsOpt = Annotated[Optional[str], typer.Option(help="Label an existing responses file (JSONL: prompt + responses: [a, b]).")]
PrinciplesPerPairOpt = Annotated[int, typer.Option(min=1, help="Principles sampled per pair for labeling.")]
MinMarginOpt = Annotated[float, typer.Option(min=0, max=0.99, help="Pairs with a smaller label margin stay out of training data.")]
CotOpt = Annotated[bool, typer.Option("--cot", help="Judge writes its reasoning first; labels clamped to [0.4, 0.6].")]
RecipeOpt = Annotated[str, typer.Option(help="Training recipe: cpu-tiny, gpu-8b, or a YAML path.")]


@round_app.command("run")
def round_run(
    constitution: ConstitutionOpt = DEFAULT_CONSTITUTION,
    prompts: PromptsOpt = None,
    model: str = typer.Option("smollm2-135m", help="Model spec: smollm2-135m, a local folder, or a cached hub id."),
    stages: StagesOpt = None,
    limit: LimitOpt = None,
    out_dir: Path = typer.Option(..., "--out", help="Round folder to create (must be new or empty)."),
    passes: PassesOpt = 2,
    max_new_tokens: MaxNewTokensOpt = 96,
    batch_size: BatchSizeOpt = 16,
    shard_size: ShardSizeOpt = 32,
    seed: SeedOpt = 0,
    judge: JudgeOpt = None,
    pairs: PairsOpt = None,
    principles_per_pair: PrinciplesPerPairOpt = 4,
    min_margin: MinMarginOpt = 0.1,
    cot: CotOpt = False,
    recipe: RecipeOpt = "cpu-tiny",
) -> None:
    """Run a round here, in process (no queue), writing the round folder."""
    from cai import rounds

    cfg = rounds.prepare(out_dir, **_round_inputs(
        constitution, prompts, model, stages, limit, passes, max_new_tokens, batch_size, shard_size, seed, judge, pairs,
        principles_per_pair, min_margin, cot, recipe))
    err.print(f"round {cfg.round_id} -> {out_dir}")
    _run_with_progress(out_dir)
    man = json.loads((out_dir / "manifest.json").read_text())
    out.print(json.dumps({"round": cfg.round_id, "out": str(out_dir), "counts": man["counts"]}, indent=2))


def _round_inputs(constitution, prompts, model, stages, limit, passes, max_new_tokens, batch_size, shard_size, seed,
                  judge, pairs, principles_per_pair, min_margin, cot, recipe) -> dict:
    """The CLI's round options as rounds.prepare's arguments (shared by run and submit)."""
    from cai import rounds
    from cai.critique import CritiqueSettings
    from cai.feedback import LabelSettings
    from cai.generation import Sampling

    return dict(
        constitution_path=str(constitution), prompts_spec=prompts, model=model,
        stages=rounds.parse_stages(stages), limit=limit, shard_size=shard_size, seed=seed,
        sampling=Sampling(max_new_tokens=max_new_tokens, batch_size=batch_size),
        critique=CritiqueSettings(passes=passes), judge=judge, pairs_path=pairs, recipe=recipe,
        label=LabelSettings(principles_per_pair=principles_per_pair, min_margin=min_margin, chain_of_thought=cot,
                            batch_size=batch_size),
    )


def _run_with_progress(round_dir: Path) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cai import rounds

    cfg = rounds.load_config(round_dir)
    total = sum(len(rounds.units_of(round_dir, s, cfg)) for s in cfg.stages)
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
    from workers.settings import ping

    ping()


@round_app.command("submit")
def round_submit(
    constitution: ConstitutionOpt = DEFAULT_CONSTITUTION,
    prompts: PromptsOpt = None,
    model: str = typer.Option("smollm2-135m", help="Model spec: smollm2-135m, a local folder, or a cached hub id (as the workers see it)."),
    stages: StagesOpt = None,
    limit: LimitOpt = None,
    parent: Optional[str] = typer.Option(None, help="Parent round id: the policy starts from its adapters/policy."),
    passes: PassesOpt = 2,
    max_new_tokens: MaxNewTokensOpt = 96,
    batch_size: BatchSizeOpt = 16,
    shard_size: ShardSizeOpt = 32,
    seed: SeedOpt = 0,
    judge: JudgeOpt = None,
    pairs: PairsOpt = None,
    principles_per_pair: PrinciplesPerPairOpt = 4,
    min_margin: MinMarginOpt = 0.1,
    cot: CotOpt = False,
    recipe: RecipeOpt = "cpu-tiny",
) -> None:
    """Validate a round, put it in the store and queue it; prints the round id."""
    from workers import service

    # workers run elsewhere, in another folder: a model given as a local path is recorded absolute
    model, judge = (str(Path(m).expanduser().resolve()) if m and Path(m).expanduser().exists() else m for m in (model, judge))
    round_id = service.submit(parent=parent, **_round_inputs(
        constitution, prompts, model, stages, limit, passes, max_new_tokens, batch_size, shard_size, seed, judge, pairs,
        principles_per_pair, min_margin, cot, recipe))
    print(round_id)


@round_app.command("status")
def round_status(round_id: str = typer.Argument(..., metavar="ID"),
                 as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Stages and shards of a round: the store's state plus what runs now."""
    from workers import progress

    _redis()
    st = progress.status(round_id)
    if as_json:
        print(json.dumps(st, indent=2))
        return
    from rich.table import Table

    out.print(f"[bold]{st['round_id']}[/bold]  {st['status']}" + (f"  parent {st['parent']}" if st["parent"] else ""))
    if st["error"]:
        out.print(f"error: {st['error']}", markup=False)
    t = Table("stage", "status", "units", "running", "queued", "seconds")
    for stage, s in st["stages"].items():
        t.add_row(stage, s["status"], f"{s['units_done']}/{s['units']}", ",".join(s["running"]), str(s["queued"]), f"{s['seconds']:g}")
    out.print(t)
    for u in st["units"]:
        if u["state"] == "running":
            out.print(f"  {u['unit']}: running on {u['worker']} for {u['running_s']:g} s (attempt {u['attempts']}, token {u['token']})")


def _watch(round_id: str, interval: float = 1.0) -> str:
    """Progress bars until the round ends; returns its final status."""
    import redis
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from workers import progress

    _redis()
    st = progress.status(round_id)
    with Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                  TimeElapsedColumn(), console=err) as prog:
        bars = {stage: prog.add_task(stage, total=s["units"], note="") for stage, s in st["stages"].items()}
        while True:
            for stage, s in st["stages"].items():
                note = f"running {','.join(x.split('/')[-1] for x in s['running'])}" if s["running"] else s["status"]
                prog.update(bars[stage], completed=s["units_done"], note=note)
            if st["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(interval)
            try:
                st = progress.status(round_id)
            except redis.RedisError as e:
                prog.console.print(f"redis not answering ({type(e).__name__}); still watching", markup=False)
                time.sleep(interval)
    if st["error"]:
        err.print(f"round {round_id} {st['status']}: {st['error']}", markup=False)
    else:
        err.print(f"round {round_id} {st['status']}")
    return st["status"]


@round_app.command("watch")
def round_watch(round_id: str = typer.Argument(..., metavar="ID"),
                interval: float = typer.Option(1.0, min=0.1, help="Seconds between updates.")) -> None:
    """Progress bars until the round ends; exit 0 if it succeeded, 1 if it failed or was cancelled."""
    raise typer.Exit(0 if _watch(round_id, interval) == "succeeded" else 1)


@round_app.command("cancel")
def round_cancel(round_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Stop a round: queued work is dropped, running units are terminated."""
    from workers import service

    _redis()
    state = service.cancel(round_id)
    print(f"{round_id}: {state}" + ("" if state == "cancelled" else " already; nothing to cancel"))


@round_app.command("resume")
def round_resume(round_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Re-queue what has no output and no live lease (after a Redis loss, a failure or a cancel)."""
    from workers import service

    _redis()
    sent = service.resume(round_id)
    print(f"{round_id}: {len(sent)} units queued" + (f" ({', '.join(sent)})" if sent else ""))


@round_app.command("list")
def round_list(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Rounds in the store, oldest first, with their lineage (round <- parent <- ...)."""
    from workers import progress

    rows = progress.list_rounds()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        err.print("no rounds in the store yet (cai round submit ...)")
    for r in rows:  # plain lines: ids and lineage are never cut to a terminal's width
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"]))
        print(f"{r['round_id']}  {r['status']:<10}  {created}  {r['model']}  lineage: {' <- '.join(r['lineage'])}")


@round_app.command("pull")
def round_pull(round_id: str = typer.Argument(..., metavar="ID"),
               to: Path = typer.Option(..., "--to", help="Folder to create (must be new or empty).")) -> None:
    """Copy a round's manifest, constitution, datasets, adapters and report into a folder."""
    from cai import store

    rd = store.round_path(round_id)
    files = store.pull(rd, to)
    man = json.loads((to / "manifest.json").read_text()) if (to / "manifest.json").exists() else {}
    if not man.get("finished"):
        err.print(f"round {round_id} has not finished; pulled what exists so far")
    err.print(f"pulled {len(files)} files of {round_id} into {to}")


@app.command("worker")
def worker(
    queues: str = typer.Option("generate,train,cpu", "--queues", "-Q", help="Comma-separated queues: generate, train, cpu."),
    concurrency: int = typer.Option(1, "--concurrency", "-c", min=1, help="Pool processes (one model each; 1 per accelerator)."),
    hostname: Optional[str] = typer.Option(None, help="Worker node name (default cai-PID@HOST)."),
    loglevel: str = typer.Option("INFO", help="Log level."),
) -> None:
    """Run a worker: a thin wrapper over `celery worker` with cai's app and queues."""
    import os

    from workers import keys

    bad = [q for q in queues.split(",") if q.strip() not in keys.QUEUES]
    if bad:
        raise InputError(f"--queues: unknown queue {', '.join(bad)}; choose from {', '.join(keys.QUEUES)}")
    _redis()
    from workers.app import app as celery_app

    celery_app.worker_main(["worker", "--queues", ",".join(q.strip() for q in queues.split(",")), "--concurrency",
                            str(concurrency), "--pool", "prefork", "--loglevel", loglevel,
                            "--hostname", hostname or f"cai-{os.getpid()}@%h"])


@app.command("demo")
def demo(to: Path = typer.Option(Path("rounds"), "--to", help="Pull the round into TO/ID.")) -> None:
    """The service on this machine: start Redis (if none answers) and a worker, queue a round of
    the default constitution on the bundled sample with the embedded model, watch it, pull it."""
    from cai import store
    from cai.models import cai_home
    from workers import local, service
    from workers.settings import redacted, settings

    url = settings().redis_url
    redis_proc = worker_proc = None
    try:
        if not local.redis_answers(url):
            redis_proc = local.start_redis(url)
            err.print(f"started redis-server for {redacted(url)} (stopped at the end)")
        log = cai_home() / "logs" / f"demo-worker-{time.strftime('%Y%m%d-%H%M%S')}.log"
        worker_proc = local.start_worker(log)
        err.print(f"started a worker (log: {log})")
        local.wait_ready(worker_proc, log)
        # min_margin 0: the 135M judge's labels are weak (see counts.judge), and the demo shows every stage
        round_id = service.submit(**_round_inputs(
            DEFAULT_CONSTITUTION, "sample", "smollm2-135m", None, None, 1, 64, 16, 32, 0, None, None, 4, 0.0, False,
            "cpu-tiny"))
        err.print(f"submitted round {round_id}")
        final = _watch(round_id)
        dest = to / round_id
        store.pull(store.round_path(round_id), dest)
        man = json.loads((dest / "manifest.json").read_text())
        out.print(json.dumps({"round": round_id, "status": final, "pulled_to": str(dest), "counts": man["counts"]}, indent=2))
        if final != "succeeded":
            raise typer.Exit(1)
    finally:
        local.stop(worker_proc)
        local.stop(redis_proc, grace=10)


def main() -> None:
    try:
        app()
    except InputError as e:
        for line in e.problems:
            err.print(line, markup=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
