"""The `cai` command (typer). Parses arguments, calls the library, prints results.

Bad input is reported as one line per problem on stderr with exit code 2; nothing here
holds logic the library doesn't. Light commands (constitution ...) never import torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

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


@round_app.command("run")
def round_run(
    constitution: Path = typer.Option(DEFAULT_CONSTITUTION, help="Constitution YAML."),
    prompts: Optional[str] = typer.Option(None, help="Prompts: .jsonl, .parquet, a dataset folder, or a shipped set (sample, red-team, helpful, borderline, all)."),
    model: str = typer.Option("smollm2-135m", help="Model spec: smollm2-135m, a local folder, or a cached hub id."),
    stages: Optional[str] = typer.Option(None, help="Comma-separated stages (default: all of respond,critique,train-sft,pairs,label,train-rm,train-policy)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Use only the first N prompts."),
    out_dir: Path = typer.Option(..., "--out", help="Round folder to create (must be new or empty)."),
    passes: int = typer.Option(2, min=1, max=8, help="Critique-revise passes per prompt."),
    max_new_tokens: int = typer.Option(96, min=1, help="Tokens per generated answer."),
    batch_size: int = typer.Option(16, min=1, help="Generation batch size."),
    shard_size: int = typer.Option(32, min=1, help="Prompts per shard."),
    seed: int = typer.Option(0, help="Round seed."),
    judge: Optional[str] = typer.Option(None, help="Feedback model spec (default: the policy's base model)."),
    pairs: Optional[str] = typer.Option(None, help="Label an existing responses file (JSONL: prompt + responses: [a, b])."),
    principles_per_pair: int = typer.Option(4, min=1, help="Principles sampled per pair for labeling."),
    min_margin: float = typer.Option(0.1, min=0, max=0.99, help="Pairs with a smaller label margin stay out of training data."),
    cot: bool = typer.Option(False, "--cot", help="Judge writes its reasoning first; labels clamped to [0.4, 0.6]."),
    recipe: str = typer.Option("cpu-tiny", help="Training recipe: cpu-tiny, gpu-8b, or a YAML path."),
) -> None:
    """Run a round here, in process (no queue), writing the round folder."""
    from cai import rounds
    from cai.critique import CritiqueSettings
    from cai.feedback import LabelSettings
    from cai.generation import Sampling

    cfg = rounds.prepare(
        out_dir, constitution_path=str(constitution), prompts_spec=prompts, model=model,
        stages=rounds.parse_stages(stages), limit=limit, shard_size=shard_size, seed=seed,
        sampling=Sampling(max_new_tokens=max_new_tokens, batch_size=batch_size),
        critique=CritiqueSettings(passes=passes), judge=judge, pairs_path=pairs, recipe=recipe,
        label=LabelSettings(principles_per_pair=principles_per_pair, min_margin=min_margin, chain_of_thought=cot,
                            batch_size=batch_size),
    )
    err.print(f"round {cfg.round_id} -> {out_dir}")
    _run_with_progress(out_dir)
    man = json.loads((out_dir / "manifest.json").read_text())
    out.print(json.dumps({"round": cfg.round_id, "out": str(out_dir), "counts": man["counts"]}, indent=2))


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


@app.command("demo")
def demo(out_dir: Path = typer.Option(Path("rounds/demo"), "--out")) -> None:
    """Run a small round of the default constitution on the bundled sample with the embedded model."""
    if out_dir.exists() and any(out_dir.iterdir()):
        from cai import store

        out_dir = out_dir.parent / store.new_round_id()
    round_run(constitution=DEFAULT_CONSTITUTION, prompts="sample", model="smollm2-135m", stages=None, limit=None,
              out_dir=out_dir, passes=1, max_new_tokens=64, batch_size=16, shard_size=32, seed=0, judge=None,
              pairs=None, principles_per_pair=4, min_margin=0.1, cot=False, recipe="cpu-tiny")


def main() -> None:
    try:
        app()
    except InputError as e:
        for line in e.problems:
            err.print(line, markup=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
