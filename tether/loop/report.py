"""`tether loop`'s report: one row per round, read from the rounds' own files (so the report's figures are
the metrics files' figures), a plot of what each round bought, and the provenance counts."""

from __future__ import annotations

import json
from pathlib import Path

from tether.demo.io import read_jsonl

HEADERS = ["round", "labels (new / total)", "RM acc. on new pairs: old RM -> new RM (gold)", "RM acc. on fresh policy samples",
           "RM acc. on SFT held-out pairs", "gold reward", "win vs SFT", "win vs previous", "KL to SFT", "length", "flags"]


def rows_of(loop) -> list[dict]:
    """Per round: the labels, the RM shift and the evaluation, from round_<r>/{labels,rm,eval}."""
    out, total = [], 0
    for r in range(1, loop.cfg.rounds + 1):
        labels = json.loads((loop.d(r, "labels") / "stats.json").read_text())
        shift = json.loads((loop.d(r, "rm") / "shift.json").read_text())
        ev = json.loads((loop.d(r, "eval") / "metrics.json").read_text())
        total += labels["records"]
        out.append({"round": r, "labels": labels["records"], "labels_total": total, "source": labels["source"],
                    "excluded_judgments": labels.get("excluded_judgments", 0),
                    "rm_before": (shift["before"] or {}).get("gold", {}).get("accuracy"), "rm_after": shift["after"]["gold"]["accuracy"],
                    "rm_before_labels": (shift["before"] or {}).get("label_accuracy"), "rm_after_labels": shift["after"]["label_accuracy"],
                    **{k: ev[k] for k in ("gold_mean", "win_vs_sft", "win_vs_previous", "kl", "length_mean")},
                    "rm_fresh": ev["rm_accuracy_fresh"]["accuracy"], "rm_sft": ev["rm_accuracy_sft_heldout"]["accuracy"],
                    "flags": [f["flag"] for f in ev["flags"]]})
    return out


def _f(v, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def table(rows: list[dict], sft: dict) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS),
             f"| SFT | 0 / 0 | - | - | - | {_f(sft['gold_mean'])} | 0.500 | - | 0.00 | {_f(sft['length_mean'], 1)} | |"]
    for x in rows:
        lines.append(f"| {x['round']} | {x['labels']} / {x['labels_total']} | {_f(x['rm_before'])} -> {_f(x['rm_after'])} | {_f(x['rm_fresh'])} | "
                     f"{_f(x['rm_sft'])} | {_f(x['gold_mean'])} | {_f(x['win_vs_sft'])} | {_f(x['win_vs_previous'])} | {_f(x['kl'], 2)} | "
                     f"{_f(x['length_mean'], 1)} | {', '.join(x['flags'])} |")
    return "\n".join(lines)


def provenance(loop) -> dict:
    """Who produced and who labelled what: counts over every round's labels."""
    by_policy: dict[str, int] = {}
    by_labeller: dict[str, int] = {}
    for r in range(1, loop.cfg.rounds + 1):
        for rec in read_jsonl(loop.d(r, "labels") / "labels.jsonl"):
            for p in rec["meta"]["provenance"]["policies"]:
                by_policy[p] = by_policy.get(p, 0) + 1
            for who in rec["meta"].get("annotators") or [rec["meta"].get("labeler") or rec["source"]]:
                by_labeller[who] = by_labeller.get(who, 0) + 1
    return {"responses_by_policy": by_policy, "judgments_by_labeller": dict(sorted(by_labeller.items()))}


def plot(rows: list[dict], sft: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [0] + [x["labels_total"] for x in rows]
    a.plot(xs, [sft["gold_mean"]] + [x["gold_mean"] for x in rows], "o-", label="gold reward")
    a.plot(xs, [0.5] + [x["win_vs_sft"] for x in rows], "s-", label="win rate vs SFT")
    for x in rows:
        a.annotate(f"r{x['round']}", (x["labels_total"], x["gold_mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    a.set_xlabel("labels spent (cumulative)")
    a.set_title("what each round bought")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    xr = [x["labels_total"] for x in rows]
    b.plot(xr, [x["rm_fresh"] for x in rows], "o-", label="on the new policy's samples")
    b.plot(xr, [x["rm_sft"] for x in rows], "s--", label="on SFT held-out pairs")
    b.plot(xr, [x["rm_before"] for x in rows], "v:", label="old RM on the round's new pairs")
    b.set_xlabel("labels spent (cumulative)")
    b.set_ylabel("accuracy against the gold judge")
    b.set_title("reward model")
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(loop) -> dict:
    from tether.atomic import atomic_write_text

    sft = json.loads((loop.d(0, "eval") / "stage.json").read_text())["result"]
    rows = rows_of(loop)
    tab = table(rows, sft)
    prov = provenance(loop)
    plot(rows, sft, loop.out / "rounds.png")
    cfg = loop.cfg
    md = [f"# tether loop: {cfg.rounds} rounds, {cfg.policy.upper()}, labels from {cfg.collect.source}, selection {cfg.select}", "",
          f"Policy start: `{loop.sft_dir}`. Gold judge: `{cfg.gold}`. {cfg.labels_per_round} pairs sent for labelling per round, "
          f"from {cfg.prompts_per_round} fresh prompts x {cfg.samples_per_prompt} samples; evaluation on {len(loop.eval_prompts)} held-out prompts.", "",
          tab, "",
          "RM accuracies are against the gold judge (pairs it ties are left out). *New pairs*: the round's held-out labelled pairs, "
          "scored by the previous round's RM (before) and by this round's (after): the distribution-shift figure. *Fresh policy samples*: "
          "two samples of the round's new policy per held-out prompt, scored by this round's RM.", "",
          "![gain per round](rounds.png)", "",
          "## Provenance", "", f"Responses labelled, by the policy that produced them: {prov['responses_by_policy']}", "",
          f"Judgments by labeller: {prov['judgments_by_labeller']}", ""]
    atomic_write_text(loop.out / "report.md", "\n".join(md))
    metrics = {"sft": sft, "rounds": rows, "provenance": prov, "config": json.loads((loop.out / "config.json").read_text())}
    atomic_write_text(loop.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return {"table": tab, "path": str(loop.out / "report.md"), "rows": rows}
