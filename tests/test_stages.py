"""The stage table, the round config and the module graph: behaviour, not settings."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cai import constitution as C
from cai import prompts as P
from cai.critique import CritiqueSettings, critique_revise
from cai.generation import Sampling
from tests.conftest import REPO, Scripted
from tests.test_constitution import DEFAULT

CAI = [sys.executable, "-m", "cai.cli"]


def _responses(n=1):
    ps = P.load("sample").prompts[:n]
    # no category: these test the passes' mechanics; the kind filter has its own tests (tests/test_teacher.py)
    return [{"prompt_id": p.id, "messages": p.messages, "category": None, "response": "Original answer."} for p in ps]


def test_accepted_revision_replaces_the_answer_and_a_degenerate_one_does_not():
    cons = C.load(DEFAULT)
    settings = CritiqueSettings(passes=3, few_shot=1)
    engine = Scripted([("A better, safer answer.", True),        # accepted
                             ("A half-finished answ", False),          # truncated: ignored
                             ("A better, safer answer.", True)])       # unchanged vs current: ignored
    sft, crit = critique_revise(engine, cons, _responses(), settings, Sampling(), {"round": "t"})
    assert [c["degenerate"] for c in crit] == [None, "truncated", "unchanged"]
    assert [c["before"] for c in crit] == ["Original answer.", "A better, safer answer.", "A better, safer answer."]
    assert sft[0]["messages"][-1]["content"] == "A better, safer answer." and sft[0]["revisions_accepted"] == 1
    only_bad = Scripted([("", True)])
    sft, crit = critique_revise(only_bad, cons, _responses(), CritiqueSettings(passes=1), Sampling(), {})
    assert crit[0]["degenerate"] == "empty" and sft == []  # no accepted revision: no SFT row
    kept, _ = critique_revise(Scripted([("", True)]), cons, _responses(),
                              CritiqueSettings(passes=1, drop_degenerate=False), Sampling(), {})
    assert kept[0]["messages"][-1]["content"] == "Original answer."  # kept, with the original answer


def test_stage_table_rows_are_consistent():
    from cai import stages
    from workers import keys

    seen: list[str] = []
    for row in stages.STAGES:
        assert row.queue in keys.QUEUES, row.name
        assert all(d in seen for d in row.needs + row.after), f"{row.name} reads a later stage"
        assert row.sharded == (row.merge is not None), row.name
        seen.append(row.name)
    assert stages.check_plan(["critique"], pairs_file=False) == ["critique needs respond in the same round"]
    assert stages.check_plan(["respond", "critique", "train-sft"], pairs_file=False) == []


def test_plan_unit_dependencies(tmp_path):
    from cai import plan, store
    from cai.config import Round

    store.write_jsonl(tmp_path / "inputs" / "prompts.jsonl", [{"id": str(i)} for i in range(5)])
    cfg = Round(round_id="r", prompts="x", shard_size=2)
    keys = lambda us: [u.key for u in us]  # noqa: E731
    assert keys(plan.units_of(tmp_path, "respond", cfg)) == ["respond/0000", "respond/0001", "respond/0002"]
    assert keys(plan.needs(tmp_path, plan.Unit(stage="critique", shard=1), cfg)) == ["respond/0001"]
    assert keys(plan.needs(tmp_path, plan.Unit(stage="pairs", shard=1), cfg)) == ["critique/0001", "train-sft"]
    assert keys(plan.needs(tmp_path, plan.Unit(stage="train-policy"), cfg)) == [
        "label/0000", "label/0001", "label/0002", "train-sft"]
    no_sft = Round(round_id="r", prompts="x", shard_size=2, stages=["respond", "pairs", "label", "train-rm"])
    assert keys(plan.needs(tmp_path, plan.Unit(stage="pairs", shard=0), no_sft)) == []
    assert keys(plan.needs(tmp_path, plan.Unit(stage="train-rm"), no_sft)) == ["label/0000", "label/0001", "label/0002"]
    assert keys(plan.runnable(tmp_path, no_sft)) == ["respond/0000", "respond/0001", "respond/0002",
                                                     "pairs/0000", "pairs/0001", "pairs/0002"]


def test_round_yaml_reproduces_the_round(tmp_path, tiny_model_dir):
    """Every round folder holds round.yaml; given back to --config it reproduces the round."""
    first, second = tmp_path / "a", tmp_path / "b"
    r = subprocess.run(CAI + ["round", "run", "--out", str(first), "--prompts", "sample", "--limit", "3",
                              "--model", str(tiny_model_dir), "--stages", "respond,critique", "--max-new-tokens", "6",
                              "--passes", "1", "--shard-size", "2", "--keep-degenerate", "--seed", "5"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    import yaml

    cfg = yaml.safe_load((first / "round.yaml").read_text())
    assert cfg["seed"] == 5 and cfg["critique"]["drop_degenerate"] is False and cfg["model"] == str(tiny_model_dir)
    assert Path(cfg["constitution"]).is_absolute() and cfg["stages"] == ["respond", "critique"]
    r = subprocess.run(CAI + ["round", "run", "--out", str(second), "--config", str(first / "round.yaml")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("responses.jsonl", "sft.jsonl", "critiques.jsonl"):
        strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "provenance"}  # noqa: E731
                           for x in (p / "datasets" / name).read_text().splitlines()]
        assert strip(first) == strip(second), name
    # flags override the config's keys
    third = tmp_path / "c"
    r = subprocess.run(CAI + ["round", "run", "--out", str(third), "--config", str(first / "round.yaml"), "--seed", "6",
                              "--stages", "respond"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    again = yaml.safe_load((third / "round.yaml").read_text())
    assert again["seed"] == 6 and again["stages"] == ["respond"] and again["limit"] == 3


BAD_CONFIG = {
    "unknown key": ("prompts: sample\nsampling:\n  max_new_token: 8\n", "r.yaml:3:3: sampling.max_new_token: unknown key"),
    "bad value": ("prompts: sample\nlabel: {min_margin: 2}\n", "r.yaml:2:21: label.min_margin: Input should be less than 1"),
    "unknown stage": ("prompts: sample\nstages: [respond, critque]\n", "r.yaml:2:9: stages: unknown stage critque"),
    "stage graph": ("prompts: sample\nstages: [critique]\n", "stages: critique needs respond in the same round"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIG))
def test_bad_round_config_is_one_line_with_its_place(kind, tmp_path):
    text, expect = BAD_CONFIG[kind]
    (tmp_path / "r.yaml").write_text(text)
    r = subprocess.run(CAI + ["round", "run", "--out", str(tmp_path / "o"), "--config", "r.yaml"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the module graph


def _imports(path: Path, package_roots: set[str]) -> set[str]:
    """Modules of ours that a file imports, at any depth, except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
            for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in package_roots:
            for a in node.names:
                out.add(f"{node.module}.{a.name}")
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in package_roots}
    return out


def test_no_import_cycle_among_cai_and_workers():
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in list((REPO / "cai").rglob("*.py")) + list((REPO / "workers").rglob("*.py"))}
    graph = {m: {i for i in _imports(p, {"cai", "workers"}) if i in files and i != m} for m, p in files.items()}
    for m in graph:  # a package's __init__ is not an edge of its own
        graph[m] -= {"cai", "workers", "cai.train"}
    cycles = []

    def visit(m, stack):
        for n in graph[m]:
            if n in stack:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in done:
                visit(n, stack + [n])
        done.add(m)

    done: set[str] = set()
    for m in sorted(graph):
        if m not in done:
            visit(m, [m])
    assert not cycles, cycles[:5]
    cai_to_workers = {m: {i for i in graph[m] if i.startswith("workers")} for m in graph if m.startswith("cai")}
    assert {m: v for m, v in cai_to_workers.items() if v} == {"cai.cli": {"workers.client"}}


def test_revision_candidates_keep_the_first_usable_one():
    cons = C.load(DEFAULT)
    one, _ = critique_revise(Scripted([("", True)]), cons, _responses(), CritiqueSettings(passes=1), Sampling(), {})
    two, crit = critique_revise(Scripted([("", True), ("A safer, complete answer.", True)]), cons, _responses(),
                                CritiqueSettings(passes=1, revision_candidates=2),
                                Sampling(), {})
    assert one == [] and two[0]["messages"][-1]["content"] == "A safer, complete answer."
    assert crit[0]["candidates"] == 2 and crit[0]["degenerate"] is None


def test_a_server_only_evaluate_uses_is_checked_before_work(tmp_path, tiny_model_dir):
    """Roles: the evaluate row names the judge role, so its server is preflighted (issue 16 item 7)."""
    import socket

    from cai import rounds
    from cai.config import RoundConfig, ServerSettings
    from cai.errors import InputError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cfg = RoundConfig(prompts="sample", limit=2, model=str(tiny_model_dir), stages=["respond", "evaluate"],
                      judge_engine=ServerSettings(url=f"http://127.0.0.1:{dead}/v1", timeout=5, retries=0))
    with pytest.raises(InputError) as e:
        rounds.prepare(tmp_path / "r", cfg)
    assert any(p.startswith(f"--judge-url http://127.0.0.1:{dead}") for p in e.value.problems), e.value.problems
    assert not (tmp_path / "r").exists()


def test_roles_route_and_record_who_made_each_stage(tmp_path, tiny_model_dir):
    """A separate critic makes the critique stage's text; the manifest says role, model, adapter, engine."""
    from cai import plan, stages
    from cai.config import Round, ServerSettings

    cfg = Round(round_id="r", prompts="x", model=str(tiny_model_dir), critic=str(tiny_model_dir) + "/",
                stages=["respond", "critique", "train-sft", "pairs", "evaluate"])
    made = stages.producers(tmp_path, cfg)
    assert made["critique"]["roles"]["critic"] == {"role": "critic", "model": cfg.critic, "adapter": None,
                                                   "engine": "in-process"}
    assert made["pairs"]["roles"]["policy"]["adapter"] == "adapters/sft"
    assert set(made["evaluate"]["roles"]) == {"policy", "judge"}  # no reward model in this round
    served = cfg.model_copy(update={"engine": ServerSettings(url="http://127.0.0.1:1/v1")})
    assert plan.queue_of(served, "respond") == "cpu" and plan.queue_of(served, "critique") == "generate"
    assert plan.queue_of(served, "evaluate") == "generate"  # its judge runs in process
    assert stages.next_policy(tmp_path, cfg.stages) == "adapters/sft"
    assert [n for n, _ in stages.evaluate.policies(cfg, stages.ROW)] == ["base", "sft"]
