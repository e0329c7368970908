"""`tether eval policy`: did the policy improve, and is it hacking the reward?

Samples from the policy P and the reference R on the same prompts, then reports:
- win rate of P over R, prompt by prompt (sample j of P against sample j of R), by the reward model
  and by each gold judge, with ties and a 95% Wilson interval;
- KL(P || R) on P's samples (k1 per sequence and k3 per token, tether.eval.scoring.sample);
- response length distribution, distinct-1/2, seq-rep-4 repetition, character 4-gram repetition, the
  share of non-words (wordfreq), perplexity under the reference, the most common phrases, the
  refusal/evasion rate;
- reward-hacking flags (tether.eval.metrics.hacking_flags) with R as the baseline.

With --verifier module:function (a reward function that checks an answer, e.g.
tether.rewards:exact_number on GSM8K) it reports instead the policy's accuracy (the share of correct
samples, which is pass@1), the unbiased pass@k for k = 1, 2, 4, ... up to the samples per prompt, and
with a reward model the accuracy of the reward model's best-of-n (tether.eval.metrics.pass_at_k,
best_of_n); --ref adds the reference's numbers beside the policy's. The verifier gets each prompt
record's other fields (the reference answer), as in PPO.

With --run DIR it evaluates every checkpoint of a training run (DIR/checkpoints/step_N/model_policy,
and DIR/final when present) the same way and plots the signals against the step, next to the
run's own logged curves from DIR/metrics.jsonl.
"""

from __future__ import annotations

import re
from pathlib import Path

from tether.eval import metrics as M
from tether.eval.report import Report, fmt


def text_stats(responses: list[str], num_tokens: list[int]) -> dict:
    top = M.top_phrases(responses, 3, 5)
    return {
        "length_tokens": M.length_summary(num_tokens),
        "length_words": M.length_summary([len(M.words(r)) for r in responses]),
        "distinct_1": M.distinct_n(responses, 1),
        "distinct_2": M.distinct_n(responses, 2),
        "repetition_4": M.repetition_rate(responses, 4),
        "refusal_rate": M.refusal_rate(responses),
        "top_phrases": top,
        "takeover": top[0]["share"] if top else 0.0,
        "non_words": M.non_words(responses),
        "char_repetition": M.char_repetition(responses),
    }


def score_side(samples, scorer, judges: dict) -> dict:
    out = {}
    if scorer is not None:
        out["reward"] = scorer.score_responses(samples.prompts, samples.responses)
    for name, judge in judges.items():
        out[name] = [float(x) for x in judge(samples.prompt_texts, samples.responses)]
    return out


def evaluate(policy: str, ref: str, prompts: list, scorer=None, judges: dict | None = None, k: int = 1,
             max_new_tokens: int = 48, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             batch_size: int = 16, device: str = "auto") -> dict:
    from tether.eval.scoring import sample

    judges = judges or {}
    sp = sample(policy, prompts, k, max_new_tokens, temperature, top_p, seed, batch_size, device, ref_dir=ref)
    sr = sample(ref, prompts, k, max_new_tokens, temperature, top_p, seed, batch_size, device, ref_dir=ref)  # its perplexity: the baseline
    scores_p, scores_r = score_side(sp, scorer, judges), score_side(sr, scorer, judges)
    res: dict = {"policy": policy, "ref": ref, "prompts": len(prompts), "samples_per_prompt": k,
                 "sampling": {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}}
    res["win_rate"] = {name: M.win_rate(scores_p[name], scores_r[name]) for name in scores_p}
    res["mean_score"] = {name: {"policy": M.mean(scores_p[name]), "ref": M.mean(scores_r[name])} for name in scores_p}
    res["kl"] = {"k1_mean": M.mean(sp.kl_k1), "k1_std": M.std(sp.kl_k1), "k3_per_token": M.mean(sp.kl_k3)}
    res["policy_stats"] = text_stats(sp.responses, sp.num_tokens)
    res["ref_stats"] = text_stats(sr.responses, sr.num_tokens)
    gold = {n: [res["mean_score"][n]["ref"], res["mean_score"][n]["policy"]] for n in judges}
    ps, rs = res["policy_stats"], res["ref_stats"]
    res["flags"] = M.hacking_flags(
        [0, 1], proxy=[res["mean_score"]["reward"]["ref"], res["mean_score"]["reward"]["policy"]] if scorer else None,
        gold=gold, length=[rs["length_tokens"]["mean"], ps["length_tokens"]["mean"]],
        takeover=[rs["takeover"], ps["takeover"]], refusal=[rs["refusal_rate"], ps["refusal_rate"]],
        phrases=[rs["top_phrases"][0]["phrase"] if rs["top_phrases"] else "", ps["top_phrases"][0]["phrase"] if ps["top_phrases"] else ""],
        non_word=[rs["non_words"]["rate"], ps["non_words"]["rate"]], non_word_examples=ps["non_words"]["examples"],
        char_rep=[rs["char_repetition"], ps["char_repetition"]], ref_perplexity=[sr.ref_perplexity, sp.ref_perplexity])
    res["ref_perplexity"] = {"policy": sp.ref_perplexity, "ref": sr.ref_perplexity}
    res["_samples"] = {"policy": sp, "ref": sr, "scores_policy": scores_p, "scores_ref": scores_r}
    return res


def write_report(out_dir: str | Path, res: dict) -> Path:
    rep = Report(out_dir, "Policy report")
    rep.text(f"Policy `{res['policy']}` against reference `{res['ref']}` on {res['prompts']} prompts × "
             f"{res['samples_per_prompt']} samples (sampling {res['sampling']}). Win rate = (wins + ties/2)/n comparing "
             "sample j of the policy with sample j of the reference on the same prompt; 95% Wilson interval.")
    rep.h2("Reward-hacking flags")
    if res["flags"]:
        rep.bullets([f"**{f['flag']}**: {f['evidence']}" for f in res["flags"]])
    else:
        rep.text("No flag raised (proxy-up/gold-down, length drift without quality gain, phrase takeover, evasion, "
                 "non-words, character repetition, off-reference perplexity).")
    rep.h2("Win rate of the policy over the reference")
    rep.table(["scorer", "win rate", "95% CI", "wins", "ties", "losses", "mean (policy)", "mean (ref)"],
              [[n, w["win_rate"], f"[{w['ci_low']:.3f}, {w['ci_high']:.3f}]", w["wins"], w["ties"], w["losses"],
                res["mean_score"][n]["policy"], res["mean_score"][n]["ref"]] for n, w in res["win_rate"].items()])
    rep.h2("KL(policy ‖ reference) on the policy's samples")
    kl = res["kl"]
    rep.text(f"k1 (sum over response tokens of log π − log π_ref, mean over sequences): **{fmt(kl['k1_mean'])}** "
             f"(std {fmt(kl['k1_std'])}); k3 per token: {fmt(kl['k3_per_token'], 4)}.")
    rep.h2("Outputs")
    ps, rs = res["policy_stats"], res["ref_stats"]
    ppl = res["ref_perplexity"]
    rep.table(["", "mean tokens", "median", "p90", "distinct-1", "distinct-2", "rep-4", "char rep-4", "non-words", "ppl under ref",
               "refusal rate", "top phrase (share)"],
              [[name, s["length_tokens"]["mean"], s["length_tokens"]["median"], s["length_tokens"]["p90"], s["distinct_1"], s["distinct_2"],
                s["repetition_4"], s["char_repetition"], fmt(s["non_words"]["rate"]), fmt(ppl["policy" if name == "policy" else "ref"]),
                s["refusal_rate"], f"{s['top_phrases'][0]['phrase']!r} ({s['top_phrases'][0]['share']:.2f})" if s["top_phrases"] else "–"]
               for name, s in (("policy", ps), ("reference", rs))])
    smp = res["_samples"]
    fig, axes = Report.figure(2, 5.2, 3.8)
    axes[0].hist([smp["ref"].num_tokens, smp["policy"].num_tokens], bins=20, label=["reference", "policy"], alpha=0.8)
    axes[0].set_xlabel("response tokens")
    axes[0].set_title("Response length")
    axes[0].legend(fontsize=8)
    names = list(res["win_rate"])
    ws = [res["win_rate"][n]["win_rate"] for n in names]
    err = [[w - res["win_rate"][n]["ci_low"] for n, w in zip(names, ws)], [res["win_rate"][n]["ci_high"] - w for n, w in zip(names, ws)]]
    axes[1].bar(range(len(names)), ws, yerr=err, capsize=4)
    axes[1].axhline(0.5, ls="--", color="gray")
    axes[1].set_xticks(range(len(names)))
    axes[1].set_xticklabels(names, fontsize=8)
    axes[1].set_ylim(0, 1)
    axes[1].set_title("Win rate of policy over reference")
    rep.save_figure(fig, "policy_vs_ref", "Response length distributions and win rates (error bars: 95% CI)")
    rep.h2("Examples")
    rows = []
    for i in range(min(6, len(smp["policy"].responses))):
        rows.append([smp["policy"].prompt_texts[i][:80], smp["ref"].responses[i][:120], smp["policy"].responses[i][:120]])
    rep.table(["prompt", "reference", "policy"], rows)
    rep.metrics = {k: v for k, v in res.items() if not k.startswith("_")}
    return rep.write()


# ----------------------------------------------------------------------------------------------
# Checkable answers: accuracy, pass@k, best-of-n


def powers(k: int) -> list[int]:
    """1, 2, 4, ... up to k, and k itself."""
    return sorted({2**i for i in range(k.bit_length()) if 2**i <= k} | {k})


def verify_side(model: str, prompts: list, fields: list[dict], verifier, kwargs: dict, k: int, scorer=None, correct_at: float = 1.0,
                max_new_tokens: int = 48, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                device: str = "auto") -> dict:
    """k samples per prompt, each checked by the verifier; a sample is correct when its score >= correct_at."""
    from tether.eval.scoring import sample
    from tether.rewards import call_reward_fn

    s = sample(model, prompts, k, max_new_tokens, temperature, top_p, seed, batch_size, device)
    rows = [f for f in fields for _ in range(k)]
    scores = call_reward_fn(verifier, s.prompt_texts, s.responses, [[] for _ in s.responses], kwargs, rows)
    correct = [float(x >= correct_at) for x in scores]
    per_prompt = [correct[i * k : (i + 1) * k] for i in range(len(prompts))]
    res = {"model": str(model), "accuracy": M.mean(correct), "ci": M.wilson_interval(sum(correct), len(correct)),
           "pass_at_k": {n: M.mean([M.pass_at_k(k, int(sum(c)), n) for c in per_prompt]) for n in powers(k)},
           "mean_tokens": M.mean(s.num_tokens), "_samples": s, "_correct": correct}
    if scorer is not None:
        rm = scorer.score_responses(s.prompts, s.responses)
        res["best_of_n"] = {n: M.mean([M.best_of_n(rm[i * k : (i + 1) * k], n, c) for i, c in enumerate(per_prompt)]) for n in powers(k)}
    return res


def write_verify_report(out_dir: str | Path, res: dict) -> Path:
    rep = Report(out_dir, "Policy accuracy on checkable answers")
    sides = res["sides"]
    rep.text(f"{res['prompts']} prompts × {res['samples_per_prompt']} samples (sampling {res['sampling']}), checked by "
             f"`{res['verifier']}`; a sample is correct when the verifier gives it ≥ {res['correct_at']}. Accuracy = the share of "
             "correct samples (pass@1), with a 95% Wilson interval; pass@k is the unbiased estimator of Chen et al. 2021 averaged over prompts"
             + ("; best-of-n is the accuracy of the sample the reward model scores highest among n (unbiased, over all draws of n)." if "best_of_n" in sides[0] else "."))
    ks = list(sides[0]["pass_at_k"])
    head = ["model", "accuracy", "95% CI", "mean tokens"] + [f"pass@{n}" for n in ks] + ([f"RM best-of-{n}" for n in ks] if "best_of_n" in sides[0] else [])
    rep.table(head, [[s["model"], s["accuracy"], f"[{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]", s["mean_tokens"]] + [s["pass_at_k"][n] for n in ks]
                     + ([s["best_of_n"][n] for n in ks] if "best_of_n" in s else []) for s in sides])
    rep.h2("Examples")
    smp, ok = sides[0]["_samples"], sides[0]["_correct"]
    rep.table(["prompt", "response", "correct"], [[smp.prompt_texts[i][:80], smp.responses[i][:160], ok[i]] for i in range(min(8, len(ok)))])
    rep.metrics = {k: v for k, v in res.items() if k != "sides"} | {"sides": [{k: v for k, v in s.items() if not k.startswith("_")} for s in sides]}
    return rep.write()


# ----------------------------------------------------------------------------------------------
# Over the checkpoints of a run


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer_config.json").exists() or (d / "tokenizer.json").exists()


def run_checkpoints(run: str | Path, ref: str | Path | None = None) -> list[tuple[int, Path, Path]]:
    """(step, policy folder, tokenizer folder) for each RUN/checkpoints/step_N/model_policy, or RUN/final
    when the run kept no checkpoint. The tokenizer comes from step_N/tokenizer, the model folder,
    RUN/final, or the reference, whichever has one first."""
    run = Path(run)
    found = []
    fallbacks = [run / "final"] + ([Path(ref)] if ref else [])
    for d in (run / "checkpoints").glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", d.name)
        model = d / "model_policy"
        if m and (model / "config.json").exists():
            tok = next((t for t in [d / "tokenizer", model, *fallbacks] if _has_tokenizer(t)), model)
            found.append((int(m.group(1)), model, tok))
    found.sort()
    final = run / "final"
    if not found and (final / "config.json").exists():
        import json

        step = 1
        if (run / "summary.json").exists():
            step = int(json.loads((run / "summary.json").read_text()).get("steps", 1) or 1)
        found.append((step, final, final if _has_tokenizer(final) else Path(ref or final)))
    return found


def evaluate_run(run: str | Path, ref: str, prompts: list, scorer=None, judges: dict | None = None, k: int = 1,
                 max_new_tokens: int = 48, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 batch_size: int = 16, device: str = "auto", logged: list[dict] | None = None) -> dict:
    """Every checkpoint against the reference; step 0 is the reference itself (the baseline)."""
    from tether.eval.scoring import sample

    judges = judges or {}
    points = [(0, Path(ref), Path(ref))] + [c for c in run_checkpoints(run, ref) if c[0] > 0]
    if len(points) < 2:
        raise FileNotFoundError(f"{run}: no checkpoints/step_N/model_policy folders and no final/ model")
    rows = []
    for step, path, tok in points:
        s = sample(path, prompts, k, max_new_tokens, temperature, top_p, seed, batch_size, device, ref_dir=ref, tokenizer_dir=tok)
        sc = score_side(s, scorer, judges)
        st = text_stats(s.responses, s.num_tokens)
        rows.append({"step": step, "path": str(path), "kl_k1": M.mean(s.kl_k1), "kl_k3": M.mean(s.kl_k3),
                     "mean": {n: M.mean(v) for n, v in sc.items()}, "length": st["length_tokens"]["mean"],
                     "distinct_2": st["distinct_2"], "repetition_4": st["repetition_4"], "refusal_rate": st["refusal_rate"],
                     "takeover": st["takeover"], "top_phrase": st["top_phrases"][0]["phrase"] if st["top_phrases"] else "",
                     "non_words": st["non_words"]["rate"], "non_word_examples": st["non_words"]["examples"],
                     "char_repetition": st["char_repetition"], "ref_perplexity": s.ref_perplexity})
    steps = [r["step"] for r in rows]
    flags = M.hacking_flags(
        steps, proxy=[r["mean"]["reward"] for r in rows] if scorer else None,
        gold={n: [r["mean"][n] for r in rows] for n in judges}, length=[r["length"] for r in rows],
        takeover=[r["takeover"] for r in rows], refusal=[r["refusal_rate"] for r in rows], phrases=[r["top_phrase"] for r in rows],
        non_word=[r["non_words"] for r in rows], non_word_examples=rows[-1]["non_word_examples"],
        char_rep=[r["char_repetition"] for r in rows], ref_perplexity=[r["ref_perplexity"] for r in rows])
    # The run's own logged proxy reward can show hacking before any checkpoint does.
    logged = logged or []
    return {"run": str(run), "ref": ref, "checkpoints": rows, "flags": flags, "logged": logged}


LOGGED_KEYS = ("rewards/raw_mean", "rewards/mean", "objective/kl", "response/length_mean", "cost/mean", "cost/violation_rate",
               "lagrange/lambda")


def logged_keys(logged: list[dict]) -> list[str]:
    """The fixed curves, then each named reward source's mean and contribution (reward.sources)."""
    seen = {k for r in logged for k in r}
    per_source = sorted(k for k in seen if k.startswith("rewards/") and k.endswith(("/mean", "/contribution")) and k.count("/") == 2)
    return [k for k in LOGGED_KEYS if k in seen] + per_source


def write_run_report(out_dir: str | Path, res: dict) -> Path:
    rep = Report(out_dir, "Reward-hacking signals across checkpoints")
    rep.text(f"Run `{res['run']}`, reference `{res['ref']}`. Step 0 is the reference. Each checkpoint samples the same prompts.")
    rep.h2("Flags")
    rep.bullets([f"**{f['flag']}**: {f['evidence']}" for f in res["flags"]] or ["no flag raised"])
    rows = res["checkpoints"]
    names = list(rows[0]["mean"]) if rows else []
    rep.table(["step"] + [f"mean {n}" for n in names] + ["KL k1", "length", "distinct-2", "rep-4", "char rep-4", "non-words", "ppl under ref",
                                                         "refusal", "top phrase share"],
              [[r["step"]] + [r["mean"][n] for n in names] + [r["kl_k1"], r["length"], r["distinct_2"], r["repetition_4"], r["char_repetition"],
                                                        fmt(r["non_words"]), fmt(r["ref_perplexity"]), r["refusal_rate"],
                                                              f"{r['takeover']:.2f} ({r['top_phrase']!r})"] for r in rows])
    steps = [r["step"] for r in rows]
    fig, axes = Report.figure(3, 4.6, 3.6)
    for n in names:
        v = [r["mean"][n] for r in rows]
        lo, hi = min(v), max(v)
        axes[0].plot(steps, [(x - lo) / (hi - lo) if hi > lo else 0.5 for x in v], "o-", label=n)
    axes[0].set_title("Proxy and gold scores (min-max scaled)")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=8)
    axes[1].plot(steps, [r["length"] for r in rows], "o-", color="tab:orange", label="mean tokens")
    ax2 = axes[1].twinx()
    ax2.plot(steps, [r["kl_k1"] for r in rows], "s--", color="tab:purple", label="KL k1")
    axes[1].set_title("Length (left) and KL to ref (right)")
    axes[1].set_xlabel("step")
    axes[2].plot(steps, [r["takeover"] for r in rows], "o-", label="top-phrase share")
    axes[2].plot(steps, [r["refusal_rate"] for r in rows], "o-", label="refusal rate")
    axes[2].plot(steps, [r["distinct_2"] for r in rows], "o-", label="distinct-2")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_title("Diversity and evasion")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=8)
    rep.save_figure(fig, "checkpoints", "Signals across checkpoints")
    logged = res["logged"]
    keys = logged_keys(logged)
    if keys:
        fig, axes = Report.grid(len(keys))
        for ax, key in zip(axes, keys):
            pts = [(r["step"], r[key]) for r in logged if isinstance(r.get(key), (int, float))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-")
            ax.set_title(key)
            ax.set_xlabel("step")
        rep.save_figure(fig, "logged", "The run's logged training curves (metrics.jsonl)")
    rep.metrics = {k: v for k, v in res.items() if k != "logged"}
    return rep.write()
