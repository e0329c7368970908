"""`tether eval data`: checks of preference data before a reward model learns from it.

Per file (any format `load_preferences` reads):
- records read, pairs, bad records by reason; pairs whose chosen and rejected are identical
  (the reader rejects them; they are counted here);
- exact duplicate pairs, the same comparison judged both ways (A>B and B>A), near-duplicate prompts
  (word-3-shingle Jaccard >= threshold, MinHash LSH) and near-identical chosen/rejected within a pair;
- the length difference chosen - rejected in words, and how often "the longer one wins" would be
  right: a reward model can learn that shortcut from the data alone;
- per-source counts;
- when items carry several judgments (the same prompt and the same two responses judged more than
  once): agreement among them, and per annotator when records name one (`annotator`, `labeler`,
  `worker` or `user`, top level or inside `meta`), or when a record aggregates several labelers'
  votes (`meta.votes` = {"A": 2, "B": 1, "tie": 0}: each vote is one judgment of that item);
- intransitive cycles per prompt (A>B, B>C, C>A), which no Bradley-Terry scores can fit.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from tether.eval import metrics as M
from tether.eval.report import Report, bar_plot, fmt

ANNOTATOR_KEYS = ("annotator", "labeler", "worker", "user", "annotator_id", "labeler_id", "worker_id")


def _key(x) -> str:
    return x if isinstance(x, str) else json.dumps(x, sort_keys=True)


def _text(x) -> str:
    return x if isinstance(x, str) else "\n".join(m["content"] for m in x)


def _annotator(rec: dict) -> str | None:
    for src in (rec, rec.get("meta") if isinstance(rec.get("meta"), dict) else {}):
        for k in ANNOTATOR_KEYS:
            if src.get(k) is not None:
                return str(src[k])
    return None


def _votes(rec: dict) -> list[str] | None:
    """Per-labeler votes of an aggregated record: meta.votes {label: count} -> [label, label, ...]."""
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    v = meta.get("votes", rec.get("votes"))
    if isinstance(v, dict) and all(isinstance(n, int) and not isinstance(n, bool) for n in v.values()) and sum(v.values()) > 1:
        return [str(k) for k, n in sorted(v.items()) for _ in range(n)]
    return None


def analyze_file(path: str, near_threshold: float = 0.8) -> dict:
    from tether.data import load_preferences
    from tether.data.readers import iter_records

    pairs, report = load_preferences(path, on_bad_record="skip")
    annot, votes = {}, {}
    for loc, rec, err in iter_records(path):
        if err is None and isinstance(rec, dict):
            a = _annotator(rec)
            if a is not None:
                annot[loc] = a
            v = _votes(rec)
            if v is not None:
                votes[loc] = v
    out: dict = {"file": path, "records": report.n_read, "pairs": len(pairs), "bad_records": dict(report.skipped),
                 "dropped": dict(report.dropped)}
    out["identical_chosen_rejected"] = sum(v for k, v in report.skipped.items() if "identical" in k)
    prompts = [_key(p.prompt) for p in pairs]
    ch, rj = [_key(p.chosen) for p in pairs], [_key(p.rejected) for p in pairs]
    dup_groups = M.exact_duplicates(list(zip(prompts, ch, rj)))
    out["duplicate_pairs"] = sum(len(g) - 1 for g in dup_groups)
    # Judgments per item: an item is a prompt with an unordered pair of responses; the label is the winner.
    judgments: dict = defaultdict(list)
    by_annotator: dict = defaultdict(dict)
    for i, p in enumerate(pairs):
        item = (prompts[i], frozenset((ch[i], rj[i])))
        judgments[item].append(ch[i])
        a = annot.get(p.loc)
        if a is not None:
            by_annotator[item][a] = ch[i]
    # Records that aggregate several labelers carry their votes (meta.votes = {"A": 2, "B": 1, "tie": 0}).
    for i, p in enumerate(pairs):
        if p.loc in votes:
            judgments[(prompts[i], frozenset((ch[i], rj[i])), p.loc)] = votes[p.loc]
    both_ways = sum(1 for k, v in judgments.items() if len(k) == 2 and len(set(v)) > 1)
    out["judged_both_ways"] = both_ways
    out["agreement"] = M.judgment_agreement(judgments)
    out["items_with_several_judgments"] = out["agreement"]["items"]
    if by_annotator and any(len(v) > 1 for v in by_annotator.values()):
        from tether.feedback.agreement import fleiss_kappa, majority_agreement

        labels = {str(hash(k)): v for k, v in by_annotator.items() if len(v) > 1}
        out["annotators"] = {"count": len({a for v in by_annotator.values() for a in v}), "fleiss_kappa": fleiss_kappa(labels),
                             "agreement_with_majority": majority_agreement(labels)}
    # Cycles per prompt over all its comparisons.
    edges_by_prompt: dict = defaultdict(list)
    for i in range(len(pairs)):
        edges_by_prompt[prompts[i]].append((ch[i], rj[i]))
    cyc_prompts, n3, examples, sccs = 0, 0, [], 0
    for pr, edges in edges_by_prompt.items():
        c = M.find_cycles(edges)
        if c["three_cycles"]:
            cyc_prompts += 1
            n3 += len(c["three_cycles"])
            if len(examples) < 3:
                a, b, cc = c["three_cycles"][0]
                examples.append({"prompt": _text(json.loads(pr)) if pr.startswith("[") else pr, "A": a, "B": b, "C": cc})
        sccs += len([s for s in c["components"] if len(s) >= 3])
    multi = sum(1 for e in edges_by_prompt.values() if len({x for ed in e for x in ed}) >= 3)
    out["cycles"] = {"prompts": len(edges_by_prompt), "prompts_with_3plus_responses": multi, "prompts_with_cycle": cyc_prompts,
                     "three_cycles": n3, "intransitive_components": sccs, "examples": examples}
    # Near duplicates: distinct prompts that are almost the same; chosen ~ rejected within a pair.
    distinct_prompts = sorted(set(prompts))
    near = M.near_duplicates([_text(json.loads(p)) if p.startswith("[") else p for p in distinct_prompts], near_threshold)
    out["near_duplicate_prompts"] = len(near)
    out["near_duplicate_prompt_examples"] = [{"a": distinct_prompts[i][:200], "b": distinct_prompts[j][:200], "jaccard": s} for i, j, s in near[:3]]
    out["near_identical_responses"] = sum(1 for p in pairs if M.jaccard(M.shingles(_text(p.chosen)), M.shingles(_text(p.rejected))) >= 0.9)
    # Length: chosen minus rejected, in words.
    lc = [len(M.words(_text(p.chosen))) for p in pairs]
    lr = [len(M.words(_text(p.rejected))) for p in pairs]
    diff = [a - b for a, b in zip(lc, lr)]
    out["length"] = {
        "chosen_mean_words": M.mean(lc), "rejected_mean_words": M.mean(lr), "diff_mean": M.mean(diff),
        "diff_median": M.quantile(diff, 0.5), "chosen_longer": M.mean([1.0 if d > 0 else 0.0 for d in diff]),
        "chosen_shorter": M.mean([1.0 if d < 0 else 0.0 for d in diff]), "equal": M.mean([1.0 if d == 0 else 0.0 for d in diff]),
        "longer_wins_accuracy": M.mean([1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diff]),
    }
    out["sources"] = dict(Counter(p.source or "(none)" for p in pairs).most_common())
    out["_diff"] = diff
    return out


def write_report(out_dir: str | Path, results: list[dict]) -> Path:
    rep = Report(out_dir, "Preference data report")
    rep.text("Lengths are in words (lower-cased word and punctuation tokens). *longer wins* = the accuracy of a rule that "
             "always prefers the longer response (ties half): above 0.5, a reward model can score well by length alone.")
    rep.h2("Summary")
    rep.table(["file", "records", "pairs", "bad records", "identical c/r", "duplicate pairs", "judged both ways",
               "near-dup prompts", "chosen longer", "longer wins", "prompts with a cycle"],
              [[Path(r["file"]).name, r["records"], r["pairs"], sum(r["bad_records"].values()), r["identical_chosen_rejected"],
                r["duplicate_pairs"], r["judged_both_ways"], r["near_duplicate_prompts"], r["length"]["chosen_longer"],
                r["length"]["longer_wins_accuracy"], r["cycles"]["prompts_with_cycle"]] for r in results])
    for r in results:
        name = Path(r["file"]).name
        rep.h2(name)
        if r["bad_records"]:
            rep.text("Bad records (skipped): " + ", ".join(f"{k}: {v}" for k, v in r["bad_records"].items()))
        L = r["length"]
        rep.bullets([
            f"chosen {fmt(L['chosen_mean_words'], 1)} words on average, rejected {fmt(L['rejected_mean_words'], 1)}; "
            f"difference mean {fmt(L['diff_mean'], 1)}, median {fmt(L['diff_median'], 1)}",
            f"chosen is longer in {fmt(L['chosen_longer'])}, shorter in {fmt(L['chosen_shorter'])}, equal in {fmt(L['equal'])}; "
            f"'longer wins' is right {fmt(L['longer_wins_accuracy'])} of the time",
            f"{r['duplicate_pairs']} exact duplicate pairs; {r['judged_both_ways']} items judged both ways; "
            f"{r['near_duplicate_prompts']} near-duplicate prompt pairs; {r['near_identical_responses']} pairs with near-identical chosen/rejected (Jaccard ≥ 0.9)",
        ])
        ag = r["agreement"]
        if ag["items"]:
            rep.text(f"**Agreement** over {ag['items']} items with several judgments ({ag['judgments']} judgments): pairwise "
                     f"{fmt(ag['pairwise'])}, with the item's majority {fmt(ag['majority'])}, unanimous items {fmt(ag['unanimous'])}.")
        else:
            rep.text("**Agreement**: no item was judged more than once in this file.")
        if "annotators" in r:
            an = r["annotators"]
            rep.text(f"{an['count']} annotators; Fleiss' κ = {fmt(an['fleiss_kappa'])}.")
        cy = r["cycles"]
        rep.text(f"**Intransitive cycles**: {cy['prompts_with_cycle']} of {cy['prompts_with_3plus_responses']} prompts with ≥ 3 compared "
                 f"responses contain a 3-cycle (A≻B, B≻C, C≻A), {cy['three_cycles']} cycles in all; no Bradley–Terry scores fit them.")
        for ex in cy["examples"][:2]:
            rep.text("> " + " ≻ ".join(repr(x[:70]) for x in (ex["A"], ex["B"], ex["C"])) + " ≻ (first)")
        fig, axes = Report.figure(2, 5.2, 3.6)
        axes[0].hist(r["_diff"], bins=40, color="tab:blue")
        axes[0].axvline(0, color="k", lw=1)
        axes[0].set_xlabel("words(chosen) − words(rejected)")
        axes[0].set_title(f"Length difference (chosen longer {L['chosen_longer']:.2f})")
        src = r["sources"]
        bar_plot(axes[1], list(src)[:12], list(src.values())[:12], ylabel="pairs")
        axes[1].set_title("Pairs per source")
        rep.save_figure(fig, f"{name}_data", f"{name}: length difference and pairs per source")
    rep.metrics = {"files": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]}
    return rep.write()
