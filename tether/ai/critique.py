"""Critique and revision: the supervised phase of Constitutional AI (Bai et al. 2022, section 3.1).

For each prompt the model answers (the *initial* response); then, for each principle chosen for the prompt,
it is asked the principle's critique request about its last answer (the *critique*) and then the principle's
revision request (the *revision*), in one conversation:

    user: <prompt>                     assistant: <initial>
    user: <critique request>           assistant: <critique>
    user: <revision request>           assistant: <revision>

With several principles (--principles all) each later principle critiques and revises the previous revision,
as Bai et al. do with repeated revisions. Written under --out DIR:

    trace.jsonl  every prompt with every intermediate text: initial, and per round the principle, the
                 critique request, the critique, the revision request and the revision
    sft.jsonl    {prompt, completion: final revision}: `tether sft` data (an empty revision is not written)
    pairs.jsonl  {prompt, chosen: final revision, rejected: initial}: `tether rm` / `tether dpo` data (not
                 written when the revision is empty or equal to the initial answer)
    errors.jsonl prompts whose generation failed after retries (URL backend), with the reason

Resumable: prompts are processed in chunks of --chunk; each finished chunk is written atomically under
DIR/chunks/, and a rerun skips the finished chunks. A chunk's sampling seed depends only on --seed and the
chunk's index, so a run killed and started again writes the same files as one that was not (local model;
a URL backend resumes from its request cache, DIR/cache.jsonl). The settings are kept in DIR/settings.json
and a rerun with other settings stops with one line.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from tether.ai.compare import JudgeError
from tether.ai.constitution import Constitution, Principle


def as_messages(prompt: str | list) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def principles_for(pid: str, constitution: Constitution, mode: str, seed: int) -> list[Principle]:
    """all: every principle in turn; sample: one drawn with the seed and the prompt's id; else one by name."""
    if mode == "all":
        return list(constitution.principles)
    if mode == "sample":
        return [random.Random(f"{seed}:{pid}").choice(constitution.principles)]
    return [constitution.get(mode)]


def critique_revise(prompts: list[tuple[str, Any]], generate, constitution: Constitution, mode: str, seed: int) -> list[dict]:
    """Trace records for (id, prompt) pairs. `generate(conversations, seed) -> list[str | JudgeError]`
    answers each conversation (a message list ending on a user turn). A prompt whose generation failed
    gets `error` and no texts after the failure."""
    convs = [as_messages(p) for _, p in prompts]
    plans = [principles_for(pid, constitution, mode, seed) for pid, _ in prompts]
    recs: list[dict] = [{"id": pid, "prompt": p, "initial": None, "rounds": []} for pid, p in prompts]
    step = 0

    def ask(live: list[int]) -> dict[int, str]:
        nonlocal step
        step += 1
        got = generate([convs[i] for i in live], seed * 1000 + step) if live else []
        out = {}
        for i, g in zip(live, got):
            if isinstance(g, Exception):
                recs[i]["error"] = str(g)
            else:
                out[i] = g
                convs[i] = convs[i] + [{"role": "assistant", "content": g}]
        return out

    live = list(range(len(prompts)))
    for i, g in ask(live).items():
        recs[i]["initial"] = g
    for r in range(max((len(p) for p in plans), default=0)):
        live = [i for i in range(len(prompts)) if "error" not in recs[i] and r < len(plans[i])]
        for i in live:
            pr = plans[i][r]
            recs[i]["rounds"].append({"principle": pr.name, "critique_request": pr.critique})
            convs[i] = convs[i] + [{"role": "user", "content": pr.critique}]
        for i, g in ask(live).items():
            recs[i]["rounds"][-1]["critique"] = g
        live = [i for i in live if "error" not in recs[i]]
        for i in live:
            pr = plans[i][r]
            recs[i]["rounds"][-1]["revision_request"] = pr.revision
            convs[i] = convs[i] + [{"role": "user", "content": pr.revision}]
        for i, g in ask(live).items():
            recs[i]["rounds"][-1]["revision"] = g
    for rec in recs:
        if "error" not in rec:
            rec["revision"] = rec["rounds"][-1]["revision"] if rec["rounds"] else rec["initial"]
    return recs


def outputs(rec: dict, identity: str, constitution: str) -> tuple[dict | None, dict | None, str]:
    """(SFT record or None, preference record or None, why a record was not written or '')."""
    rev, init = rec["revision"], rec["initial"]
    meta = {"principles": [r["principle"] for r in rec["rounds"]], "model": identity, "constitution": constitution,
            "initial": init, "id": rec["id"]}
    src = f"tether-cai:{identity}"
    if not rev.strip():
        return None, None, "empty revision"
    sft = {"prompt": rec["prompt"], "completion": rev, "id": f"cai/{rec['id']}", "source": src, "meta": meta}
    if rev.strip() == init.strip():
        return sft, None, "revision equals the initial answer"
    pair = {"prompt": rec["prompt"], "chosen": rev, "rejected": init, "id": f"cai/{rec['id']}", "source": src,
            "meta": {k: v for k, v in meta.items() if k != "initial"} | {"kind": "critique-revise"}}
    return sft, pair, ""


# -- Generators -----------------------------------------------------------------------------------------


class LocalGenerator:
    """A local HF chat model through tether.generate.Sampler (the model's chat template)."""

    def __init__(self, model_dir: str, device: str = "auto", max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 1.0,
                 batch_size: int = 8, max_prompt_length: int = 1024):
        from tether.generate import Sampler

        self.sampler = Sampler(model_dir, device, max_prompt_length)
        self.kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size)
        self.identity = f"hf:{Path(model_dir).resolve().name}"

    def __call__(self, convs: list[list[dict]], seed: int) -> list[str]:
        return [r[0] for r in self.sampler(convs, 1, seed=seed, **self.kw)]


def http_generator(url: str, cache: Path, max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 1.0, **kw):
    """An OpenAI-compatible endpoint: the HTTP judge's client, retries, concurrency and request cache, asking
    for text instead of one token's log-probabilities."""
    from tether.ai.http import HttpJudge, Malformed

    class HttpGenerator(HttpJudge):
        def request_body(self, conv: list[dict], seed: int) -> dict:
            return {"model": self.model_name, "messages": conv, "max_tokens": max_new_tokens, "temperature": temperature,
                    "top_p": top_p, "seed": seed}

        def _gen_one(self, arg) -> str | JudgeError:
            body = self.request_body(*arg)
            key = self.key(body)
            text = self.cache.get(key) if self.cache else None
            try:
                if text is None:
                    def call():
                        self._count("requests")
                        raw = self.client.chat.completions.with_raw_response.create(**body)
                        try:
                            content = json.loads(raw.http_response.text)["choices"][0]["message"]["content"]
                        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                            raise Malformed(f"malformed response ({type(e).__name__}: {str(e)[:80]})") from None
                        if not isinstance(content, str):
                            raise Malformed("malformed response (no message content)")
                        return content

                    text = self._retry(call)
                    if self.cache:
                        self.cache.put(key, text)
                else:
                    self._count("cached")
            except JudgeError as e:
                self._count("failed")
                return e
            return text

        def __call__(self, convs: list[list[dict]], seed: int) -> list[str | JudgeError]:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=max(1, self.concurrency))
            try:
                return list(pool.map(self._gen_one, [(c, seed) for c in convs]))
            finally:
                pool.shutdown(wait=False, cancel_futures=True)

    return HttpGenerator(url, cache=cache, **{k: v for k, v in kw.items() if k in HttpJudge.OPTIONS and k != "top_logprobs"})


# -- The command ----------------------------------------------------------------------------------------


def add_args(p) -> None:
    p.add_argument("--model", required=True, help="a local chat model folder, or an http(s):// OpenAI-compatible endpoint")
    p.add_argument("--prompts", required=True, help="prompts (any format `tether generate` reads: prompt or messages records)")
    p.add_argument("--out", required=True, help="output folder: trace.jsonl, sft.jsonl, pairs.jsonl, errors.jsonl")
    p.add_argument("--constitution", help="a constitution YAML (default: tether's helpfulness/harmlessness/honesty set)")
    p.add_argument("--principles", default="sample", help="sample (one per prompt, seeded; default), all (each in turn), or one principle's name")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=32, help="prompts per resumable chunk")
    p.add_argument("--limit", type=int, default=0, help="only the first N prompts (0 = all)")
    p.add_argument("--device", default="auto", help="local model: auto, cpu, cuda")
    p.add_argument("--batch-size", type=int, default=8, help="local model: conversations per generate call")
    p.add_argument("--max-prompt-length", type=int, default=1024, help="local model: a longer conversation keeps its last tokens")
    p.add_argument("--model-name", help="URL: the model to request (default: the endpoint's first /v1/models entry)")
    p.add_argument("--api-key", default=None, help="URL: the key (default: $OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=120.0, help="URL: seconds per request")
    p.add_argument("--retries", type=int, default=4)
    p.add_argument("--backoff", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--verbose", action="store_true", help="a traceback instead of the one-line error")


SETTINGS = ("model", "prompts", "constitution", "principles", "max_new_tokens", "temperature", "top_p", "seed", "chunk", "limit",
            "max_prompt_length", "model_name")


def _jsonl(path: Path, recs: list[dict]) -> None:
    from tether.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))


def run(a) -> int:
    from tether.ai.constitution import load_constitution
    from tether.atomic import atomic_write_text
    from tether.config import ConfigError
    from tether.data import load_prompts

    if a.chunk < 1:
        raise ConfigError(f"--chunk must be >= 1, got {a.chunk}")
    out = Path(a.out)
    constitution = load_constitution(a.constitution)
    if a.principles not in ("all", "sample"):
        constitution.get(a.principles)
    examples, _ = load_prompts(a.prompts)
    if a.limit:
        examples = examples[: a.limit]
    settings = {k: getattr(a, k) for k in SETTINGS} | {"constitution_principles": [p.name for p in constitution.principles]}
    sfile = out / "settings.json"
    if sfile.exists():
        old = json.loads(sfile.read_text())
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise ConfigError(f"{out} holds a run made with other settings ({', '.join(f'{k}: {old.get(k)!r} then, {settings[k]!r} now' for k in diff[:3])}); "
                              f"use another --out or delete it")
    ids, seen = [], set()
    for k, ex in enumerate(examples):
        pid = str(ex.meta.get("id") or f"p{k}")
        if pid in seen:
            pid = f"{pid}#{k}"
        seen.add(pid)
        ids.append(pid)
    if a.model.startswith(("http://", "https://")):
        try:
            gen = http_generator(a.model, out / "cache.jsonl", a.max_new_tokens, a.temperature, a.top_p, model_name=a.model_name,
                                 api_key=a.api_key, timeout=a.timeout, retries=a.retries, backoff=a.backoff, concurrency=a.concurrency)
        except JudgeError as e:  # the endpoint did not answer /v1/models
            raise ConfigError(f"--model {a.model}: {e}") from None
    else:
        gen = LocalGenerator(a.model, a.device, a.max_new_tokens, a.temperature, a.top_p, a.batch_size, a.max_prompt_length)
    if not sfile.exists():  # once the model has loaded: a mistyped --model leaves nothing behind to refuse the fix
        atomic_write_text(sfile, json.dumps(settings, indent=1) + "\n")
    t0, done_before, errors = time.monotonic(), 0, []
    try:
        for c, s in enumerate(range(0, len(examples), a.chunk)):
            path = out / "chunks" / f"chunk-{c:05d}.jsonl"
            if path.exists():
                done_before += 1
                continue
            batch = [(ids[k], examples[k].prompt) for k in range(s, min(s + a.chunk, len(examples)))]
            recs = critique_revise(batch, gen, constitution, a.principles, a.seed * 100003 + c)
            bad = [{"id": r["id"], "error": r["error"]} for r in recs if "error" in r]
            if bad:  # not written: a rerun retries this chunk (what did arrive is in the request cache)
                errors += bad
                continue
            _jsonl(path, recs)
            print(f"tether ai critique-revise: {min(s + a.chunk, len(examples))}/{len(examples)} prompts ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    finally:
        getattr(gen, "close", lambda: None)()
    trace: list[dict] = []
    for path in sorted((out / "chunks").glob("chunk-*.jsonl")) if (out / "chunks").exists() else []:
        trace += [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    sft, pairs, skipped = [], [], {}
    for rec in trace:
        s, p, why = outputs(rec, gen.identity, constitution.name)
        rec["written"] = {"sft": s is not None, "pair": p is not None, **({"skipped": why} if why else {})}
        sft += [s] if s else []
        pairs += [p] if p else []
        if why:
            skipped[why] = skipped.get(why, 0) + 1
    _jsonl(out / "trace.jsonl", trace)
    _jsonl(out / "sft.jsonl", sft)
    _jsonl(out / "pairs.jsonl", pairs)
    _jsonl(out / "errors.jsonl", errors)
    note = "".join(f", {n} {why}" for why, n in skipped.items())
    print(f"tether ai critique-revise: {len(trace)}/{len(examples)} prompts with {gen.identity} in {time.monotonic() - t0:.1f} s "
          f"({done_before} chunk(s) resumed): {len(sft)} SFT records, {len(pairs)} pairs{note}, {len(errors)} failed -> {out}", file=sys.stderr)
    if errors:
        print(f"tether ai critique-revise: {len(errors)} prompt(s) failed (reasons in {out / 'errors.jsonl'}); run again to retry them", file=sys.stderr)
        return 1
    return 0
