"""The constrained experiment (Safe RLHF's question in the demo's setting): PPO on the demo's sentiment
reward model learns pet phrases ("like a good , like a funny"), so maximising the reward raises a cost
measured by a gold rule, the word repetition of each response (seq-rep-1, `tether.rewards:repetition`).

    python -m tether.demo.constrained --demo runs/demo --out runs/constrained     # after `tether demo`

Runs, from the demo's SFT model and reward model with the demo's PPO settings: unconstrained PPO (the
cost is measured, never used), PPO-Lagrangian (E[cost] <= threshold with a learned λ) and PPO with a
fixed cost weight w for each w in --weights (cost.lambda_init=w cost.lambda_lr=0), then scores every
policy and the SFT model on the demo's held-out prompts: gold reward (VADER), cost, the share of
responses over the threshold, win rate against SFT. Writes OUT/report.md, metrics.json, frontier.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COST_FN = "tether.rewards:repetition"


def _variants(weights: list[float], lam_lr: float) -> dict[str, list[str]]:
    v = {"unconstrained": ["cost.lambda_init=0", "cost.lambda_lr=0"],
         "lagrangian": [f"cost.lambda_lr={lam_lr}"]}  # λ starts at cost.lambda_init's default, 1: no weight tuned by hand
    for w in weights:
        v[f"fixed w={w:g}"] = [f"cost.lambda_init={w}", "cost.lambda_lr=0"]
    return v


def _train(demo: Path, out: Path, name: str, extra: list[str], threshold: float, seed: int) -> Path:
    from tether.algo import ppo
    from tether.config import load_config

    folder = out / "runs" / name.replace(" ", "_").replace("=", "")
    if (folder / "final" / "config.json").exists():
        return folder
    overrides = [f"out={folder}", f"seed={seed}", f"cost.fn={COST_FN}", f"cost.threshold={threshold}", "track.progress=false", "sample_every=0", *extra]
    cfg = load_config(ppo.PPOConfig, demo / "ppo" / "config.json", overrides)
    print(f"constrained: training {name}", file=sys.stderr)
    ppo.train(cfg)
    return folder


def _evaluate(model: str, prompts: list[str], threshold: float, seed: int, max_new_tokens: int) -> dict:
    from tether.eval.scoring import sample
    from tether.judges import get_judge
    from tether.rewards import repetition

    s = sample(model, prompts, 1, max_new_tokens, 1.0, 1.0, seed, 32, "cpu")
    gold = list(get_judge("vader")(s.prompt_texts, s.responses))
    cost = repetition(s.prompt_texts, s.responses)
    return {"gold": gold, "cost": cost, "responses": s.responses, "threshold": threshold}


def _summary(r: dict, sft: dict | None) -> dict:
    from tether.eval import metrics as M

    out = {"gold_reward": M.mean(r["gold"]), "cost": M.mean(r["cost"]),
           "violation_rate": sum(c > r["threshold"] for c in r["cost"]) / len(r["cost"])}
    if sft is not None:
        out |= {"win_rate_vs_sft": M.win_rate(r["gold"], sft["gold"])["win_rate"]}
    return out


def run(demo: Path, out: Path, threshold: float, weights: list[float], lam_lr: float, n_prompts: int, seed: int) -> Path:
    from tether.demo.io import read_jsonl
    from tether.track import read_metrics

    out.mkdir(parents=True, exist_ok=True)
    demo_cfg = json.loads((demo / "config.json").read_text())
    max_new = int(demo_cfg.get("max_new_tokens", 24))
    prompts = [r["prompt"] for r in read_jsonl(demo / "data" / "prompts_eval.jsonl")]
    prompts = prompts[:n_prompts] if n_prompts else prompts
    sft = _evaluate(str(demo / "sft" / "final"), prompts, threshold, seed, max_new)
    rows = {"SFT": _summary(sft, None) | {"win_rate_vs_sft": 0.5}}
    logs = {}
    for name, extra in _variants(weights, lam_lr).items():
        folder = _train(demo, out, name, extra, threshold, seed)
        rows[name] = _summary(_evaluate(str(folder / "final"), prompts, threshold, seed, max_new), sft)
        m = read_metrics(folder / "metrics.jsonl")
        logs[name] = {k: [x.get(k) for x in m] for k in ("cost/mean", "cost/violation_rate", "lagrange/lambda", "rewards/raw_mean")}
        rows[name]["train_cost_last10"] = sum(logs[name]["cost/mean"][-10:]) / len(logs[name]["cost/mean"][-10:])
    metrics = {"threshold": threshold, "cost": f"{COST_FN} (seq-rep-1)", "prompts": len(prompts), "lambda_lr": lam_lr,
               "policies": rows, "lambda_trajectory": logs["lagrangian"]["lagrange/lambda"], "train_logs": logs}
    return _write(out, metrics)


def _write(out: Path, m: dict) -> Path:
    from tether.atomic import atomic_write_text
    from tether.demo.io import write_json

    t = m["threshold"]
    lines = ["# Constrained RLHF in the demo's setting", "",
             f"Reward: the demo's reward model. Cost: word repetition of the response ({m['cost']}), threshold {t}. "
             f"{m['prompts']} held-out prompts, one sample each at temperature 1; gold reward = VADER.", "",
             "| policy | gold reward | win rate vs SFT | cost | cost ≤ threshold? | responses over threshold | train cost (last 10) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in m["policies"].items():
        ok = "yes" if r["cost"] <= t else "**no**"
        train = f"{r['train_cost_last10']:.3f}" if "train_cost_last10" in r else ""
        lines.append(f"| {name} | {r['gold_reward']:.3f} | {r['win_rate_vs_sft']:.3f} | {r['cost']:.3f} | {ok} | {100 * r['violation_rate']:.0f}% | {train} |")
    lam = [x for x in m["lambda_trajectory"] if x is not None]
    if lam:
        every = max(1, len(lam) // 10)
        lines += ["", "λ (PPO-Lagrangian) every " + str(every) + " iterations: " + ", ".join(f"{x:.2f}" for x in lam[::every]) + f"; last {lam[-1]:.2f}"]
    lines += ["", "The fixed-weight runs trace the reward–cost frontier; frontier.png places the Lagrangian run on it."]
    write_json(out / "metrics.json", m)
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    _plot(out, m)
    return out / "report.md"


def _plot(out: Path, m: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    fixed = [(r["cost"], r["gold_reward"], n) for n, r in m["policies"].items() if n.startswith("fixed")]
    if fixed:
        fixed.sort()
        a.plot([x for x, _, _ in fixed], [y for _, y, _ in fixed], "o--", color="grey", label="fixed weight w")
        for x, y, n in fixed:
            a.annotate(n.split()[-1], (x, y), fontsize=8)
    for n, mk in (("SFT", "ks"), ("unconstrained", "r^"), ("lagrangian", "g*")):
        r = m["policies"][n]
        a.plot(r["cost"], r["gold_reward"], mk, markersize=10, label=n)
    a.axvline(m["threshold"], color="k", lw=0.8, ls=":")
    a.set_xlabel("cost (word repetition, held-out)")
    a.set_ylabel("gold reward (VADER)")
    a.legend(fontsize=8)
    for n, log in m["train_logs"].items():
        b.plot(log["cost/mean"], label=n, lw=2 if n == "lagrangian" else 1)
    b.axhline(m["threshold"], color="k", lw=0.8, ls=":")
    b.set_xlabel("PPO iteration")
    b.set_ylabel("training cost")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tether.demo.constrained", description=__doc__.strip().splitlines()[0])
    ap.add_argument("--demo", default="runs/demo", help="a finished `tether demo` run folder")
    ap.add_argument("--out", default="runs/constrained")
    ap.add_argument("--threshold", type=float, default=0.03, help="the cost budget (the SFT model's repetition is 0.015-0.025)")
    ap.add_argument("--weights", default="0.5,2,8", help="fixed cost weights for the frontier")
    ap.add_argument("--lambda-lr", type=float, default=50.0, help="costs are ~0.01-0.1, so λ needs a large step to move within 40 iterations")
    ap.add_argument("--n-prompts", type=int, default=0, help="held-out prompts scored (0 = all)")
    ap.add_argument("--seed", type=int, default=0, help="PPO's seed and the evaluation's sampling seed")
    a = ap.parse_args(argv)
    demo = Path(a.demo)
    if not (demo / "ppo" / "config.json").exists() or not (demo / "sft" / "final").exists():
        print(f"constrained: {demo} is not a finished demo run (run `tether demo` first)", file=sys.stderr)
        return 2
    path = run(demo, Path(a.out), a.threshold, [float(w) for w in a.weights.split(",") if w], a.lambda_lr, a.n_prompts, a.seed)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
