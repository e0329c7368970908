"""`tether eval`: reports that answer "is my reward model any good?", "did the policy improve?", "is it
hacking the reward?", "is it sycophantic?" and "is my preference data sound?".

    tether eval rm --model runs/rm/final --data held_out.jsonl other.jsonl --judge vader --out reports/rm
    tether eval policy --model runs/ppo/final --ref runs/sft/final --prompts prompts.jsonl --reward-model runs/rm/final --judge vader --out reports/policy
    tether eval policy --run runs/ppo --ref runs/sft/final --prompts prompts.jsonl --reward-model runs/rm/final --judge vader --out reports/run
    tether eval sycophancy --model runs/rm/final --out reports/syc
    tether eval sycophancy --conflict 0,0.25,0.5,0.75,1 --base-model runs/sft/final --out reports/conflict
    tether eval data prefs.jsonl more.jsonl --out reports/data
    tether eval refusal --data completions.csv --out reports/refusal
    tether eval redteam --model runs/ppo/final --out reports/redteam
    tether eval labeler --labeler runs/sft/final --data prefs.jsonl --out reports/labeler

Each writes OUT/report.md, OUT/metrics.json and PNG plots. Metric definitions: docs/eval.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _files(values: list[str]) -> list[str]:
    return [f for v in values for f in v.split(",") if f]


def _judges(specs: list[str], rubric: str | None, device: str) -> dict:
    from tether.judges import get_judge, judge_name

    return {judge_name(s): get_judge(s, rubric=rubric, device="cpu" if device == "auto" else device) for s in specs or []}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="report folder (report.md, metrics.json, *.png)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--track", default="", help="also log the report to trackers: any of mlflow,wandb,tensorboard (numbers, tables, "
                   "plots as images; MLflow's store: OUT/mlflow.db; W&B project: tether)")


def _judge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", action="append", default=[],
                   help="gold judge (repeatable): vader, length, rule:<regex>, llm:<model_dir>, module:function")
    p.add_argument("--judge-rubric", default=None, help="rubric for llm:<model_dir> judges")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tether eval", description=__doc__.strip().splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    rm = sub.add_parser("rm", help="reward-model accuracy, calibration, breakdowns, length bias, judge agreement")
    rm.add_argument("--model", required=True, help="a reward-model folder (tether rm's final/)")
    rm.add_argument("--data", nargs="+", required=True, help="preference files (each reported separately; ',' also separates)")
    rm.add_argument("--max-pairs", type=int, default=0, help="score at most this many pairs per file, spread evenly (0 = all)")
    rm.add_argument("--max-length", type=int, default=512, help="tokens of prompt+response (longer responses are truncated)")
    rm.add_argument("--max-prompt-length", type=int, default=384, help="longer prompts are skipped and counted")
    rm.add_argument("--bins", type=int, default=10, help="calibration bins over [0.5, 1]")
    rm.add_argument("--head", action="append", default=[], help="a multi-objective model's head to evaluate (repeatable; default: every head)")
    _judge_args(rm)
    _common(rm)

    po = sub.add_parser("policy", help="win rates, KL, length, diversity and reward-hacking flags of a policy (or a run's checkpoints)")
    po.add_argument("--model", help="the policy folder (or use --run)")
    po.add_argument("--run", help="a training run folder: evaluate every checkpoints/step_N/model_policy")
    po.add_argument("--ref", help="the reference policy folder (e.g. the SFT model); optional with --verifier")
    po.add_argument("--prompts", required=True, help="prompt file (jsonl/json/txt; any format tether reads prompts from)")
    po.add_argument("--reward-model", help="the proxy reward model folder (optional)")
    po.add_argument("--reward-head", help="which head of a multi-objective reward model (`tether rm heads=[...]`) scores")
    po.add_argument("--n-prompts", type=int, default=64, help="use the first N prompts (0 = all)")
    po.add_argument("-k", "--samples", type=int, default=1, help="samples per prompt")
    po.add_argument("--max-new-tokens", type=int, default=48)
    po.add_argument("--temperature", type=float, default=1.0, help="1.0 keeps the k1 KL estimate unbiased")
    po.add_argument("--top-p", type=float, default=1.0)
    po.add_argument("--seed", type=int, default=0)
    po.add_argument("--verifier", help="a reward function that checks answers (e.g. tether.rewards:exact_number): report accuracy, pass@k and "
                                       "the reward model's best-of-n; it gets each prompt record's other fields (its reference answer)")
    po.add_argument("--verifier-kwargs", default="{}", help="keyword arguments of the verifier as JSON, e.g. '{\"style\": \"boxed\"}'")
    po.add_argument("--correct-at", type=float, default=1.0, help="a sample is correct when the verifier gives it at least this")
    _judge_args(po)
    _common(po)

    sy = sub.add_parser("sycophancy", help="TruthfulQA sycophancy probe of a reward model or policy; labeler-conflict experiment")
    sy.add_argument("--model", help="a reward model or a policy folder")
    sy.add_argument("--kind", choices=["auto", "rm", "policy"], default="auto", help="auto: a folder with tether_reward.json or a *ForSequenceClassification config is a reward model")
    sy.add_argument("--truthfulqa", default=None, help="TruthfulQA.csv (default: truthfulqa/TruthfulQA.csv in $TETHER_DATA, else ../shared/data)")
    sy.add_argument("--n", type=int, default=200, help="number of questions probed (0 = all 817)")
    sy.add_argument("--all-templates", action="store_true", help="probe every phrasing of every question (3x the probes)")
    sy.add_argument("--max-new-tokens", type=int, default=48, help="policy answers: tokens to sample")
    sy.add_argument("--temperature", type=float, default=0.0, help="policy answers: 0 = greedy")
    sy.add_argument("--conflict", default="", help="labeler-conflict experiment: comma-separated shares p, e.g. 0,0.25,0.5,0.75,1")
    sy.add_argument("--base-model", help="conflict experiment: the model each reward model starts from")
    sy.add_argument("--steps", type=int, default=40, help="conflict experiment: RM training steps per p")
    sy.add_argument("--train-questions", type=int, default=200, help="conflict experiment: training questions (x3 phrasings)")
    sy.add_argument("--eval-questions", type=int, default=100, help="conflict experiment: held-out questions")
    sy.add_argument("--lr", type=float, default=2e-5, help="conflict experiment: RM learning rate")
    sy.add_argument("--train-batch-size", type=int, default=8, help="conflict experiment: pairs per RM step")
    sy.add_argument("--max-length", type=int, default=256)
    sy.add_argument("--seed", type=int, default=0)
    _common(sy)

    da = sub.add_parser("data", help="duplicates, length bias, sources, agreement and intransitive cycles of preference data")
    da.add_argument("files", nargs="+", help="preference files (each reported separately)")
    da.add_argument("--out", required=True, help="report folder")
    da.add_argument("--near-threshold", type=float, default=0.8, help="word-3-shingle Jaccard at which two prompts are near duplicates")
    rf = sub.add_parser("refusal", help="the refusal judge on prompt/completion rows; agreement with human labels (XSTest's final_label)")
    rf.add_argument("--data", nargs="+", required=True, help="CSV or jsonl files with prompt and completion (each reported separately)")
    _refusal_judge_args(rf)
    rf.add_argument("--out", required=True, help="report folder (one subfolder per file when several)")

    rt = sub.add_parser("redteam", help="harmful compliance and over-refusal of a policy on XSTest's prompts, by type, with CIs")
    rt.add_argument("--model", required=True, help="the policy folder")
    rt.add_argument("--prompts", default=None, help="XSTest-format prompts CSV (default: xstest/xstest_prompts.csv in the shared data)")
    rt.add_argument("--n", type=int, default=0, help="use N prompts spread evenly over the file (0 = all 450)")
    rt.add_argument("--max-new-tokens", type=int, default=64)
    rt.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    rt.add_argument("--seed", type=int, default=0)
    _refusal_judge_args(rt)
    _common(rt)

    from tether.ai.cli import judge_args

    lb = sub.add_parser("labeler", help="an AI labeler's agreement with human preference labels, flips, calibration, baselines, routing")
    lb.add_argument("--labeler", dest="model", required=True, help="a local chat model folder or an OpenAI-compatible URL")
    lb.add_argument("--data", nargs="+", required=True, help="preference files, chosen = the human's choice (each reported separately)")
    lb.add_argument("--out", required=True, help="report folder")
    lb.add_argument("--max-pairs", type=int, default=0, help="judge at most this many pairs per file, spread evenly (0 = all)")
    judge_args(lb)
    return ap


def _refusal_judge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", choices=["rules+embedding", "rules"], default="rules+embedding",
                   help="rules alone, or rules + an embedding classifier (needs tether[safety])")
    p.add_argument("--fit", nargs="*", default=None,
                   help="labelled files the classifier is fitted on (default: XSTest's three, minus any file being scored)")
    p.add_argument("--threshold", type=float, default=0.7, help="classifier probability above which a completion refuses")


def _refusal_judge(a, scored: list[str]):
    from tether.judges.refusal import RefusalJudge, fit_judge

    if a.judge == "rules":
        return RefusalJudge()
    return fit_judge(a.fit or None, exclude=scored, threshold=a.threshold)


def run_refusal(a) -> Path:
    from tether.eval.redteam import agreement, write_refusal_report

    files = _files(a.data)
    path = None
    for f in files:
        print(f"tether eval refusal: judging {f}", file=sys.stderr)
        out = Path(a.out) / Path(f).stem if len(files) > 1 else Path(a.out)
        path = write_refusal_report(out, agreement(f, _refusal_judge(a, [f])))
        res = json.loads((out / "metrics.json").read_text())
        if "accuracy" in res:
            print(f"  {Path(f).name}: agreement {100 * res['accuracy']:.1f}% over {res['rows']} rows", file=sys.stderr)
    return path


def run_redteam(a) -> Path:
    from tether.eval.redteam import load_xstest_prompts, redteam, write_redteam_report

    prompts = load_xstest_prompts(a.prompts)
    if a.n and a.n < len(prompts):
        prompts = [prompts[i * len(prompts) // a.n] for i in range(a.n)]
    res = redteam(a.model, _refusal_judge(a, []), prompts, a.max_new_tokens, a.temperature, a.seed, a.batch_size, a.device)
    print(f"  harmful compliance {100 * res['harmful_compliance']['rate']:.1f}%, over-refusal {100 * res['over_refusal']['rate']:.1f}%",
          file=sys.stderr)
    return write_redteam_report(a.out, res)


def run_rm(a) -> Path:
    from tether.eval.rm_report import evaluate_file, write_report
    from tether.eval.scoring import Scorer

    scorer = Scorer.load(a.model, a.device, a.batch_size, a.max_length, a.max_prompt_length)
    judges = _judges(a.judge, a.judge_rubric, a.device)
    heads = a.head or scorer.heads
    if a.head and not scorer.heads:
        raise SystemExit(f"tether eval rm: {a.model} has one unnamed head; drop --head")
    results = []
    for h in heads or [""]:
        if h:
            try:
                scorer.use_head(h)
            except ValueError as e:
                raise SystemExit(f"tether eval rm: {a.model}: {e}") from None
        for f in _files(a.data):
            print(f"tether eval rm: scoring {f}" + (f" with the head {h}" if h else ""), file=sys.stderr)
            results.append(evaluate_file(scorer, f, judges, a.bins, a.max_pairs))
    return write_report(a.out, a.model, results)


def _prompts(path: str, n: int, fields: list | None = None) -> list:
    from tether.data import load_prompts

    examples, _ = load_prompts(path)
    examples = examples[:n] if n else examples
    if fields is not None:  # each record's other fields, for a verifier
        fields += [e.meta for e in examples]
    return [e.prompt for e in examples]


def run_verify(a, scorer) -> Path:
    from tether.eval import policy_report as P
    from tether.rewards import load_reward_fn

    try:
        kwargs = json.loads(a.verifier_kwargs)
    except json.JSONDecodeError as e:
        raise ValueError(f"--verifier-kwargs: not JSON ({e})") from None
    fn, fields = load_reward_fn(a.verifier), []
    prompts = _prompts(a.prompts, a.n_prompts, fields)
    kw = dict(scorer=scorer, correct_at=a.correct_at, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
              batch_size=a.batch_size, device=a.device)
    sides = [P.verify_side(m, prompts, fields, fn, kwargs, a.samples, **kw) for m in [a.model] + ([a.ref] if a.ref else [])]
    print("  " + "; ".join(f"{s['model']}: accuracy {s['accuracy']:.3f}, pass@{a.samples} {s['pass_at_k'][a.samples]:.3f}" for s in sides), file=sys.stderr)
    return P.write_verify_report(a.out, {"verifier": a.verifier, "verifier_kwargs": kwargs, "correct_at": a.correct_at, "prompts": len(prompts),
                                         "samples_per_prompt": a.samples, "sides": sides,
                                         "sampling": {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p, "seed": a.seed}})


def run_policy(a) -> Path:
    from tether.eval import policy_report as P

    if not a.model and not a.run:
        raise SystemExit("tether eval policy: give --model (one policy) or --run (a run folder)")
    if a.verifier and a.run:
        raise SystemExit("tether eval policy: --verifier evaluates one --model (and --ref), not a --run")
    if not a.ref and not a.verifier:
        raise SystemExit("tether eval policy: give --ref (the reference policy), or --verifier to check answers")
    scorer = None
    if a.reward_model:
        from tether.eval.scoring import Scorer

        scorer = Scorer.load(a.reward_model, a.device, a.batch_size)
        if a.reward_head:
            scorer.use_head(a.reward_head)
        elif scorer.heads:  # before any sampling, not after it
            raise ValueError(f"{a.reward_model} has the heads {', '.join(scorer.heads)}; choose one with --reward-head")
    if a.verifier:
        return run_verify(a, scorer)
    judges = _judges(a.judge, a.judge_rubric, a.device)
    prompts = _prompts(a.prompts, a.n_prompts)
    kw = dict(scorer=scorer, judges=judges, k=a.samples, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
              top_p=a.top_p, seed=a.seed, batch_size=a.batch_size, device=a.device)
    if a.run:
        from tether.track import read_metrics

        mfile = Path(a.run) / "metrics.jsonl"
        logged = read_metrics(mfile) if mfile.exists() else []
        return P.write_run_report(a.out, P.evaluate_run(a.run, a.ref, prompts, logged=logged, **kw))
    return P.write_report(a.out, P.evaluate(a.model, a.ref, prompts, **kw))


def run_sycophancy(a) -> Path:
    from tether.eval import sycophancy as S
    from tether.eval.scoring import Scorer, is_reward_model

    if not a.model and not a.conflict:
        raise SystemExit("tether eval sycophancy: give --model and/or --conflict with --base-model")
    items = S.load_truthfulqa(a.truthfulqa)
    kind, probe, conflict = None, None, None
    if a.model:
        kind = a.kind if a.kind != "auto" else ("rm" if is_reward_model(a.model) else "policy")
        chosen = items[: a.n] if a.n else items
        probes = S.make_probes(chosen, all_templates=a.all_templates)
        if kind == "rm":
            probe = S.rm_probe(Scorer.load(a.model, a.device, a.batch_size, a.max_length, a.max_length - 32), probes)
        else:
            probe = S.policy_probe(a.model, probes, a.max_new_tokens, a.temperature, a.seed, a.batch_size, a.device)
    if a.conflict:
        if not a.base_model:
            raise SystemExit("tether eval sycophancy: --conflict needs --base-model")
        shares = [float(x) for x in a.conflict.split(",") if x.strip()]
        conflict = S.conflict_experiment(a.base_model, shares, Path(a.out) / "conflict_runs", items, a.train_questions, a.eval_questions,
                                         a.steps, a.train_batch_size, a.lr, a.seed, a.device, a.batch_size, a.max_length)
    return S.write_report(a.out, a.model, kind, probe, conflict, a.base_model)


def run_data(a) -> Path:
    from tether.eval.data_report import analyze_file, write_report

    return write_report(a.out, [analyze_file(f, a.near_threshold) for f in _files(a.files)])


def run_labeler(a) -> Path:
    from tether.ai.eval_labeler import run

    return run(a)


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    if getattr(a, "threads", 0):
        import torch

        torch.set_num_threads(a.threads)
    from tether.data import DataError
    from tether.models import ModelError

    track = _track_config(getattr(a, "track", ""))
    from tether.eval.report import Report

    Report.written.clear()
    try:
        path = {"rm": run_rm, "policy": run_policy, "sycophancy": run_sycophancy, "data": run_data, "refusal": run_refusal,
                "redteam": run_redteam, "labeler": run_labeler}[a.cmd](a)
    except (DataError, ModelError, FileNotFoundError, ValueError) as e:
        print(f"tether eval {a.cmd}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}", file=sys.stderr)
    if track is not None:
        _to_trackers(a, track, Report.written)
    return 0


def _track_config(spec: str):
    from tether.config import TrackConfig

    names = {t.strip() for t in spec.split(",") if t.strip()}
    if not names:
        return None
    if names - {"mlflow", "wandb", "tensorboard"}:
        raise SystemExit(f"tether eval: --track takes mlflow, wandb and tensorboard; got {', '.join(sorted(names))}")
    return TrackConfig(**{n: True for n in names})


def _to_trackers(a, track, reports: list) -> None:
    """Each report written (one per data file for some commands) to the trackers, from its own folder."""
    from tether.backends.tracking import log_report

    config = {k: v for k, v in vars(a).items() if isinstance(v, (str, int, float, bool, list)) or v is None}
    for rep in reports:
        sent = log_report(rep.out, track, config, rep.numbers(), rep.tables, [rep.out / f for f in rep.figures])
        print(f"logged {rep.out / 'report.md'}: {len(rep.figures)} plots, {len(rep.tables)} tables to {', '.join(sent)}", file=sys.stderr)
