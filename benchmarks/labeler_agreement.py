"""How well does a local AI labeler agree with people? One table row per human-labelled set in ../shared/data.

    python -m benchmarks.labeler_agreement --model ~/.cache/tether/models/smollm2-135m-instruct --out /tmp/labeler_agreement

Each set is converted with the project's own converters (tether.ai.convert for LLMBar and the MT-Bench
human judgments LLMBar ships processed, tether.data.convert for the rest) into OUT/data/SET.jsonl, then a
fixed sample of --n pairs (seeded, the same for every model) is judged with one principle in both orders
and scored by tether.ai.eval_labeler.evaluate: agreement with the human choice and its 95% Wilson
interval, position-flip rate, ECE, the length-only and random baselines, and routing: for a target final
agreement (humans label what is routed to them and are taken as right), the share of pairs that
confidence routing auto-labels against random routing (its expected share, and p: the share of 1,000
random routings, the confidences shuffled over the pairs, that auto-label as much). Routing is printed
only for sets with at least --routing-min judged pairs (a small sample's ranking says little).

Each finished set is saved (OUT/SET.json, OUT/SET.judgements.jsonl) and skipped by a rerun with the same
model, --n, --seed and principle, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

SETS = {  # name -> (converter, path under the data folder)
    "llmbar": ("llmbar", "llmbar/Dataset/LLMBar"),
    "mtbench-human": ("llmbar", "llmbar/Dataset/Processed/MT-Bench/dataset.json"),
    "hhh": ("hhh", "hhh-alignment"),
    "qa-feedback": ("qa-feedback", "qa-feedback/dev_feedback.json"),
    "lfqa": ("lfqa", "lfqa-expert-preferences/experts_pairwise_human_preferences.jsonl"),
    "oasst": ("oasst", "oasst-en-100-trees/en_100_tree.jsonl"),
}


def prepare(name: str, data: Path, out: Path) -> Path:
    """The set as a preference file, written by the project's converter (once)."""
    kind, rel = SETS[name]
    path = out / "data" / f"{name}.jsonl"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "llmbar":
        from tether.ai.convert import llmbar_records
        from tether.data.convert import write_jsonl

        write_jsonl(llmbar_records(data / rel), path)
    else:
        from tether.data.convert import convert

        convert(kind, str(data / rel), str(path))
    return path


def sample(items: list, n: int, seed: int) -> list:
    if n <= 0 or len(items) <= n:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def pct(d: dict | None) -> str:
    return f"{100 * d['rate']:.1f}" if d and d["n"] else "–"


def shuffled(judgements: Path, target: float, share: float, reps: int = 1000, seed: int = 0) -> float:
    """The share of random routings (the labeler's confidences shuffled over the pairs, scored by the same
    best-prefix rule) that auto-label at least `share`: how often chance does as well as confidence."""
    from tether.ai.eval_labeler import _score, routing

    ps = [json.loads(x)["p_human"] for x in judgements.read_text().splitlines()]
    ps = [p for p in ps if p is not None]
    conf, correct = [max(p, 1 - p) for p in ps], [_score(p) for p in ps]
    rng, hits = random.Random(seed), 0
    for _ in range(reps):
        rng.shuffle(conf)
        got = routing(conf, correct, thresholds=(), targets=(target,))["savings"][0]["confidence_share_auto"]
        hits += got >= share - 1e-12
    return hits / reps


def row(name: str, m: dict, target: float, routing_min: int, judgements: Path) -> list[str]:
    a = m["agreement"]
    flip = m["position_flip_rate"]
    cells = [name, str(m["judged"]), f"{100 * a['rate']:.1f} [{100 * a['ci95'][0]:.1f}, {100 * a['ci95'][1]:.1f}]",
             pct(flip), f"{m['ece']:.3f}", pct(m["baselines"]["length"]), pct(m["baselines"]["random"])]
    s = next((s for s in m["routing"]["savings"] if abs(s["target"] - target) < 1e-9), None)
    if s is None or m["judged"] < routing_min:
        return cells + ["–", "–", "–"]
    return cells + [f"{100 * s['confidence_share_auto']:.0f}", f"{100 * s['random_share_auto']:.0f}",
                    f"{shuffled(judgements, target, s['confidence_share_auto']):.2f}"]


def main(argv: list[str] | None = None) -> int:
    from tether.ai.eval_labeler import TARGETS

    ap = argparse.ArgumentParser(prog="python -m benchmarks.labeler_agreement", description=__doc__.strip().splitlines()[0])
    ap.add_argument("--model", required=True, help="a local chat model folder (tether model import-gguf --out DIR)")
    ap.add_argument("--data", default="../shared/data", help="the shared data folder")
    ap.add_argument("--out", default="/tmp/labeler_agreement")
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated, from: " + ", ".join(SETS))
    ap.add_argument("--n", type=int, default=100, help="pairs per set (seeded sample; 0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--principle", default="helpfulness", help="the default constitution's principle to judge by")
    ap.add_argument("--max-length", type=int, default=2048, help="longer comparisons have their responses shortened")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--target", type=float, default=0.9, choices=TARGETS, help="final agreement for the routing columns")
    ap.add_argument("--routing-min", type=int, default=100, help="judged pairs a set needs for its routing columns")
    a = ap.parse_args(argv)
    names = [s for s in a.sets.split(",") if s]
    for s in names:
        if s not in SETS:
            ap.error(f"--sets: unknown set {s!r} (known: {', '.join(SETS)})")

    from tether.ai.constitution import load_constitution
    from tether.ai.eval_labeler import evaluate
    from tether.ai.judge import LocalJudge, label, read_items
    from tether.atomic import atomic_write_text

    out, data = Path(a.out), Path(a.data)
    constitution = load_constitution(None)
    constitution.get(a.principle)
    key = {"model": str(Path(a.model).expanduser().resolve()), "n": a.n, "seed": a.seed, "principle": a.principle, "max_length": a.max_length}
    judge = None
    header = ["set", "pairs", "agreement % [95% CI]", "flip %", "ECE", "length-only %", "random %",
              f"auto @{a.target:.0%}: confidence %", "random %", "p (shuffled)"]
    rows = []
    for name in names:
        saved = out / f"{name}.json"
        done = json.loads(saved.read_text()) if saved.exists() else None
        if done is None or done["key"] != key:
            items = sample(read_items(prepare(name, data, out)), a.n, a.seed)
            judge = judge or LocalJudge(key["model"], "cpu", a.batch_size, a.max_length)
            print(f"{name}: judging {len(items)} pairs in both orders", file=sys.stderr, flush=True)
            t0, judge.n_truncated = time.monotonic(), 0
            results = label(items, judge, constitution, a.principle, True, a.seed)
            done = {"key": key, "seconds": time.monotonic() - t0, "truncated": judge.n_truncated, "metrics": evaluate(results)}
            atomic_write_text(out / f"{name}.judgements.jsonl", "".join(
                json.dumps({"id": r.item.id, "p_human": r.p, "p_orders": r.per_principle, "flip": r.flip}) + "\n" for r in results))
            atomic_write_text(saved, json.dumps(done, indent=1))
        rows.append(row(name, done["metrics"], a.target, a.routing_min, out / f"{name}.judgements.jsonl"))
        print(f"{name}: {done['seconds']:.0f} s, {done['truncated']} comparisons shortened to --max-length", file=sys.stderr, flush=True)
        print("| " + " | ".join(rows[-1]) + " |", file=sys.stderr, flush=True)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
