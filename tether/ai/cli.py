"""`tether ai`: AI feedback.

    tether ai label --model DIR|URL --data FILE --out labels.jsonl [--constitution FILE] [--principles all|sample|NAME]
                    [--both-orders | --one-order] [--on-flip average|tie]

--data: preference records ({prompt, chosen, rejected}, any format `tether rm` reads; their order is
ignored) or the feedback app's task format ({prompt, responses, id?}). --out: preference records in the
schema `tether label export` writes, meta.labeler / meta.principles / meta.confidence / meta.flip added.
Beside it: OUT.errors.jsonl (items that failed after retries, with the reason), OUT.ties.jsonl (items
judged exactly 0.5: no preference, so no record), and for a URL OUT.cache.jsonl (the request cache a
rerun resumes from). Exit 1 when any item failed (rerun to retry only those).

    tether ai critique-revise --model DIR|URL --prompts FILE --out DIR [--constitution FILE] [--principles sample|all|NAME]

Constitutional AI's supervised phase (tether.ai.critique): DIR/sft.jsonl (prompt -> revision, for `tether
sft`), DIR/pairs.jsonl (revision over initial, for `tether rm` / `tether dpo`), DIR/trace.jsonl (every
intermediate text). Resumable by chunks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def judge_args(p: argparse.ArgumentParser) -> None:
    """The labeler's options, shared with `tether eval labeler`."""
    p.add_argument("--constitution", help="a constitution YAML (default: tether's helpfulness/harmlessness/honesty set)")
    p.add_argument("--principles", default="all", help="all (averaged), sample (one per item, seeded), or one principle's name")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--both-orders", dest="both_orders", action="store_true", default=True, help="judge each pair as (A,B) and (B,A) (default)")
    g.add_argument("--one-order", dest="both_orders", action="store_false", help="one order per pair, drawn with the seed (half the cost)")
    p.add_argument("--on-flip", choices=["average", "tie"], default="average", help="when the two orders disagree: keep their mean, or make it a tie")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="local model: auto, cpu, cuda")
    p.add_argument("--batch-size", type=int, default=8, help="local model: comparisons per forward pass")
    p.add_argument("--max-length", type=int, default=2048, help="local model: longer comparisons have their responses shortened")
    p.add_argument("--model-name", help="URL: the model to request (default: the endpoint's first /v1/models entry)")
    p.add_argument("--api-key", default=None, help="URL: the key (default: $OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=60.0, help="URL: seconds per request")
    p.add_argument("--retries", type=int, default=4, help="URL: retries after a timeout, 429, 5xx or malformed answer")
    p.add_argument("--backoff", type=float, default=1.0, help="URL: first retry delay in seconds (doubles each retry)")
    p.add_argument("--concurrency", type=int, default=4, help="URL: requests in flight at once")
    p.add_argument("--top-logprobs", type=int, default=5, help="URL: top_logprobs requested")
    p.add_argument("--verbose", action="store_true", help="a traceback instead of the one-line error")


def build_judge(a, cache: Path | None):
    from tether.ai.judge import JudgeError, make_judge
    from tether.config import ConfigError

    try:
        return _make(a, cache, make_judge)
    except JudgeError as e:  # the endpoint did not answer /v1/models
        raise ConfigError(f"--model {a.model}: {e}") from None


def _make(a, cache, make_judge):
    return make_judge(a.model, device=a.device, batch_size=a.batch_size, max_length=a.max_length, model_name=a.model_name,
                      api_key=a.api_key, timeout=a.timeout, retries=a.retries, backoff=a.backoff, concurrency=a.concurrency,
                      cache=cache, top_logprobs=a.top_logprobs)


def sidecar(out: Path, what: str) -> Path:
    name = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{name}.{what}.jsonl")


def _jsonl(path: Path, recs: list[dict]) -> None:
    from tether.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))


def run_label(a) -> int:
    from tether.ai.constitution import load_constitution
    from tether.ai.judge import label, read_items, to_record

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    constitution = load_constitution(a.constitution)
    if a.principles not in ("all", "sample"):
        constitution.get(a.principles)
    items = read_items(a.data)
    judge = build_judge(a, sidecar(out, "cache"))
    t0 = time.monotonic()
    try:
        results = label(items, judge, constitution, a.principles, a.both_orders, a.seed, a.on_flip)
    finally:
        getattr(judge, "close", lambda: None)()
    recs = [rec for r in results if (rec := to_record(r, judge.identity))]
    ties = [{"id": r.item.id, "prompt": r.item.raw[0], "responses": list(r.item.raw[1:]), "p_orders": r.per_principle, "flip": r.flip}
            for r in results if r.p is not None and r.tie]
    errors = [{"id": r.item.id, "errors": r.errors} for r in results if r.errors]
    _jsonl(out, recs)
    _jsonl(sidecar(out, "ties"), ties)
    _jsonl(sidecar(out, "errors"), errors)
    flips = sum(r.flip for r in results)
    stats = getattr(judge, "stats", None)
    print(f"tether ai label: {len(items)} pairs in {time.monotonic() - t0:.1f} s with {judge.identity}: {len(recs)} labelled, "
          f"{len(ties)} ties, {flips} position flips, {len(errors)} failed" + (f"; requests {stats}" if stats else "") + f" -> {out}",
          file=sys.stderr)
    if errors:
        print(f"tether ai label: {len(errors)} item(s) failed (reasons in {sidecar(out, 'errors')}); run again to retry them", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    from tether.cli import one_line

    ap = argparse.ArgumentParser(prog="tether ai", description="AI feedback: label preference pairs with a judge and a constitution.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    lb = sub.add_parser("label", help="label pairs with an AI judge (a local HF chat model or an OpenAI-compatible URL)")
    lb.add_argument("--model", required=True, help="a local model folder, or an http(s):// OpenAI-compatible endpoint")
    lb.add_argument("--data", required=True, help="preference records or feedback-app tasks (jsonl)")
    lb.add_argument("--out", required=True, help="labelled preference records (jsonl)")
    judge_args(lb)
    from tether.ai import critique

    cr = sub.add_parser("critique-revise", help="Constitutional AI's supervised phase: answer, critique, revise; write SFT records and pairs",
                        description=critique.__doc__.strip().splitlines()[0])
    critique.add_args(cr)
    a = ap.parse_args(argv)
    run = critique.run if a.cmd == "critique-revise" else run_label
    return one_line(f"tether ai {a.cmd}", lambda: run(a), verbose=a.verbose)
