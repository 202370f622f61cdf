"""Train the refusal classifier (cai.refusal) and measure it: `python -m cai.refusal_train`.

Reads cai/data/refusal/dev.jsonl (prompt, response, label full|partial|none, style, split
dev|heldout), fits a multinomial logistic regression on the features of cai.refusal over
the dev rows only, and writes cai/data/refusal/model.json: weights, vocabulary, and the
figures the report shows beside the metrics the classifier feeds:
  dev_cv   5-fold cross-validation on the dev rows (what the features were tuned on);
  heldout  agreement on the held-out rows (written separately, other topics and phrasings,
           never used for tuning): binary (refused or not), 3-way, n, the confusion matrix,
           with and without the request given;
  external the same on XSTest v2's completions by five production assistants with their
           human labels (cai/data/refusal/xstest_v2.jsonl), and per assistant: data we did
           not write, read only to measure.
Every figure is computed through cai.refusal.probabilities, the same pure-Python inference
the evaluator runs, so what is measured is what ships.

Each dev row is trained twice, with its request and without, so the classifier also works
on an answer alone (detect(text)).

numpy is imported inside the functions that need it (`import cai` stays light).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

from cai import refusal

VERSION = "refusal-lr-2"  # v1 was the rule detector (first-person decline in the opening sentences)
DATA = Path(__file__).parent / "data" / "refusal" / "dev.jsonl"
# An external set, read only to measure (never fitted or tuned on): XSTest v2's 2,250 completions by
# five production assistants (GPT-4, Llama-2-70b-chat with and without its system prompt, Mistral-7B-
# instruct with and without a guardrail prompt), each labeled full compliance / full refusal / partial
# refusal by two people (Röttger et al., NAACL 2024; CC-BY-4.0, LICENSE-xstest.txt beside it; from
# github.com/paul-rottger/exaggerated-safety, commit d7bb5bd, model_completions/*.csv). Changed from the
# original: CSV rows turned into JSONL (id, type, prompt; completion -> response; the file's model ->
# assistant; final_label 1_full_compliance / 2_full_refusal / 3_partial_refusal -> none / full / partial).
EXTERNAL = Path(__file__).parent / "data" / "refusal" / "xstest_v2.jsonl"
OUT = Path(__file__).parent / "data" / "refusal" / refusal.MODEL_FILE
HYPER = {"l2_dense": 0.01, "l2_tokens": 1.0, "min_df": 2, "iters": 400, "lr": 1.0, "momentum": 0.9, "folds": 5, "seed": 0}


def load(path: Path = DATA, split: bool = True) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text("utf-8").splitlines() if x.strip()]
    for n, r in enumerate(rows, 1):
        if r.get("label") not in refusal.LABELS or (split and r.get("split") not in ("dev", "heldout")):
            raise ValueError(f"{path}:{n}: label must be one of {refusal.LABELS}" + (" and split dev or heldout" if split else ""))
    return rows


def _examples(rows: list[dict]) -> list[tuple[dict[str, float], list[str], int, bool]]:
    """(features, tokens, label index, is-a-copy) for every row, with and without its prompt."""
    out = []
    for r in rows:
        y = refusal.LABELS.index(r["label"])
        d, t = refusal.features(r["response"], r.get("prompt"))
        out.append((d, t, y, False))
        d, t = refusal.features(r["response"], None)
        out.append((d, t, y, True))
    return out


def fit(rows: list[dict], hyper: dict = HYPER) -> dict:
    """The model (as model.json holds it) trained on `rows`."""
    import numpy as np

    ex = _examples(rows)
    dense = sorted({k for d, _, _, _ in ex for k in d})
    df = Counter(t for _, toks, _, copy in ex if not copy for t in set(toks))
    vocab = sorted(t for t, c in df.items() if c >= hyper["min_df"])
    col = {name: j for j, name in enumerate(dense + vocab)}
    X = np.zeros((len(ex), len(col)), np.float32)
    for i, (d, toks, _, _) in enumerate(ex):
        for k, v in d.items():
            X[i, col[k]] = v
        for t in set(toks):
            if t in col:
                X[i, col[t]] = 1.0
    y = np.array([e[2] for e in ex])
    n, k = X.shape[0], len(refusal.LABELS)
    Y = np.eye(k, dtype=np.float32)[y]
    reg = np.full(X.shape[1], hyper["l2_tokens"], np.float32)
    reg[: len(dense)] = hyper["l2_dense"]
    W, b = np.zeros((X.shape[1], k), np.float32), np.zeros(k, np.float32)
    vW, vb = np.zeros_like(W), np.zeros_like(b)
    mu, lr = hyper["momentum"], hyper["lr"]
    for _ in range(hyper["iters"]):  # full-batch gradient descent, Nesterov momentum, L2
        Wl, bl = W - mu * vW, b - mu * vb
        Z = X @ Wl + bl
        Z -= Z.max(1, keepdims=True)
        P = np.exp(Z)
        P /= P.sum(1, keepdims=True)
        vW = mu * vW + lr * (X.T @ (P - Y) / n + reg[:, None] * Wl / n)
        vb = mu * vb + lr * (P - Y).mean(0)
        W -= vW
        b -= vb
    weights = {name: [round(float(v), 5) for v in W[j]] for name, j in col.items()
               if name in dense or float(np.abs(W[j]).max()) >= 0.005}
    return {"labels": list(refusal.LABELS), "bias": [round(float(v), 5) for v in b], "weights": weights}


def confusion(model: dict, rows: list[dict], with_prompt: bool = True) -> list[list[int]]:
    """Counts of (hand label, the model's label), both in LABELS order."""
    cm = [[0] * 3 for _ in range(3)]
    for r in rows:
        got = refusal.decide(refusal.probabilities(r["response"], r.get("prompt") if with_prompt else None, model))
        cm[refusal.LABELS.index(r["label"])][refusal.LABELS.index(got)] += 1
    return cm


def measure(model: dict, rows: list[dict], with_prompt: bool = True) -> dict:
    """Agreement of the model's labels with the hand labels: binary, 3-way, n, confusion
    (rows: the hand label, columns: the model's, both in LABELS order)."""
    return figures(confusion(model, rows, with_prompt))


def figures(cm: list[list[int]]) -> dict:
    n = sum(map(sum, cm))
    three = sum(cm[i][i] for i in range(3))
    binary = sum(cm[i][j] for i in range(3) for j in range(3) if (i == 2) == (j == 2))
    return {"binary": round(binary / n, 4) if n else None, "three_way": round(three / n, 4) if n else None, "n": n,
            "confusion": {"labels": list(refusal.LABELS), "rows": "hand label", "columns": "classifier", "matrix": cm}}


def cross_validate(rows: list[dict], hyper: dict = HYPER) -> dict:
    """k-fold cross-validation (shuffled, seeded) on `rows`: the pooled figures."""
    idx = list(range(len(rows)))
    random.Random(hyper["seed"]).shuffle(idx)
    k = hyper["folds"]
    total = [[0] * 3 for _ in range(3)]
    for f in range(k):
        test = set(idx[f::k])
        model = fit([rows[i] for i in idx if i not in test], hyper)
        cm = measure(model, [rows[i] for i in sorted(test)])["confusion"]["matrix"]
        total = [[a + b for a, b in zip(x, y)] for x, y in zip(total, cm)]
    n = len(rows)
    return {"binary": round(sum(total[i][j] for i in range(3) for j in range(3) if (i == 2) == (j == 2)) / n, 4),
            "three_way": round(sum(total[i][i] for i in range(3)) / n, 4), "n": n, "folds": k,
            "confusion": {"labels": list(refusal.LABELS), "rows": "hand label", "columns": "classifier", "matrix": total}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-cv", action="store_true", help="skip the dev cross-validation (keeps no dev_cv figures)")
    ap.add_argument("--dev-only", action="store_true", help="cross-validate on the dev rows and stop: no model written, "
                    "the held-out rows not read (for working on the features)")
    args = ap.parse_args(argv)
    rows = load(args.data)
    dev = [r for r in rows if r["split"] == "dev"]
    held = [r for r in rows if r["split"] == "heldout"]
    if args.dev_only:
        cv = cross_validate(dev)
        print(json.dumps(cv))
        return cv
    model = fit(dev)
    model = {"version": VERSION, **model}
    model["dev_cv"] = None if args.no_cv else cross_validate(dev)
    model["heldout"] = {**measure(model, held), "without_prompt": {k: v for k, v in measure(model, held, False).items() if k != "confusion"},
                        "source": "split 'heldout' of cai/data/refusal/dev.jsonl: written before the dev rows, other topics, never tuned on"}
    ext = load(EXTERNAL, split=False)
    by = {a: confusion(model, [r for r in ext if r["assistant"] == a]) for a in sorted({r["assistant"] for r in ext})}
    total = [[sum(cm[i][j] for cm in by.values()) for j in range(3)] for i in range(3)]
    model["external"] = {**figures(total),
                         "by_assistant": {a: {k: v for k, v in figures(cm).items() if k != "confusion"} for a, cm in by.items()},
                         "source": "XSTest v2 (Röttger et al. 2024), 2,250 completions by GPT-4, Llama-2-70b-chat and "
                                   "Mistral-7B-instruct with their human labels: not written by us, never tuned on"}
    model["data"] = {"file": "cai/data/refusal/dev.jsonl", "sha256": hashlib.sha256(args.data.read_bytes()).hexdigest(),
                     "dev": dict(Counter(r["label"] for r in dev)), "heldout": dict(Counter(r["label"] for r in held))}
    model["hyper"] = HYPER
    # figures first in the file, weights last
    ordered = {k: model[k] for k in ("version", "heldout", "external", "dev_cv", "data", "hyper", "labels", "bias", "weights")}
    head = json.dumps({k: v for k, v in ordered.items() if k != "weights"}, indent=1, ensure_ascii=False)[:-2]
    lines = ",\n".join(f"  {json.dumps(k, ensure_ascii=False)}: {json.dumps(v)}" for k, v in sorted(ordered["weights"].items()))
    args.out.write_text(f"{head},\n \"weights\": {{\n{lines}\n }}\n}}\n", "utf-8")
    refusal._model.cache_clear()
    print(json.dumps({k: ordered[k] for k in ("version", "heldout", "external", "dev_cv", "data")}, indent=1))
    return ordered


if __name__ == "__main__":
    main()
