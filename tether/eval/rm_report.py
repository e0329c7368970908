"""`tether eval rm`: is the reward model any good?

Per preference file: accuracy, mean margin, Bradley-Terry loss (tether.algo.rm.pair_metrics),
calibration of sigma(r_chosen - r_rejected) (reliability diagram + ECE), accuracy by data source
and by length bucket, the correlation of score with response length (length bias), how often the
model prefers the longer response, and agreement with gold judges when given.
"""

from __future__ import annotations

from pathlib import Path

from tether.eval import metrics as M
from tether.eval.report import Report, bar_plot, fmt, reliability_plot


def _text(x) -> str:
    if isinstance(x, str):
        return x
    return "\n".join(m["content"] for m in x)


def oriented(pairs: list, head: str) -> tuple[list, int]:
    """The pairs as judged on one objective: a pair with `labels` is kept only when it has a judgment
    for `head`, with chosen and rejected swapped where the label is -1; a pair without labels keeps its
    order (its file or category says what it judges). -> (pairs, how many had no judgment for head)."""
    import dataclasses

    out, unjudged = [], 0
    for p in pairs:
        label = 1 if p.labels is None else p.labels.get(head, 0)
        if label == 0:
            unjudged += 1
        else:
            out.append(p if label > 0 else dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen))
    return out, unjudged


def evaluate_file(scorer, path: str, judges: dict | None = None, n_bins: int = 10, max_pairs: int = 0) -> dict:
    """Scores and metrics of one preference file (the numbers; no plotting). With a multi-objective
    model the scorer reads one head, and pairs are oriented by their label for it (`oriented`)."""
    import torch

    from tether.algo.rm import pair_metrics
    from tether.data import load_preferences, prompt_text

    pairs, report = load_preferences(path, on_bad_record="skip")
    head = scorer.heads[scorer.head] if scorer.head is not None else ""
    unjudged = 0
    if head:
        pairs, unjudged = oriented(pairs, head)
    if max_pairs and len(pairs) > max_pairs:
        step = len(pairs) / max_pairs  # an even spread over the file (sources are often in blocks)
        pairs = [pairs[int(i * step)] for i in range(max_pairs)]
    s = scorer.score_pairs(pairs)
    kept = [pairs[i] for i in s["index"]]
    rc, rr = s["chosen"], s["rejected"]
    margins = [a - b for a, b in zip(rc, rr)]
    correct = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    out: dict = {"file": path, "records": report.n_read, "pairs": len(kept), "skipped_records": report.skipped,
                 "skipped_too_long": s["skipped"]}
    if head:
        out |= {"head": head, "unjudged_for_head": unjudged}
    if not kept:
        return out
    out |= {k.split("/")[1]: v for k, v in pair_metrics(torch.tensor(rc), torch.tensor(rr), "rm").items() if k != "rm/pairs"}
    # Exact ties (identical scores: e.g. chosen and rejected identical after truncation) count half, as everywhere here.
    out["ties"] = sum(1 for m in margins if m == 0)
    out["accuracy_strict"] = out["accuracy"]
    out["accuracy"] = M.mean(correct)
    cal = M.calibration(margins, n_bins)
    out["ece"] = cal["ece"]
    out["mean_confidence"] = cal["mean_confidence"]
    out["reliability"] = cal["bins"]
    sources = [p.source or "(none)" for p in kept]
    out["by_source"] = M.accuracy_by_group(correct, sources)
    # Length bias: every response's score against its length in tokens.
    lengths = s["chosen_tokens"] + s["rejected_tokens"]
    scores = rc + rr
    out["length_bias"] = M.correlation(scores, lengths)
    pair_len = [(a + b) / 2 for a, b in zip(s["chosen_tokens"], s["rejected_tokens"])]
    labels, edges = M.length_buckets(pair_len, 4)
    out["by_length"] = M.accuracy_by_group(correct, labels)
    out["length_bucket_edges"] = edges
    longer = [(a, b, m) for a, b, m in zip(s["chosen_tokens"], s["rejected_tokens"], margins) if a != b]
    out["prefers_longer"] = M.mean([1.0 if (m > 0) == (a > b) else 0.0 for a, b, m in longer]) if longer else None
    out["data_chosen_longer"] = M.mean([1.0 if a > b else 0.0 for a, b, _ in longer]) if longer else None
    out["accuracy_when_chosen_longer"] = M.mean([1.0 if m > 0 else 0.0 for a, b, m in longer if a > b]) if any(a > b for a, b, _ in longer) else None
    out["accuracy_when_chosen_shorter"] = M.mean([1.0 if m > 0 else 0.0 for a, b, m in longer if a < b]) if any(a < b for a, b, _ in longer) else None
    out["judges"] = {}
    for name, judge in (judges or {}).items():
        prompts = [prompt_text(p.prompt) for p in kept]
        jc = judge(prompts, [_text(p.chosen) for p in kept])
        jr = judge(prompts, [_text(p.rejected) for p in kept])
        decided = [(a - b, m) for a, b, m in zip(jc, jr, margins) if a != b]
        out["judges"][name] = {
            "judge_accuracy": M.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(jc, jr)]),
            "rm_agreement": M.mean([1.0 if (d > 0) == (m > 0) else 0.0 for d, m in decided]) if decided else None,
            "decided_pairs": len(decided),
        }
    out["_scores"] = {"chosen": rc, "rejected": rr, "chosen_tokens": s["chosen_tokens"], "rejected_tokens": s["rejected_tokens"]}
    return out


def _label(r: dict) -> str:
    return Path(r["file"]).name + (f" [{r['head']}]" if r.get("head") else "")


def _heads_by_source(rep, results: list[dict], heads: list[str]) -> dict:
    """A multi-objective model: each head's accuracy on each source (e.g. HHH's harmless, helpful and
    honest categories), so one sees which head ranks which kind of judgment."""
    sources = list(dict.fromkeys(s for r in results for s in r.get("by_source", {})))
    cell = {(r["head"], s): v for r in results if r.get("head") for s, v in r.get("by_source", {}).items()}
    rep.h2("Heads by source")
    rep.text("Accuracy of each head on each source's pairs (pairs oriented by the pair's label for that head, when it has labels).")
    rep.table(["head", *sources], [[h, *[fmt(cell[h, s]["accuracy"]) + f" (n={cell[h, s]['n']})" if (h, s) in cell else "" for s in sources]]
                                   for h in heads])
    return {h: {s: cell[h, s] for s in sources if (h, s) in cell} for h in heads}


def write_report(out_dir: str | Path, model: str, results: list[dict]) -> Path:
    import matplotlib.pyplot as plt

    rep = Report(out_dir, "Reward model report")
    rep.text(f"Model: `{model}`. Accuracy = share of pairs with r_chosen > r_rejected (ties count half); margin = mean "
             "r_chosen − r_rejected; loss = mean −log σ(margin). Calibration: confidence σ(|margin|) against accuracy, "
             "equal-width bins over [0.5, 1]; ECE = Σ_b n_b/n · |acc_b − conf_b|. Length = response tokens under the RM's tokenizer.")
    rep.h2("Summary")
    rows = []
    for r in results:
        lb = r.get("length_bias", {})
        rows.append([_label(r), r["pairs"], r.get("accuracy"), r.get("margin"), r.get("loss"), r.get("ece"),
                     lb.get("pearson"), lb.get("spearman"), r.get("prefers_longer"), r.get("data_chosen_longer")])
    rep.table(["file", "pairs", "accuracy", "margin", "loss", "ECE", "score~length r", "score~length ρ",
               "RM prefers longer", "data: chosen longer"], rows)
    rep.text("*RM prefers longer*: share of unequal-length pairs where the RM ranks the longer response higher. "
             "Compare with *data: chosen longer*: a RM that learned 'longer wins' shows a rate near or above the data's.")
    heads = list(dict.fromkeys(r["head"] for r in results if r.get("head")))
    by_head = _heads_by_source(rep, results, heads) if heads else None
    for r in results:
        name = _label(r)
        rep.h2(f"{name}")
        if not r["pairs"]:
            rep.text("No usable pairs.")
            continue
        rep.text(f"{r['records']} records, {r['pairs']} pairs scored ({r['ties']} exact ties), {r['skipped_too_long']} skipped as too long, "
                 f"bad records skipped: {r['skipped_records'] or 'none'}.")
        sc = r["_scores"]
        fig, axes = Report.figure(3, 4.6, 4.0)
        reliability_plot(axes[0], r["reliability"], f"ECE={r['ece']:.3f}")
        axes[0].set_title("Calibration (reliability diagram)")
        margins = [a - b for a, b in zip(sc["chosen"], sc["rejected"])]
        axes[1].hist(margins, bins=30, color="tab:blue", alpha=0.8)
        axes[1].axvline(0, color="k", lw=1)
        axes[1].set_title(f"Margins r_c − r_r (acc {r['accuracy']:.3f})")
        axes[1].set_xlabel("margin")
        axes[2].scatter(sc["chosen_tokens"], sc["chosen"], s=6, alpha=0.5, label="chosen")
        axes[2].scatter(sc["rejected_tokens"], sc["rejected"], s=6, alpha=0.5, label="rejected")
        lb = r["length_bias"]
        axes[2].set_title(f"Score vs length (r={lb['pearson']:.2f}, ρ={lb['spearman']:.2f})")
        axes[2].set_xlabel("response tokens")
        axes[2].set_ylabel("score")
        axes[2].legend(fontsize=8)
        rep.save_figure(fig, f"{name}_calibration_length", f"{name}: reliability diagram, margin histogram, score against response length")
        rep.h3("Calibration bins")
        rep.table(["confidence bin", "pairs", "mean confidence", "accuracy"],
                  [[f"[{b['lo']:.2f}, {b['hi']:.2f})", b["count"], b["confidence"], b["accuracy"]] for b in r["reliability"] if b["count"]])
        rep.h3("Accuracy by source and by length bucket")
        src, lng = r["by_source"], r["by_length"]
        rep.table(["source", "pairs", "accuracy"], [[k, v["n"], v["accuracy"]] for k, v in src.items()])
        rep.table(["mean response tokens of the pair", "pairs", "accuracy"], [[k, v["n"], v["accuracy"]] for k, v in lng.items()])
        fig, axes = Report.figure(2, 5.5, 3.8)
        bar_plot(axes[0], list(src), [v["accuracy"] for v in src.values()], [v["n"] for v in src.values()], "accuracy", 0.5)
        axes[0].set_title("Accuracy by source")
        axes[0].set_ylim(0, 1.1)
        bar_plot(axes[1], list(lng), [v["accuracy"] for v in lng.values()], [v["n"] for v in lng.values()], "accuracy", 0.5)
        axes[1].set_title("Accuracy by pair length (tokens)")
        axes[1].set_ylim(0, 1.1)
        rep.save_figure(fig, f"{name}_breakdown", f"{name}: accuracy by data source and by length bucket (dashed: chance)")
        rep.bullets([
            f"length bias: Pearson r = {fmt(lb['pearson'])}, Spearman ρ = {fmt(lb['spearman'])}, slope = {fmt(lb['slope'], 4)} score/token",
            f"RM prefers the longer response in {fmt(r['prefers_longer'])} of unequal-length pairs; the data's chosen is longer in {fmt(r['data_chosen_longer'])}",
            f"accuracy when chosen is longer: {fmt(r['accuracy_when_chosen_longer'])}; when chosen is shorter: {fmt(r['accuracy_when_chosen_shorter'])}",
        ])
        if r["judges"]:
            rep.h3("Gold judges")
            rep.table(["judge", "judge accuracy vs labels", "RM agrees with judge", "pairs the judge decides"],
                      [[k, v["judge_accuracy"], v["rm_agreement"], v["decided_pairs"]] for k, v in r["judges"].items()])
    plt.close("all")
    rep.metrics = {"model": model, "files": [{k: v for k, v in r.items() if k != "_scores"} for r in results],
                   **({"heads_by_source": by_head} if by_head else {})}
    return rep.write()
