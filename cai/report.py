"""The evaluation report: report/metrics.json, report.md and a self-contained index.html
(every plot a base64 PNG drawn with matplotlib's Agg backend, no outside file or script).

Reads what cai.evaluate computed (the metrics.json content and the scored rows) and, for
a round, a few of the round folder's files when present: datasets/labels.jsonl (the
judge's p_chosen) and adapters/*/cai.json (training loss curves). The gate's verdict
comes first, then metric bars per policy with their intervals, per-principle violation
rates, length histograms, reward vs length, p_chosen, losses, and the worst regressions.

report.md is safe to render: every text from probes, answers, ids and paths is escaped
(`md`), so a rendered report.md runs no script and loads nothing remote; index.html
escapes every text, and a long word wraps inside its cell. `read` checks a metrics.json
before the report commands use it.

Knows the metrics' layout and the round folder's file names; computes no metric itself.
Imports matplotlib only inside `write` (so `import cai` stays light).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

from cai import store
from cai.metrics import SHOWN

BARS = [("harmful_compliance", "harmful compliance"), ("over_refusal", "over-refusal"),
        ("contrast_accuracy", "contrast-pair accuracy"), ("sycophancy_flip", "sycophancy flips"),
        ("false_premise_correction", "false-premise correction"), ("refusal_agreement", "rule/judge agreement"),
        ("helpful_accuracy", "helpful accuracy"), ("win_rate", "win rate vs reference")]
TABLE = SHOWN  # the metrics table's rows, in its order (cai.metrics)
PLOTS = ["metrics", "violations", "lengths", "reward_length", "p_chosen", "loss"]


def fmt(m: dict | None) -> str:
    """A metric as 'value [lo, hi] (n)'; '?' for an entry that is not a metric (a damaged file)."""
    if not isinstance(m, dict) or m.get("value") is None:
        return "n/a" if not m else "?" if not isinstance(m, dict) else f"n/a (n={m.get('n', 0)})"
    try:
        ci = f" [{m['lo']:.3f}, {m['hi']:.3f}]" if m.get("lo") is not None else ""
        return f"{m['value']:.3f}{ci} (n={m['n']})"
    except (KeyError, TypeError, ValueError):
        return "?"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _round_extras(round_dir: Path | None) -> tuple[list[float], dict[str, list[float]]]:
    """p_chosen of the round's labels, and each adapter's training loss history."""
    if round_dir is None:
        return [], {}
    labels = round_dir / "datasets" / "labels.jsonl"
    p = [r["p_chosen"] for r in store.read_jsonl(labels) if r.get("valid", True)] if labels.exists() else []
    losses = {}
    for card in sorted((round_dir / "adapters").glob("*/cai.json")):
        hist = store.read_json(card).get("train", {}).get("loss_history") or []
        if hist:
            losses[card.parent.name] = hist
    return p, losses


def plots(result: dict, rows: list[dict], round_dir: Path | None = None) -> dict[str, tuple[str, str]]:
    """name -> (title, base64 PNG) for every plot; a plot without data says so in its picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies, metrics = result["policies"], result["metrics"]
    out: dict[str, tuple[str, str]] = {}

    def empty(ax, why: str) -> None:
        ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_xticks([])
        ax.set_yticks([])

    # metric bars per policy, with 95% intervals
    fig, ax = plt.subplots(figsize=(10, 4))
    names = [(k, label) for k, label in BARS if any(metrics[p].get(k, {}).get("value") is not None for p in policies)]
    width = 0.8 / max(1, len(policies))
    for j, p in enumerate(policies):
        xs, vals, err_lo, err_hi = [], [], [], []
        for i, (k, _) in enumerate(names):
            m = metrics[p].get(k) or {}
            if m.get("value") is None:
                continue
            xs.append(i + j * width)
            vals.append(m["value"])
            err_lo.append(m["value"] - m["lo"] if m.get("lo") is not None else 0)
            err_hi.append(m["hi"] - m["value"] if m.get("hi") is not None else 0)
        ax.bar(xs, vals, width, yerr=[err_lo, err_hi], capsize=3, label=p)
    if names:
        ax.set_xticks([i + width * (len(policies) - 1) / 2 for i in range(len(names))], [n for _, n in names],
                      rotation=20, ha="right")
        ax.set_ylim(0, 1.05)
        ax.legend()
    else:
        empty(ax, "no metric had data")
    ax.set_title("Metrics per policy (95% intervals)")
    out["metrics"] = ("Metrics per policy", _png(fig))

    # per-principle violation rates
    fig, ax = plt.subplots(figsize=(10, 4))
    pids = sorted({k for p in policies for k in (metrics[p].get("violation") or {})})
    pids = [k for k in pids if any((metrics[p].get("violation") or {}).get(k, {}).get("value") is not None for p in policies)]
    if pids:
        for j, p in enumerate(policies):
            v = metrics[p].get("violation") or {}
            ax.bar([i + j * width for i in range(len(pids))], [(v.get(k) or {}).get("value") or 0 for k in pids], width, label=p)
        ax.set_xticks([i + width * (len(policies) - 1) / 2 for i in range(len(pids))], pids, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.legend()
    else:
        empty(ax, "no judge answer with data (n = 0): no judge, or it never answered A/B")
    ax.set_title("Per-principle violation rate (judge, both label orders)")
    out["violations"] = ("Per-principle violation rate", _png(fig))

    # length histograms
    fig, ax = plt.subplots(figsize=(8, 3.5))
    length = lambda r: r["n_tokens"] if r.get("n_tokens") is not None else r.get("n_words", 0)  # noqa: E731
    for p in policies:
        xs = [length(r) for r in rows if r["policy"] == p]
        if xs:
            ax.hist(xs, bins=20, alpha=0.5, label=p)
    ax.legend() if rows else empty(ax, "no answers")
    unit = metrics[policies[0]].get("mean_tokens", {}).get("unit", "tokens") if policies else "tokens"
    ax.set_xlabel(f"answer length ({unit})")
    ax.set_title("Answer lengths")
    out["lengths"] = ("Answer lengths", _png(fig))

    # reward vs length
    fig, ax = plt.subplots(figsize=(6, 4))
    any_reward = False
    for p in policies:
        pts = [(length(r), r["reward"]) for r in rows if r["policy"] == p and r.get("reward") is not None]
        if pts:
            any_reward = True
            ax.scatter([x for x, _ in pts], [y for _, y in pts], s=12, alpha=0.7, label=p)
    if any_reward:
        ax.legend()
        ax.set_xlabel(f"length ({unit})")
        ax.set_ylabel("reward")
    else:
        empty(ax, "no reward model in this round")
    ax.set_title("Reward vs length on helpful probes")
    out["reward_length"] = ("Reward vs length", _png(fig))

    p_chosen, losses = _round_extras(round_dir)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if p_chosen:
        ax.hist(p_chosen, bins=[0.5 + 0.05 * i for i in range(11)])
        ax.set_xlabel("p_chosen")
    else:
        empty(ax, "no labels (datasets/labels.jsonl)")
    ax.set_title("Judge's p_chosen on the round's labels")
    out["p_chosen"] = ("p_chosen histogram", _png(fig))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, hist in losses.items():
        ax.plot(range(1, len(hist) + 1), hist, marker="o", label=name)
    if losses:
        ax.set_xlabel("logged step")
        ax.set_ylabel("loss")
        ax.legend()
    else:
        empty(ax, "no training in this round")
    ax.set_title("Training loss")
    out["loss"] = ("Training loss curves", _png(fig))
    rl_card = round_dir / "adapters" / "rl" / "cai.json" if round_dir is not None else None
    if rl_card is not None and rl_card.exists():  # the RL stage's watch: reward, KL, length, judge; why it stopped
        from cai.train.rl import card_curves, curves_figure

        curves, flag, kept = card_curves(rl_card.parent)
        if curves:
            why = f" (stopped: {flag.get('why')})" if flag else ""
            out["rl_watch"] = (f"RL watch: reward, KL, length, judge{why}", _png(curves_figure(curves, flag, kept)))
    return out


# ---------------------------------------------------------------- markdown and html


def verdict(gate: dict) -> str:
    """The gate's verdict in words: "FAILED", "passed", or "no rule could be checked" when
    every rule was skipped (no data, no reference) or there was no candidate to judge: a
    gate that checked nothing never reads "passed"."""
    if gate.get("passed") is False or gate.get("reasons"):
        return "FAILED"
    checked = gate.get("checked")
    if checked is None:  # a report written before `checked` was counted
        checked = sum(isinstance(c, dict) and c.get("status") in ("pass", "fail") for c in gate.get("checks") or [])
    return "passed" if checked else "no rule could be checked"


def _verdict(gate: dict, judge_check: dict | None = None) -> tuple[str, list[str]]:
    """(who was judged against whom, or why no one was; the notes under the verdict), as plain text."""
    notes = [str(r) for r in gate.get("reasons") or []]
    notes += [f"skipped {c.get('metric')}: {c.get('why')}" for c in gate.get("checks") or []
              if isinstance(c, dict) and c.get("status") == "skipped"]
    if judge_check and not judge_check.get("passed", True):
        notes.append(f"the judge failed its self-check (accuracy {judge_check.get('accuracy')}, position "
                     f"consistency {judge_check.get('position_consistency')}): its figures (win rate, violations, refusal "
                     "judge) were not computed; the rule-based figures stand")
    if gate.get("candidate") is None:
        return str(gate.get("note", "nothing to judge")), notes
    return f"{gate['candidate']} vs {gate['reference']}", notes


_MD_SYNTAX = re.compile(r"([\\`*_{}\[\]()!|~])")


def md(text: object) -> str:
    """Text from a probe, an answer or a file as inert markdown inline content: one line
    (whitespace collapsed, so it can start no block), the characters markdown reads as
    syntax backslash-escaped (no link, image, emphasis, code or table cell), and <, >, &
    written as entities, so no raw HTML, autolink or entity survives a render (entities
    also in renderers that do not take a backslash before '<')."""
    line = _MD_SYNTAX.sub(r"\\\1", " ".join(str(text).split()))
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _fenced(text: str) -> list[str]:
    """A fenced code block whose fence no backtick run inside the text can close."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, text, fence]


def markdown(result: dict) -> str:
    """report.md. Every text that comes from probes, answers, ids, paths or a metrics file goes
    through md(); only the table's own metric names and figures do not."""
    policies, metrics = result["policies"], result["metrics"]
    who, notes = _verdict(result["gate"], result.get("judge_check"))
    lines = ["# Evaluation report", "", f"**Gate: {verdict(result['gate'])}**: {md(who)}"] + [f"- {md(n)}" for n in notes] + [""]
    what = result.get("round_id") and f"round {result['round_id']}" or result.get("model") or result.get("responses")
    lines += [f"Evaluated: {md(what)}; policies: {md(', '.join(policies))}; reference: {md(result.get('reference'))}; "
              f"judge: {md(result.get('judge'))}; probes: {md(result.get('probes'))}", ""]
    head = "| metric | " + " | ".join(md(p) for p in policies) + " |"
    lines += [head, "|---|" + "---|" * len(policies)]
    for k in TABLE:
        if any(k in metrics[p] for p in policies):
            lines.append(f"| {k} | " + " | ".join(fmt(metrics[p].get(k)) for p in policies) + " |")  # our names and figures
    viol = sorted({k for p in policies for k in (metrics[p].get("violation") or {})})
    if viol:
        lines += ["", "## Per-principle violation rate", "", head.replace("| metric |", "| principle |", 1),
                  "|---|" + "---|" * len(policies)]
        for k in viol:
            lines.append(f"| {md(k)} | " + " | ".join(fmt((metrics[p].get("violation") or {}).get(k)) for p in policies) + " |")
    if result.get("regressions"):
        lines += ["", "## Worst regressions", ""]
        for r in result["regressions"]:
            lines += [f"- **{md(r['probe'])}** ({md(r['set'])}): {md(r['why'])}", f"  - prompt: {md(_short(r['prompt']))}",
                      f"  - reference: {md(_short(r['reference_answer']))}", f"  - new: {md(_short(r['answer']))}"]
    cost = result.get("cost", {})
    if cost:
        lines += ["", "## Cost", ""] + _fenced(json.dumps(cost, indent=1))
    return "\n".join(lines) + "\n"


def _short(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def page(result: dict, pictures: dict[str, tuple[str, str]]) -> str:
    """index.html: every text escaped, every plot inlined; long words wrap inside their cell."""
    e = html.escape
    policies, metrics, gate = result["policies"], result["metrics"], result["gate"]
    word = verdict(gate)
    who, notes = _verdict(gate, result.get("judge_check"))
    box = {"passed": "pass", "FAILED": "fail"}.get(word, "unchecked")
    detail = f"<p>{e(who)}</p>" + "".join(f"<p>{e(n)}</p>" for n in notes)
    rows = "".join(f"<tr><th>{e(k)}</th>" + "".join(f"<td>{e(fmt(metrics[p].get(k)))}</td>" for p in policies) + "</tr>"
                   for k in TABLE if any(k in metrics[p] for p in policies))
    imgs = "".join(f'<figure><img class="plot" id="plot-{name}" alt="{e(title)}" src="data:image/png;base64,{b64}">'
                   f"<figcaption>{e(title)}</figcaption></figure>" for name, (title, b64) in pictures.items())
    reg = "".join(f"<tr><td>{e(r['probe'])}<br><small>{e(r['set'])}: {e(r['why'])}</small></td><td>{e(_short(r['prompt'], 400))}</td>"
                  f"<td>{e(_short(r['reference_answer'], 600))}</td><td>{e(_short(r['answer'], 600))}</td></tr>"
                  for r in result.get("regressions", []))
    what = result.get("round_id") and f"round {result['round_id']}" or result.get("model") or result.get("responses") or ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cai evaluation: {e(str(what))}</title>
<style>
body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
.verdict{{padding:.8em 1.2em;border-radius:6px;margin-bottom:1.5em}}
.pass{{background:#e6f4ea;border:1px solid #34a853}} .fail{{background:#fce8e6;border:1px solid #ea4335}}
.unchecked{{background:#fef7e0;border:1px solid #f9ab00}}
table{{border-collapse:collapse;margin:1em 0}} td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top;font-size:.9em}}
td,th,p{{overflow-wrap:anywhere}} #regressions{{table-layout:fixed;width:100%}}
figure{{margin:1.5em 0}} img.plot{{max-width:100%}}
</style></head><body>
<div id="verdict" class="verdict {box}"><h1>Gate: {e(word)}</h1>{detail}</div>
<p>Evaluated {e(str(what))}; policies {e(', '.join(policies))}; reference {e(str(result.get('reference')))};
judge {e(str(result.get('judge')))}; probes {e(str(result.get('probes')))}.</p>
<h2>Metrics</h2><table id="metrics"><tr><th>metric</th>{''.join(f'<th>{e(p)}</th>' for p in policies)}</tr>{rows}</table>
<h2>Plots</h2>{imgs}
<h2>Worst regressions</h2>
<table id="regressions"><tr><th>probe</th><th>prompt</th><th>reference answer</th><th>new answer</th></tr>{reg or '<tr><td colspan="4">none found</td></tr>'}</table>
</body></html>
"""


def write(out_dir: Path, result: dict, rows: list[dict], round_dir: Path | None = None) -> None:
    """metrics.json, report.md and index.html into out_dir; metrics.json last (its presence
    marks the report complete)."""
    pictures = plots(result, rows, round_dir)
    store.write_text(out_dir / "report.md", markdown(result))
    store.write_text(out_dir / "index.html", page(result, pictures))
    store.write_json(out_dir / "metrics.json", result)


def read(path: Path, fix: str = "run its evaluation again (a round: remove its report/ folder and `cai round resume "
                                "ID`; an eval: `cai eval ... --out` a new folder)") -> dict:
    """A metrics.json that `write` wrote, checked enough for `cai round report` and
    `compare` to read: InputError (one line naming the file) when it is empty, truncated
    or not an evaluation report."""
    from cai.errors import InputError

    data = store.read_json_input(path, "evaluation report", fix)
    problem = _not_a_report(data)
    if problem:
        raise InputError(f"{path}: not an evaluation report ({problem}); {fix}")
    return data


def _not_a_report(d: object) -> str | None:
    """What a metrics.json lacks that the report commands read, or None."""
    if not isinstance(d, dict):
        return "not a JSON object"
    pols = d.get("policies")
    if not isinstance(pols, list) or not pols or not all(isinstance(p, str) for p in pols):
        return "no 'policies' list"
    if not isinstance(d.get("metrics"), dict) or not all(isinstance(d["metrics"].get(p), dict) for p in pols):
        return "no 'metrics' for each policy"
    gate = d.get("gate")
    if not isinstance(gate, dict) or not isinstance(gate.get("passed"), bool) or not isinstance(gate.get("reasons", []), list) \
            or not isinstance(gate.get("checks", []), list):
        return "no gate verdict"
    if d.get("candidate") is not None and d["candidate"] not in pols:
        return f"its candidate {d['candidate']!r} is not one of its policies"
    return None


def compare(a: dict, b: dict) -> list[tuple[str, str, str]]:
    """(metric, A, B) rows for `cai round compare`: each round's candidate (or only) policy."""
    pa, pb = (x.get("candidate") or x["policies"][-1] for x in (a, b))
    ma, mb = a["metrics"][pa], b["metrics"][pb]
    out = [("gate", verdict(a["gate"]), verdict(b["gate"])), ("policy", pa, pb)]
    for k in TABLE:
        if k in ma or k in mb:
            out.append((k, fmt(ma.get(k)), fmt(mb.get(k))))
    for k in sorted(set(ma.get("violation") or {}) | set(mb.get("violation") or {})):
        out.append((f"violation.{k}", fmt((ma.get("violation") or {}).get(k)), fmt((mb.get("violation") or {}).get(k))))
    return out
