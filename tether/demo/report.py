"""The demo's evaluation and report: every policy on the held-out prompts, then report.md + PNG plots.

`evaluate` writes every number to eval/metrics.json (and the per-prompt samples next to it);
`write_report` only formats those numbers (report.md, results.json, plots/*.png), so the report and
the metrics files cannot disagree.

Metrics (gold = the VADER judge on the response; proxy = the reward model's raw score):
  gold_mean    mean gold score of one T=1 sample per held-out prompt
  win_rate     share of prompts where the policy's sample beats the SFT model's on gold (ties = 1/2),
               with a Wilson 95% interval
  kl           KL(policy || SFT) per response in nats, the mean over the policy's own samples of
               sum_t log pi(y_t) - log pi_sft(y_t); for best-of-N the closed form log N - (N-1)/N
               (Stiennon et al. 2020, appendix G.3), an upper bound
  rm accuracy  on held-out prompts: pairs of SFT samples whose gold scores differ, ordered by the RM
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tether.eval.metrics import mean, std, win_rate

METRICS_FILE = "metrics.json"


def _mean(xs) -> float:  # generators too
    return mean(list(xs))


def _checkpoints(run: Path) -> list[tuple[int, Path]]:
    root = run / "checkpoints"
    out = []
    for p in root.glob("step_*"):
        if p.is_dir() and "." not in p.name and (p / "model_policy" / "config.json").exists():
            out.append((int(p.name.split("_")[1]), p / "model_policy"))
    return sorted(out)


def _policy_entry(name: str, kind: str, step: int, gen: dict, gold: list[float], sft_gold: list[float]) -> dict:
    kl = [a - b for a, b in zip(gen["logp"], gen["logp_sft"])]
    return {
        "name": name, "kind": kind, "step": step,
        "gold_mean": _mean(gold), "proxy_mean": _mean(gen["proxy"]), "kl": _mean(kl),
        "length_mean": _mean(gen["lengths"]), "eos_fraction": _mean(float(f) for f in gen["finished"]),
        **{k: v for k, v in win_rate(gold, sft_gold).items()},
    }


def evaluate(demo, m) -> dict:
    """Sample every policy on the eval prompts and write eval/metrics.json."""
    from tether.demo.io import read_jsonl, write_json, write_jsonl
    from tether.judges import get_judge
    from tether.models import load_causal_lm
    from tether.track import console

    cfg, out = demo.cfg, demo.out
    judge = get_judge("vader")
    ev = read_jsonl(out / "data" / "prompts_eval.jsonl")
    prompts = [r["prompt"] for r in ev]
    samples: dict[str, list[str]] = {}
    gold_by: dict[str, list[float]] = {}

    def run(name: str, model, seed: int) -> tuple[dict, list[float]]:
        gen = m.generate(model, prompts, k=1, seed=seed, want_logprobs=True)
        gold = judge(prompts, gen["responses"])
        samples[name], gold_by[name] = gen["responses"], gold
        return gen, gold

    # SFT: the reference every policy is compared with (its own sample, so its win rate is ~0.5 by chance only)
    sft_gen, sft_gold = run("sft", m.sft, cfg.seed + 100)
    policies = [_policy_entry("SFT", "sft", 0, sft_gen, sft_gold, sft_gold)]
    console.print(f"eval: SFT gold {policies[0]['gold_mean']:.3f}", highlight=False)

    for kind in ("ppo", "dpo"):
        ckpts = _checkpoints(demo.d(kind))
        for i, (step, path) in enumerate(ckpts):
            model = load_causal_lm(path).eval()
            last = i == len(ckpts) - 1
            name = kind.upper() if last else f"{kind.upper()} @{step}"
            gen, gold = run(name, model, cfg.seed + 200 + step)
            e = _policy_entry(name, kind, step, gen, gold, sft_gold)
            e["final"] = last
            policies.append(e)
            console.print(f"eval: {name:10s} gold {e['gold_mean']:.3f}  win {e['win_rate']:.3f}  KL {e['kl']:.2f}  proxy {e['proxy_mean']:.3f}", highlight=False)
            del model

    # best-of-N from the bon stage's samples: the first N samples of each prompt, the RM's favourite
    bon_rows = read_jsonl(demo.d("bon") / "samples.jsonl")
    for n in cfg.bon_n:
        picks = [max(range(n), key=lambda j: r["proxy"][j]) for r in bon_rows]
        gold = [r["gold"][j] for r, j in zip(bon_rows, picks)]
        e = {
            "name": f"best-of-{n}", "kind": "bon", "step": n,
            "gold_mean": _mean(gold), "proxy_mean": _mean(r["proxy"][j] for r, j in zip(bon_rows, picks)),
            "kl": math.log(n) - (n - 1) / n, "length_mean": _mean(r["lengths"][j] for r, j in zip(bon_rows, picks)),
            "eos_fraction": float("nan"), **win_rate(gold, sft_gold),
        }
        e["final"] = n == max(cfg.bon_n)
        samples[e["name"]] = [r["responses"][j] for r, j in zip(bon_rows, picks)]
        gold_by[e["name"]] = gold
        policies.append(e)
        console.print(f"eval: {e['name']:10s} gold {e['gold_mean']:.3f}  win {e['win_rate']:.3f}  KL {e['kl']:.2f}", highlight=False)

    # reward-model accuracy against gold on held-out prompts: all pairs of SFT samples with different gold
    right = total = 0
    for r in bon_rows:
        g, p = r["gold"], r["proxy"]
        for a in range(len(g)):
            for b in range(a + 1, len(g)):
                if g[a] != g[b] and r["responses"][a] != r["responses"][b]:
                    total += 1
                    right += (p[a] - p[b]) * (g[a] - g[b]) > 0
    rm_summary = json.loads((demo.d("rm") / "summary.json").read_text())
    ann = json.loads((demo.d("annotate") / "annotators.json").read_text())
    rm = {
        "accuracy_vs_gold": right / max(total, 1), "gold_pairs": total,
        "accuracy_vs_labels": rm_summary.get("eval/accuracy"), "label_pairs": rm_summary.get("eval/pairs"),
        "train_accuracy": rm_summary.get("train/accuracy"),
    }
    # RM and gold on the same scale: standardised by the SFT samples' mean and std on the eval prompts
    sft_proxy = [x for r in bon_rows for x in r["proxy"]]
    sft_gold_all = [x for r in bon_rows for x in r["gold"]]
    scale = {"proxy_mean": _mean(sft_proxy), "proxy_std": std(list(sft_proxy)) or 1.0, "gold_mean": _mean(sft_gold_all), "gold_std": std(list(sft_gold_all)) or 1.0}
    for e in policies:
        e["proxy_z"] = (e["proxy_mean"] - scale["proxy_mean"]) / scale["proxy_std"]
        e["gold_z"] = (e["gold_mean"] - scale["gold_mean"]) / scale["gold_std"]

    names = ["sft"] + [e["name"] for e in policies if e.get("final") and e["kind"] != "sft"]
    rows = []
    for i, r in enumerate(ev):
        rows.append({"prompt": r["prompt"], "reference": r.get("reference", ""),
                     **{n: {"response": samples[n][i], "gold": gold_by[n][i]} for n in names}})
    write_jsonl(demo.d("eval") / "samples.jsonl", rows)

    metrics = {
        "prompts": len(prompts), "policies": policies, "rm": rm, "scale": scale,
        "annotators": ann, "thresholds": {"ppo_win_rate": 0.75, "dpo_win_rate": 0.65, "rm_accuracy_vs_gold": 0.75},
    }
    write_json(demo.d("eval") / METRICS_FILE, metrics)
    return {"rm_accuracy_vs_gold": rm["accuracy_vs_gold"],
            **{f"{e['kind']}_win_rate": e["win_rate"] for e in policies if e.get("final")}}


# ----------------------------------------------------------------------------------------------
# The report


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ").strip() or "(empty)"


def _final(policies: list[dict], kind: str) -> dict | None:
    c = [e for e in policies if e["kind"] == kind and e.get("final")]
    return c[0] if c else None


RESULT_COLUMNS = ["policy", "gold reward", "win rate vs SFT", "95% CI", "KL to SFT", "RM score", "length"]


def result_rows(metrics: dict) -> list[list[str]]:
    rows = []
    for e in metrics["policies"]:
        if e["kind"] == "sft" or e.get("final") or e["kind"] == "bon":
            rows.append([e["name"], fmt(e["gold_mean"]), fmt(e["win_rate"]), f"{fmt(e['ci_low'])}–{fmt(e['ci_high'])}",
                         fmt(e["kl"], 2), fmt(e["proxy_mean"]), fmt(e["length_mean"], 1)])
    return rows


def _to_trackers(demo, metrics: dict, rows: list[list[str]], samples: list[dict], pngs: list[Path]) -> None:
    """The report to the trackers `track.*` turns on: each policy's numbers, the results and samples as tables,
    the plots as images (the stages logged their own training curves)."""
    cfg = demo.cfg
    if not (cfg.track.mlflow or cfg.track.wandb or cfg.track.tensorboard):
        return
    from tether.backends.tracking import log_report
    from tether.config import to_dict

    numbers = {f"eval/{e['name']}/{k}": e[k] for e in metrics["policies"] for k in ("gold_mean", "win_rate", "kl")
               if isinstance(e.get(k), (int, float)) and math.isfinite(e[k])}
    names = [k for k in samples[0] if k not in ("prompt", "reference")] if samples else []
    tables = {"results": [dict(zip(RESULT_COLUMNS, r)) for r in rows],
              "samples": [{"prompt": s["prompt"], "policy": n, "response": s[n]["response"], "gold": s[n]["gold"]} for s in samples for n in names]}
    sent = log_report(demo.out, cfg.track, to_dict(cfg), numbers, tables, pngs)
    from tether.track import console

    console.print(f"report: {len(pngs)} plots, {len(tables)} tables and {len(numbers)} numbers logged to {', '.join(sent)}", highlight=False)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def checks(metrics: dict) -> list[dict]:
    th = metrics["thresholds"]
    out = []
    ppo, dpo = _final(metrics["policies"], "ppo"), _final(metrics["policies"], "dpo")
    out.append({"check": "reward model accuracy vs gold (held-out prompts)", "value": metrics["rm"]["accuracy_vs_gold"], "target": th["rm_accuracy_vs_gold"]})
    if ppo:
        out.append({"check": "PPO win rate vs SFT (gold)", "value": ppo["win_rate"], "target": th["ppo_win_rate"]})
    if dpo:
        out.append({"check": "DPO win rate vs SFT (gold)", "value": dpo["win_rate"], "target": th["dpo_win_rate"]})
    for c in out:
        c["passed"] = c["value"] >= c["target"]
    return out


def plots(demo, metrics: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tether.track import read_metrics

    pdir = demo.out / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    pol = metrics["policies"]
    sft = pol[0]
    made: list[tuple[str, str]] = []
    colors = {"ppo": "tab:red", "dpo": "tab:blue", "bon": "tab:green", "sft": "black"}

    # 1. The reward-KL frontier (Rafailov et al. 2023, figure 2)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.scatter([0], [sft["gold_mean"]], color="black", zorder=5, label="SFT")
    for kind, label in (("ppo", "PPO checkpoints"), ("dpo", "DPO checkpoints"), ("bon", "best-of-N (RM-ranked SFT samples)")):
        es = [e for e in pol if e["kind"] == kind]
        if not es:
            continue
        xs = [0.0] + [e["kl"] for e in es] if kind != "bon" else [e["kl"] for e in es]
        ys = [sft["gold_mean"]] + [e["gold_mean"] for e in es] if kind != "bon" else [e["gold_mean"] for e in es]
        ax.plot(xs, ys, "o-" if kind != "bon" else "s--", color=colors[kind], label=label, alpha=0.9)
        for e in es:
            tag = f"N={e['step']}" if kind == "bon" else f"{e['step']}"
            ax.annotate(tag, (e["kl"], e["gold_mean"]), textcoords="offset points", xytext=(4, -10), fontsize=7, color=colors[kind])
    ax.set_xlabel("KL(policy || SFT) per response (nats)")
    ax.set_ylabel("gold reward: mean VADER compound of the response")
    ax.set_title("Reward vs KL on held-out prompts (labels: step or N)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(pdir / "frontier.png", dpi=120)
    plt.close(fig)
    made.append(("frontier.png", "Gold reward against KL to the SFT model: PPO and DPO checkpoints, best-of-N at each N (the reward–KL frontier of the DPO paper's figure 2)."))

    # 2. Proxy vs gold over PPO (Gao et al. 2022)
    es = [e for e in pol if e["kind"] == "ppo"]
    bon = [e for e in pol if e["kind"] == "bon"]
    if es:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
        ax = axes[0]
        steps = [0] + [e["step"] for e in es]
        ax.plot(steps, [sft["proxy_z"]] + [e["proxy_z"] for e in es], "o-", color="tab:orange", label="proxy: reward model")
        ax.plot(steps, [sft["gold_z"]] + [e["gold_z"] for e in es], "o-", color="tab:purple", label="gold: VADER")
        ax.set_xlabel("PPO iteration")
        ax.set_ylabel("mean score, in SFT standard deviations above SFT")
        ax.set_title("PPO: proxy vs gold reward on held-out prompts")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax = axes[1]
        ks = [math.sqrt(max(e["kl"], 0.0)) for e in es]
        ax.plot([0] + ks, [sft["proxy_z"]] + [e["proxy_z"] for e in es], "o-", color="tab:orange", label="PPO proxy")
        ax.plot([0] + ks, [sft["gold_z"]] + [e["gold_z"] for e in es], "o-", color="tab:purple", label="PPO gold")
        if bon:
            kb = [math.sqrt(e["kl"]) for e in bon]
            ax.plot(kb, [e["proxy_z"] for e in bon], "s--", color="tab:orange", alpha=0.5, label="best-of-N proxy")
            ax.plot(kb, [e["gold_z"] for e in bon], "s--", color="tab:purple", alpha=0.5, label="best-of-N gold")
        ax.set_xlabel("sqrt KL(policy || SFT)  (Gao et al. 2022's axis)")
        ax.set_ylabel("mean score, in SFT standard deviations above SFT")
        ax.set_title("Over-optimisation view: a widening gap = reward hacking")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(pdir / "proxy_vs_gold.png", dpi=120)
        plt.close(fig)
        made.append(("proxy_vs_gold.png", "The reward model's score (proxy) next to the gold score over PPO training and best-of-N, both standardised by the SFT samples (Gao et al. 2022's over-optimisation picture)."))

    # 3. Training curves
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    try:
        ppo_m = read_metrics(demo.d("ppo"))
    except OSError:
        ppo_m = []
    if ppo_m:
        st = [r["step"] for r in ppo_m if "rewards/raw_mean" in r]
        axes[0, 0].plot(st, [r["rewards/raw_mean"] for r in ppo_m if "rewards/raw_mean" in r], color="tab:orange", label="RM score of rollouts (raw)")
        axes[0, 0].set_title("PPO: reward-model score of training rollouts")
        axes[0, 0].set_xlabel("iteration")
        axes[0, 1].plot(st, [r["objective/kl"] for r in ppo_m if "rewards/raw_mean" in r], color="tab:red", label="KL(policy || SFT) per response")
        axes[0, 1].set_title("PPO: KL to the SFT model on training rollouts")
        axes[0, 1].set_xlabel("iteration")
        axes[0, 1].set_ylabel("nats")
    try:
        rm_m = [r for r in read_metrics(demo.d("rm")) if "loss/bt" in r or any(k.startswith("loss/") for k in r)]
    except OSError:
        rm_m = []
    if rm_m:
        lk = next(k for k in rm_m[0] if k.startswith("loss/"))
        axes[1, 0].plot([r["step"] for r in rm_m if lk in r], [r[lk] for r in rm_m if lk in r], color="tab:gray", alpha=0.6, label=f"RM train {lk}")
        acc = [(r["step"], r["rm/accuracy"]) for r in rm_m if "rm/accuracy" in r]
        held = [(r["step"], r["eval/accuracy"]) for r in rm_m if "eval/accuracy" in r and "train/accuracy" not in r]
        if acc:
            ax2 = axes[1, 0].twinx()
            ax2.plot(*zip(*acc), color="tab:green", alpha=0.4, label="train batch accuracy")
            if held:
                ax2.plot(*zip(*held), "o-", color="tab:olive", label="held-out accuracy (annotator labels)")
                best = json.loads((demo.d("rm") / "summary.json").read_text()).get("best_step")
                if best:
                    ax2.axvline(best, color="tab:olive", ls=":", lw=1, label=f"kept weights (step {best})")
            ax2.set_ylim(0, 1)
            ax2.set_ylabel("accuracy")
            ax2.legend(fontsize=8, loc="lower right")
        axes[1, 0].set_title(f"Reward model training (held-out acc. vs gold {metrics['rm']['accuracy_vs_gold']:.3f})")
        axes[1, 0].set_xlabel("step")
    try:
        dpo_m = read_metrics(demo.d("dpo"))
    except OSError:
        dpo_m = []
    if dpo_m:
        lk = next((k for r in dpo_m for k in r if k.startswith("loss/")), None)
        if lk:
            axes[1, 1].plot([r["step"] for r in dpo_m if lk in r], [r[lk] for r in dpo_m if lk in r], color="tab:blue", alpha=0.7, label=f"DPO {lk}")
        mk = next((k for r in dpo_m for k in r if k.endswith("margin") and not k.startswith("eval")), None)
        if mk:
            ax2 = axes[1, 1].twinx()
            ax2.plot([r["step"] for r in dpo_m if mk in r], [r[mk] for r in dpo_m if mk in r], color="tab:cyan", alpha=0.7, label=mk)
            ax2.set_ylabel(mk)
            ax2.legend(fontsize=8, loc="lower right")
        axes[1, 1].set_title("DPO training")
        axes[1, 1].set_xlabel("step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(pdir / "training.png", dpi=120)
    plt.close(fig)
    made.append(("training.png", "Training curves: PPO's reward-model score and KL per iteration; the reward model's loss, batch accuracy and held-out accuracy on the annotators' labels (dotted line: the step whose weights were kept); DPO's loss and reward margin."))

    # 4. Win rates
    fin = [e for e in pol if e["kind"] != "sft" and (e.get("final") or e["kind"] == "bon")]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    xs = range(len(fin))
    ax.bar(xs, [e["win_rate"] for e in fin], color=[colors[e["kind"]] for e in fin], alpha=0.8,
           yerr=[[e["win_rate"] - e["ci_low"] for e in fin], [e["ci_high"] - e["win_rate"] for e in fin]], capsize=3)
    ax.axhline(0.5, color="black", lw=0.8, ls=":")
    ax.set_xticks(list(xs), [e["name"] for e in fin], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate vs SFT (gold judge)")
    ax.set_title("Win rate against the SFT model on held-out prompts (95% CI)")
    fig.tight_layout()
    fig.savefig(pdir / "win_rates.png", dpi=120)
    plt.close(fig)
    made.append(("win_rates.png", "Win rate of each policy against the SFT model on the gold judge, with Wilson 95% intervals."))
    return made


def write_report(demo) -> dict:
    from tether.demo.io import write_json

    out = demo.out
    metrics = json.loads((demo.d("eval") / METRICS_FILE).read_text())
    figs = plots(demo, metrics)
    rows = result_rows(metrics)
    ck = checks(metrics)
    ann = metrics["annotators"]["train"]
    a_cfg = json.loads((demo.d("annotate") / "config.json").read_text())
    rm = metrics["rm"]
    timings = dict(demo.timings)
    cfg = demo.cfg
    base = cfg.base_model or "a GPT-2-style model pretrained from scratch by `tether pretrain`"

    L: list[str] = ["# tether demo: controlled-sentiment RLHF", ""]
    L.append(f"Base model: {base}. Gold judge: VADER sentiment of the response. {metrics['prompts']} held-out prompts "
             f"(the first {cfg.prompt_words[0]}–{cfg.prompt_words[1]} words of reviews never trained on), one sample per prompt at temperature 1, "
             f"at most {cfg.max_new_tokens} new tokens.")
    L.append("")
    L.append(f"Precision: {cfg.precision_note}.")
    L.append("")
    L.append("## Results")
    L.append("")
    L.append(md_table(RESULT_COLUMNS, rows))
    L.append("")
    L.append("gold reward: mean VADER compound in [-1, 1]; win rate: share of prompts where the policy's response scores higher "
             "on gold than the SFT model's (ties count ½); KL: nats per response, estimated on the policy's samples "
             "(best-of-N: the bound log N − (N−1)/N); RM score: the reward model's raw score; length: tokens.")
    L.append("")
    L.append("## Checks")
    L.append("")
    L.append(md_table(["check", "value", "target", "passed"], [[c["check"], fmt(c["value"]), fmt(c["target"]), "✅" if c["passed"] else "❌"] for c in ck]))
    L.append("")
    L.append("## Feedback and reward model")
    L.append("")
    L.append(md_table(["quantity", "value"], [
        ["annotator rationality β (P(A) = σ(β·(gold_A − gold_B)))", fmt(float(a_cfg["rationality"]), 1)],
        ["contrarian annotators in the pool", f"{ann['contrarians']} of {a_cfg['pool_size']}"],
        ["votes per pair", str(a_cfg["votes_per_pair"])],
        ["pairs compared (train)", str(ann["pairs"])],
        ["preference records (train / held out)", f"{ann['records']} / {metrics['annotators']['eval']['records']}"],
        ["inter-annotator agreement (share of votes for the majority)", fmt(ann["inter_annotator_agreement"])],
        ["votes agreeing with gold", fmt(ann["vote_gold_agreement"])],
        ["labels agreeing with gold (measured)", fmt(ann["label_gold_agreement"])],
        ["labels agreeing with gold (the noise model's expectation)", fmt(ann["expected_label_gold_agreement"])],
        ["RM accuracy vs gold, held-out prompts", f"{fmt(rm['accuracy_vs_gold'])} ({rm['gold_pairs']} pairs)"],
        ["RM accuracy vs annotator labels, held-out pairs", f"{fmt(rm['accuracy_vs_labels'])} ({rm['label_pairs']} pairs)"],
    ]))
    L.append("")
    L.append("## Plots")
    L.append("")
    for name, caption in figs:
        L.append(f"![{name}](plots/{name})")
        L.append("")
        L.append(f"*{caption}*")
        L.append("")
    L.append("## Samples (held-out prompts)")
    L.append("")
    samples = [json.loads(x) for x in (demo.d("eval") / "samples.jsonl").read_text().splitlines()[: cfg.n_sample_rows]]
    if samples:
        names = [k for k in samples[0] if k not in ("prompt", "reference")]
        header = ["prompt"] + names
        srows = [[_md_cell(s["prompt"])] + [f"{_md_cell(s[n]['response'])} ({s[n]['gold']:+.2f})" for n in names] for s in samples]
        L.append(md_table(header, srows))
        L.append("")
        L.append("Each cell: the response, then its gold score. All samples: eval/samples.jsonl.")
        L.append("")
    L.append("## Time and memory")
    L.append("")
    trows = [[k, fmt(v.get("wall_s"), 1), fmt(v.get("cpu_s"), 1), str(v.get("peak_rss_mb", "–")), "reused" if v.get("reused") else ""] for k, v in timings.items()]
    L.append(md_table(["stage", "wall s", "CPU s", "peak RSS MB", ""], trows))
    L.append("")
    L.append(f"Configs: {out}/config.json and each stage's config.json. Numbers: eval/metrics.json.")
    L.append("")
    path = out / "report.md"
    path.write_text("\n".join(L))
    results = {"table": {"columns": RESULT_COLUMNS, "rows": rows}, "checks": ck, "timings": timings, "precision": cfg.resolved_precision,
               "plots": [str(out / "plots" / n) for n, _ in figs], "report": str(path)}
    write_json(out / "results.json", results)
    _to_trackers(demo, metrics, rows, samples, [out / "plots" / n for n, _ in figs])
    return {
        "path": str(path),
        "table": text_table(RESULT_COLUMNS, rows) + "\n\n" + "\n".join(f"{'PASS' if c['passed'] else 'FAIL'}  {c['check']}: {c['value']:.3f} (target {c['target']})" for c in ck),
        "timing_table": text_table(["stage", "wall s", "CPU s", "peak RSS MB"], [r[:4] for r in trows]),
    }
