"""Iterative RLHF against one round, with the same labelling budget (issue 21's experiment).

    python -m benchmarks.loop_experiment                      # 3 seeds x 4 variants, ~25 min on 2 cores
    python -m benchmarks.loop_experiment --seeds 0 --variants a,b
    python -m benchmarks.loop_experiment --variants a,a_ppo20,b,b_ppo60   # the diagnostics, ~10 min more

The demo's setting (tiny GPT-2 from `tether demo`'s pretraining and SFT, VADER as the gold judge, the
simulated annotator pool) with 1,500 pairs sent for labelling in total and 60 PPO iterations in total:

    a            one round: 1,500 pairs from 600 prompts of the SFT policy, PPO 60 iterations
    b            3 rounds: 500 pairs from 200 fresh prompts of the current policy, PPO 20 iterations each
    c_margin     b, the pairs the last RM is least sure of (smallest |r_a - r_b|) from round 2 on
    c_ensemble   b, the pairs 3 bootstrap RMs disagree on most from round 2 on

Every variant starts from the same SFT model (built once into <out>/setup by the first run). Prints the
table (mean and [min, max] over seeds) and, for each c, the labels it needs to reach b's final reward-model
accuracy on fresh policy samples (linear between its rounds, from chance at 0 labels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMON = ["samples_per_prompt=4", "collect.min_labels=1"]  # the budget is pairs sent; gold ties are dropped, so a round may keep few
VARIANTS = {
    "a": ["rounds=1", "prompts_per_round=600", "labels_per_round=1500", "ppo.max_steps=60"],
    "b": ["rounds=3", "prompts_per_round=200", "labels_per_round=500", "ppo.max_steps=20"],
    "c_margin": ["rounds=3", "prompts_per_round=200", "labels_per_round=500", "ppo.max_steps=20", "select=margin"],
    "c_ensemble": ["rounds=3", "prompts_per_round=200", "labels_per_round=500", "ppo.max_steps=20", "select=ensemble", "rm_ensemble=3"],
    # diagnostics (--variants a_ppo20,b_ppo60): is b behind a for want of labels per RM or of PPO iterations?
    "a_ppo20": ["rounds=1", "prompts_per_round=600", "labels_per_round=1500", "ppo.max_steps=20"],
    "b_ppo60": ["rounds=3", "prompts_per_round=200", "labels_per_round=500", "ppo.max_steps=60"],
}
MAIN = ["a", "b", "c_margin", "c_ensemble"]


def run(out: Path, variant: str, seed: int, setup: Path) -> dict:
    folder = out / f"{variant}-seed{seed}"
    wired = []
    if (setup / "sft" / "final").exists():
        wired = [f"sft_model={setup / 'sft' / 'final'}", f"prompts={setup / 'data' / 'prompts_feedback.jsonl'}",
                 f"eval_prompts={setup / 'data' / 'prompts_eval.jsonl'}"]
    if not (folder / "metrics.json").exists():
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "tether.loop.run", f"out={folder}", f"seed={seed}", *COMMON, *VARIANTS[variant], *wired]
        log = folder.with_suffix(".log")
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if p.returncode:
            raise SystemExit(f"{variant} seed {seed} failed (exit {p.returncode}); see {log}")
        print(f"{variant} seed {seed}: {time.perf_counter() - t:.0f} s", flush=True)
        if not wired:  # the first run built the setup: every later run starts from the same SFT model
            (folder / "setup").rename(setup)
    return json.loads((folder / "metrics.json").read_text())


def labels_to_reach(rows: list[dict], target: float) -> float | None:
    """Pairs sent until the RM's fresh-sample accuracy first reaches target, linear between rounds."""
    x0, y0 = 0, 0.5
    for row in rows:
        x1, y1 = row["sent_total"], row["rm_fresh"]
        if y1 is not None and y1 >= target:
            return x0 + (x1 - x0) * (target - y0) / (y1 - y0) if y1 > y0 else x1
        x0, y0 = x1, y1 if y1 is not None else y0
    return None


def summary(vals: list) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    return f"{statistics.mean(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]" if len(vals) > 1 else f"{vals[0]:.3f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/loop-experiment")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(MAIN), help=f"of {', '.join(VARIANTS)}")
    a = ap.parse_args(argv)
    out = Path(a.out)
    setup = out / "setup"
    seeds = [int(s) for s in a.seeds.split(",")]
    variants = a.variants.split(",")
    res = {v: [run(out, v, s, setup) for s in seeds] for v in variants}
    for v in variants:
        for m in res[v]:
            sent = 0
            for row in m["rounds"]:
                sent += m["config"]["labels_per_round"]
                row["sent_total"] = sent
    head = "| variant | pairs sent (labels kept) | gold reward | win vs SFT | KL to SFT | length | RM acc. on fresh policy samples (final) | RM acc. per round |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for v in variants:
        ms = res[v]
        last = [m["rounds"][-1] for m in ms]
        per_round = " / ".join(summary([m["rounds"][r]["rm_fresh"] for m in ms]).split(" [")[0] for r in range(len(ms[0]["rounds"])))
        kept = statistics.mean(x["labels_total"] for x in last)
        lines.append(f"| {v} | {last[0]['sent_total']} ({kept:.0f}) | {summary([x['gold_mean'] for x in last])} | {summary([x['win_vs_sft'] for x in last])} | "
                     f"{summary([x['kl'] for x in last])} | {summary([x['length_mean'] for x in last])} | {summary([x['rm_fresh'] for x in last])} | {per_round} |")
    print(f"\nSFT gold reward {summary([m['sft']['gold_mean'] for m in res[variants[0]]])}; seeds {seeds}\n")
    print("\n".join(lines))
    if "b" in res:
        target = statistics.mean(m["rounds"][-1]["rm_fresh"] for m in res["b"])
        for v in (x for x in variants if x.startswith("c")):
            need = [labels_to_reach(m["rounds"], target) for m in res[v]]
            got = [n for n in need if n is not None]
            total = res["b"][0]["rounds"][-1]["sent_total"]
            print(f"{v}: pairs sent to reach b's final fresh-sample RM accuracy {target:.3f}: per seed "
                  f"{['-' if n is None else round(n) for n in need]}"
                  + (f", mean {statistics.mean(got):.0f} ({1 - statistics.mean(got) / total:.0%} fewer than b's {total})" if got else ""))
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, out / "experiment.png")
    print(f"plot: {out / 'experiment.png'}")


def plot(res: dict, path: Path) -> None:
    """Gold reward and the RM's fresh-sample accuracy against pairs sent, the seeds' mean per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for v, ms in res.items():
        n = len(ms[0]["rounds"])
        x = [0] + [ms[0]["rounds"][r]["sent_total"] for r in range(n)]
        gold = [statistics.mean(m["sft"]["gold_mean"] for m in ms)] + [statistics.mean(m["rounds"][r]["gold_mean"] for m in ms) for r in range(n)]
        acc = [0.5] + [statistics.mean(m["rounds"][r]["rm_fresh"] for m in ms) for r in range(n)]
        axes[0].plot(x, gold, marker="o", label=v)
        axes[1].plot(x, acc, marker="o", label=v)
    axes[0].set(xlabel="pairs sent for labelling", ylabel="gold reward (VADER), held-out prompts", title="policy")
    axes[1].set(xlabel="pairs sent for labelling", ylabel="RM accuracy on the policy's fresh samples", title="reward model")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
