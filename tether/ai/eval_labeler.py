"""`tether eval labeler`: how good is an AI labeler against human preference labels?

    tether eval labeler --labeler DIR|URL --data prefs.jsonl [more.jsonl] --out reports/labeler

Each record's `chosen` is the human choice. The labeler judges every pair (both orders by default; the
order in the file is never shown to it: the orders are (chosen, rejected) and (rejected, chosen)) and is
scored on:
- agreement: the share of pairs where it prefers the human's choice (an exact tie counts half), with a
  95% Wilson interval;
- position flips: the share of pairs whose two orders disagree about the winner;
- calibration: ECE of its confidence max(p, 1-p) over [0.5, 1] (a calibrated 0.7 is right 70% of the time);
- baselines: length only (the longer response wins, equal lengths half) and random (a seeded coin);
- routing: at each confidence threshold, the share auto-labelled (confidence >= threshold) and the
  agreement on that share, against random routing of the same share (whose expected agreement is the
  overall agreement); and, for a target agreement of the final labels (humans label what is routed to
  them and are taken as right), the largest share of human labelling each routing saves.

Writes OUT/report.md, OUT/metrics.json, OUT/judgements.jsonl (one line per pair: p = P(human choice
better), the orders' probabilities, flip) and for a URL OUT/cache.jsonl (reruns send no request twice).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
TARGETS = (0.8, 0.9, 0.95)


def _score(p: float) -> float:
    return 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0


def _rate(xs: list[float]) -> dict:
    from tether.eval.metrics import wilson_interval

    n = len(xs)
    s = sum(xs)
    return {"rate": s / n if n else float("nan"), "n": n, "ci95": list(wilson_interval(s, n))}


def routing(conf: list[float], correct: list[float], thresholds=THRESHOLDS, targets=TARGETS) -> dict:
    """Confidence routing against random routing of the same share (see the module doc)."""
    n = len(conf)
    overall = sum(correct) / n if n else float("nan")
    rows = []
    for t in thresholds:
        auto = [c for k, c in zip(conf, correct) if k >= t]
        share = len(auto) / n if n else float("nan")
        rows.append({"threshold": t, "n_auto": len(auto), "share_auto": share,
                     "agreement_auto": _rate(auto) if auto else None, "random_agreement_auto": overall,
                     "final_agreement": (sum(auto) + (n - len(auto))) / n if n else float("nan")})
    order = sorted(range(n), key=lambda i: -conf[i])
    saves = []
    for target in targets:
        best, right = 0, 0.0
        for k in range(1, n + 1):  # auto-label the k most confident pairs, humans the rest
            right += correct[order[k - 1]]
            if (right + (n - k)) / n >= target - 1e-12:
                best = k
        rand = 1.0 if overall >= target else (1 - target) / (1 - overall)
        saves.append({"target": target, "confidence_share_auto": best / n if n else float("nan"), "random_share_auto": rand})
    return {"thresholds": rows, "savings": saves}


def evaluate(results, items_total: int | None = None) -> dict:
    """Metrics of label() results on preference items (x = the human's choice)."""
    from tether.eval.metrics import ece_from_bins, reliability_bins

    ok = [r for r in results if r.p is not None]
    correct = [_score(r.p) for r in ok]
    conf = [r.confidence for r in ok]
    bins = reliability_bins(conf, correct, 10, 0.5, 1.0)
    length = []
    for r in ok:
        _, x, y = r.item.texts
        length.append(1.0 if len(x) > len(y) else 0.5 if len(x) == len(y) else 0.0)
    rng = random.Random(0)
    rand = [float(rng.random() < 0.5) for _ in ok]
    both = [r for r in ok if any(len(v) == 2 for v in r.per_principle.values())]
    return {
        "pairs": len(results) if items_total is None else items_total, "judged": len(ok), "failed": len(results) - len(ok),
        "ties": sum(r.p == 0.5 for r in ok),
        "agreement": _rate(correct),
        "position_flip_rate": _rate([float(r.flip) for r in both]) if both else None,
        "mean_confidence": sum(conf) / len(conf) if conf else float("nan"),
        "ece": ece_from_bins(bins), "calibration_bins": bins,
        "baselines": {"length": _rate(length), "random": _rate(rand), "random_expected": 0.5},
        "routing": routing(conf, correct),
        "by_source": _by_source(ok, correct),
    }


def _by_source(ok, correct) -> dict:
    """Agreement per record `source` (e.g. LLMBar's subsets), when a file mixes several."""
    groups: dict[str, list[float]] = {}
    for r, c in zip(ok, correct):
        groups.setdefault(r.item.meta.get("source", ""), []).append(c)
    return {k: _rate(v) for k, v in sorted(groups.items())} if len(groups) > 1 else {}


def write_report(out: Path, labeler: str, per_file: dict[str, dict], seconds: float) -> Path:
    from tether.eval.report import Report, reliability_plot

    rep = Report(out, "AI labeler report")
    rep.text(f"Labeler: `{labeler}`. Agreement = the share of pairs where it prefers the human's choice (ties half), "
             f"95% Wilson intervals. {seconds:.1f} s.")
    rep.h2("Agreement with human labels")
    ci = lambda d: f"{100 * d['rate']:.1f}% [{100 * d['ci95'][0]:.1f}, {100 * d['ci95'][1]:.1f}]" if d and d["n"] else "–"  # noqa: E731
    rep.table(["file", "pairs", "failed", "labeler", "length only", "random", "flip rate", "ECE"],
              [[f, m["pairs"], m["failed"], ci(m["agreement"]), ci(m["baselines"]["length"]), ci(m["baselines"]["random"]),
                m["position_flip_rate"]["rate"] if m["position_flip_rate"] else None, m["ece"]] for f, m in per_file.items()])
    for f, m in per_file.items():
        if m["by_source"]:
            rep.h2(f"By source: {f}")
            rep.table(["source", "pairs", "agreement"], [[k, v["n"], ci(v)] for k, v in m["by_source"].items()])
        rep.h2(f"Routing: {f}")
        rep.text("Pairs at or above the confidence threshold are auto-labelled, the rest go to humans. Random routing "
                 "of the same share agrees, in expectation, as often as the labeler does overall.")
        rep.table(["threshold", "auto-labelled", "agreement (auto)", "random routing", "final agreement"],
                  [[t["threshold"], f"{t['n_auto']} ({100 * t['share_auto']:.0f}%)", ci(t["agreement_auto"]),
                    t["random_agreement_auto"], t["final_agreement"]] for t in m["routing"]["thresholds"]])
        rep.table(["target final agreement", "share auto-labelled: by confidence", "random"],
                  [[s["target"], s["confidence_share_auto"], s["random_share_auto"]] for s in m["routing"]["savings"]])
        if m["judged"]:
            fig, ax = rep.figure()
            reliability_plot(ax, m["calibration_bins"], "labeler")
            ax.set_xlabel("confidence max(p, 1-p)")
            rep.save_figure(fig, f"calibration {f}", f"Calibration of the labeler's confidence on {f}")
    rep.metrics = {"labeler": labeler, "seconds": seconds, "files": per_file}
    return rep.write()


def run(a) -> Path:
    from tether.ai.cli import build_judge
    from tether.ai.constitution import load_constitution
    from tether.ai.judge import label, read_items

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    constitution = load_constitution(a.constitution)
    if a.principles not in ("all", "sample"):
        constitution.get(a.principles)
    files = [f for v in a.data for f in v.split(",") if f]
    loaded = {f: read_items(f) for f in files}  # every file read before any judging
    for f, items in loaded.items():
        if any(it.human is None for it in items):
            raise ValueError(f"{f}: needs preference records (chosen = the human's choice), not unlabelled tasks")
    judge = build_judge(a, out / "cache.jsonl")
    per_file, lines, t0 = {}, [], time.monotonic()
    try:
        for f, items in loaded.items():
            if a.max_pairs and len(items) > a.max_pairs:
                items = [items[i * len(items) // a.max_pairs] for i in range(a.max_pairs)]
            print(f"tether eval labeler: judging {len(items)} pairs of {f} with {judge.identity}", file=sys.stderr)
            results = label(items, judge, constitution, a.principles, a.both_orders, a.seed, a.on_flip)
            m = per_file[Path(f).name] = evaluate(results)
            lines += [{"file": f, "id": r.item.id, "p_human": r.p, "p_orders": r.per_principle, "flip": r.flip, "errors": r.errors}
                      for r in results]
            print(f"  agreement {100 * m['agreement']['rate']:.1f}% over {m['judged']} pairs (length only "
                  f"{100 * m['baselines']['length']['rate']:.1f}%), {m['failed']} failed", file=sys.stderr)
    finally:
        getattr(judge, "close", lambda: None)()
    (out / "judgements.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return write_report(out, judge.identity, per_file, time.monotonic() - t0)
