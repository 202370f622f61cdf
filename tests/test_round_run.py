"""`cai round run` end to end on the embedded model, and bad input refused before loading."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_constitution import DEFAULT, GOOD

CAI = [sys.executable, "-m", "cai.cli"]


def run(args, **kw):
    return subprocess.run(CAI + args, capture_output=True, text=True, **kw)


@pytest.mark.e2e
def test_round_run_end_to_end_on_embedded_model(tmp_path, embedded_dir):
    import datasets

    out = tmp_path / "round"
    r = run(["round", "run", "--prompts", "sample", "--limit", "4", "--passes", "1", "--max-new-tokens", "48",
             "--shard-size", "2", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads((out / "manifest.json").read_text())
    assert man["finished"] and man["stages"]["critique"]["status"] == "done"
    assert man["stages"]["respond"]["units"] == 2
    assert man["constitution"]["hash"].startswith("sha256:") and man["versions"]["transformers"]
    counts = man["counts"]
    assert counts["prompts"] == 4 and counts["critique_passes"] == 4
    assert counts["revisions_accepted"] + sum(counts["revisions_degenerate"].values()) == 4
    assert counts["sft_rows"] + counts["sft_dropped_no_accepted_revision"] == 4
    assert (out / "constitution.yaml").read_text().startswith("name: harmless-helpful")
    crit = [json.loads(x) for x in (out / "datasets" / "critiques.jsonl").read_text().splitlines()]
    assert len(crit) == 4 and all(c["critique"] for c in crit)
    assert all(c["provenance"]["constitution_hash"] == man["constitution"]["hash"] for c in crit)
    if counts["sft_rows"]:
        ds = datasets.load_dataset("json", data_files=str(out / "datasets" / "sft.jsonl"), split="train")
        assert ds[0]["messages"][-1]["role"] == "assistant"
        assert ds[0]["provenance"]["round"] == man["round_id"]


def _cons(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BAD_ROUND = {
    "bad_constitution": (lambda t: ["--constitution", str(_cons(t, GOOD.replace("weight: 2", "weight: 0"))), "--prompts", "sample"], "c.yaml:7:13"),
    "malformed_prompts_line": (lambda t: ["--prompts", str(_write(t / "p.jsonl", '{"prompt": "a"}\n{oops\n'))], "p.jsonl:2: malformed JSON"),
    "empty_prompt_set": (lambda t: ["--prompts", str(_write(t / "p.jsonl", "\n"))], "prompt set is empty"),
    "missing_model": (lambda t: ["--prompts", "sample", "--model", str(t / "no-such-model")], "no-such-model': not found"),
    "unknown_stage": (lambda t: ["--prompts", "sample", "--stages", "respond,critque"], "unknown stage critque"),
}


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


@pytest.mark.parametrize("kind", sorted(BAD_ROUND))
def test_round_run_refuses_bad_input_before_loading(kind, tmp_path):
    make, expect = BAD_ROUND[kind]
    out = tmp_path / "out"
    r = run(["round", "run", *make(tmp_path), "--out", str(out)])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert expect in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()  # nothing written


def test_round_run_refuses_non_empty_out(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    r = run(["round", "run", "--prompts", "sample", "--out", str(tmp_path)])
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"
