"""The controlled-sentiment RLHF experiment, end to end on a CPU (Ziegler et al. 2019; the IMDb
experiment of Rafailov et al. 2023, figure 2), on the real movie-review corpus and offline.

    tether demo                          # pretrain (cached) -> SFT -> feedback -> RM -> PPO / DPO / best-of-N -> eval -> report
    tether demo --quick                  # a tiny version (the tests run it)
    tether demo --base-model DIR         # the same experiment on any local HF causal LM (no pretraining)
    tether demo --from ppo               # reuse the finished stages before `ppo`, rerun the rest
    tether demo key=value ...            # any DemoConfig key, e.g. ppo.max_steps=60 annotators.rationality=4

Stages (each writes its own folder under --out, with its resolved config):
  pretrain  `tether pretrain`: BPE tokenizer + a small GPT-2 on the reviews (cached in ~/.cache/tether)
  sft       prompts = the first 2-8 words of a review, completions = the rest of its first sentence
  sample    K responses per training prompt from the SFT model
  annotate  simulated annotators (Bradley-Terry on VADER sentiment, with noise and contrarians) compare
            them -> ordinary preference records, the schema the feedback app exports
  rm        reward model on those pairs; accuracy against the gold judge on held-out prompts
  ppo       PPO against the reward model (checkpoints along the way)
  dpo       DPO on the same pairs (checkpoints along the way)
  bon       best-of-N sampling from the SFT model, ranked by the reward model, N = 1 .. 16
  eval      every policy on held-out prompts: gold reward, win rate against SFT, KL to SFT, length
  report    report.md + PNG plots (reward-KL frontier, proxy vs gold, training curves, samples)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.algo.pretrain import PretrainConfig
from tether.data.corpora import is_held_out, read_reviews
from tether.config import ConfigError, TrackConfig, check, doc, flat_keys, load_config, save_config, sub
from tether.demo.io import read_jsonl, write_json, write_jsonl
from tether.judges.annotators import AnnotatorConfig

STAGES = ("pretrain", "sft", "sample", "annotate", "rm", "ppo", "dpo", "bon", "eval", "report")
RESULTS_FILE = "results.json"


# The demo's settings of each stage, in `tether <stage>` keys (`tether demo ppo.kl.coef=0.1` overrides one).
# The demo wires the rest: model, out, seed, data files and lengths, engine, reward model, checkpoints. RM
# and DPO give `epochs`; the demo turns them into max_steps = ceil(epochs x pairs / batch_size).
STAGE_SETTINGS: dict[str, dict] = {
    "sft": {"max_steps": 120, "batch_size": 32, "eval_batch_size": 64, "optim": {"lr": 5e-4, "warmup_steps": 10, "schedule": "cosine"},
            "data": {"eval_fraction": 0.02}, "track": {"progress": True}},
    "rm": {"epochs": 1.5, "batch_size": 32, "eval_batch_size": 128,  # lr chosen on held-out labels, see benchmarks/README.md
           "optim": {"lr": 8e-4, "warmup_steps": 5, "schedule": "cosine", "weight_decay": 0.0}},
    "ppo": {"max_steps": 40, "batch_size": 64, "optim": {"lr": 1e-4, "schedule": "constant"}, "kl": {"coef": 0.05},
            "rollout": {"temperature": 1.0, "top_k": 0, "top_p": 1.0}, "ppo": {"epochs": 2, "minibatch_size": 32, "rollback": False}},
    "dpo": {"epochs": 0.6, "batch_size": 32, "eval_batch_size": 128, "beta": 0.1, "optim": {"lr": 3e-4, "warmup_steps": 5, "schedule": "cosine"}},
}


def _merge(base: dict, over: dict) -> dict:
    """`over`'s keys on top of `base`'s, section by section."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _settings(stage: str) -> str:
    return " ".join(f"{k}={v}" for k, v in flat_keys(STAGE_SETTINGS[stage]).items())


@dataclass(frozen=True)
class DemoConfig:
    out: str = doc("runs/demo", "run folder: one sub-folder per stage, report.md, results.json, plots/")
    seed: int = doc(0, "random seed of every stage")
    base_model: str = doc("", "a local HF causal LM to start from instead of pretraining (e.g. an imported SmolLM2)")
    threads: int = doc(0, "torch CPU threads (0 = torch's default: the number of cores)")
    precision: str = doc("auto", "fp32, bf16 (autocast, fp32 master weights) or auto: bf16 where the CPU has bf16 instructions (AVX512-BF16/AMX), else fp32 (torch emulates bf16 without them, far slower); the figures differ a little (README)")
    corpora: tuple[str, ...] = doc(("movie_reviews", "sentence_polarity"), "review corpora for prompts (and pretraining)")
    prompt_words: tuple[int, int] = doc((2, 8), "a prompt is the first n words of a review, n uniform in this range")
    completion_words: int = doc(14, "SFT completions: the rest of the review's first sentence, at most this many words")
    max_new_tokens: int = doc(24, "tokens sampled per response in every stage")
    n_sft: int = doc(0, "SFT examples (0 = every training review)")
    n_feedback_prompts: int = doc(1500, "training prompts sent for feedback (and used by PPO)")
    samples_per_prompt: int = doc(6, "responses sampled per feedback prompt; all pairs of them are compared")
    rm_eval_fraction: float = doc(0.1, "share of feedback prompts whose pairs are held out from RM/DPO training")
    n_eval_prompts: int = doc(400, "held-out prompts (from reviews never trained on) for the final evaluation")
    eval_batch_size: int = doc(200, "sequences per generation / scoring batch")
    rm_evals: int = doc(8, "held-out evaluations during RM training; the weights with the best held-out accuracy on the annotators' labels are kept (0 = keep the last)")
    ppo_checkpoints: int = doc(5, "PPO checkpoints evaluated along the way (for the frontier and proxy-vs-gold plots)")
    dpo_checkpoints: int = doc(4, "DPO checkpoints evaluated along the way")
    sft: dict = doc({}, "the SFT stage: keys of `tether sft --help`, over the demo's " + _settings("sft"))
    rm: dict = doc({}, "the reward-model stage: keys of `tether rm --help`, over the demo's " + _settings("rm"))
    ppo: dict = doc({}, "the PPO stage: keys of `tether ppo --help`, over the demo's " + _settings("ppo"))
    dpo: dict = doc({}, "the DPO stage: keys of `tether dpo --help`, over the demo's " + _settings("dpo"))
    bon_n: tuple[int, ...] = doc((1, 2, 4, 8, 16), "best-of-N sizes (samples from the SFT model, ranked by the RM)")
    n_sample_rows: int = doc(8, "prompts in the report's sample table")
    pretrain: PretrainConfig = sub(PretrainConfig, "phase 0 (`tether pretrain`), skipped with base_model")
    track: TrackConfig = sub(TrackConfig, "trackers for the training stages and the report (its plots as images, results and samples as tables); MLflow's store defaults to <out>/mlflow.db for all of them")
    annotators: AnnotatorConfig = sub(AnnotatorConfig, "the simulated annotators")

    @property
    def resolved_precision(self) -> str:
        """fp32 or bf16: what `auto` means on this machine."""
        if self.precision != "auto":
            return self.precision
        from tether.models import cpu_has_bf16

        return "bf16" if cpu_has_bf16() else "fp32"

    @property
    def precision_note(self) -> str:
        """Which precision runs, and why: the figures differ a little between the two (README quotes both)."""
        if self.precision != "auto":
            return f"{self.precision} (precision={self.precision})"
        import torch

        cap = torch.backends.cpu.get_cpu_capability()
        if self.resolved_precision == "bf16":
            return f"bf16 autocast, fp32 master weights (precision=auto: this CPU ({cap}) has bf16 instructions; precision=fp32 for float32)"
        return f"fp32 (precision=auto: this CPU ({cap}) has no bf16 instructions, torch would emulate bf16 ~100x slower)"

    def validate(self, p: str = "") -> None:
        lo, hi = self.prompt_words
        check(1 <= lo <= hi, f"{p}prompt_words", "must be (min, max) with 1 <= min <= max")
        check(self.precision in ("auto", "fp32", "bf16"), f"{p}precision", "must be auto, fp32 or bf16")
        check(self.samples_per_prompt >= 2, f"{p}samples_per_prompt", "must be >= 2 (pairs are compared)")
        check(0 < self.rm_eval_fraction < 1, f"{p}rm_eval_fraction", "must be in (0, 1)")
        check(len(self.bon_n) > 0 and min(self.bon_n) >= 1, f"{p}bon_n", "must be positive integers")
        check(self.n_eval_prompts > 0, f"{p}n_eval_prompts", "must be positive")
        for name in ("sft", "rm", "ppo", "dpo"):  # a typo in a stage's keys fails now, not after pretraining
            stage_config(self, name, {"model": "<wired>", "out": "<wired>", "data": {"train": "<wired>"}} | (
                {"reward": {"model": "<wired>"}} if name == "ppo" else {}))


def stage_config(cfg: DemoConfig, name: str, wired: dict, n_train: int = 0, per_run=lambda steps: {}):
    """`tether <name>`'s config in this demo: the wiring, under the demo's settings, under the user's
    `<name>.` keys (the user's win, as in the pipeline). n_train turns `epochs` into max_steps where none is
    set; per_run(steps) is the wiring that depends on the steps (checkpoints, evaluations)."""
    from tether.algo.pipeline import STAGES as CLASSES
    from tether.config import _build

    module, cls = CLASSES[name]
    cls = getattr(importlib.import_module(module), cls)
    mine = getattr(cfg, name)
    if not isinstance(mine, dict):
        raise ConfigError(f"config key '{name}': is a stage section; set its keys, e.g. {name}.max_steps=...")
    if name == "ppo" and isinstance(mine.get("reward"), dict) and mine["reward"].get("fn"):
        wired = {**wired, "reward": {}}  # the user's reward function instead of the demo's reward model
    wired = _merge(wired, {"seed": cfg.seed, "engine": {"device": "cpu", "threads": cfg.threads, "precision": cfg.resolved_precision},
                           "track": _stage_track(cfg)})

    def build(extra: dict):
        return _build(cls, _merge(_merge(_merge(wired, extra), STAGE_SETTINGS[name]), mine), f"{name}.")

    c = build({})
    steps = c.max_steps or max(1, math.ceil(c.epochs * max(n_train, 1) / c.batch_size))
    return build({"max_steps": steps} | per_run(steps))


def _stage_track(cfg: DemoConfig) -> dict:
    """The demo's trackers, for a stage: one MLflow store for the whole demo unless track.mlflow_uri names one."""
    from tether.config import to_dict

    t, default = to_dict(cfg.track), to_dict(TrackConfig())
    if t["mlflow"] and not t["mlflow_uri"]:
        t["mlflow_uri"] = f"sqlite:///{(Path(cfg.out) / 'mlflow.db').resolve()}"
    return {k: v for k, v in t.items() if v != default[k]}  # the stage's own keys (progress ...) stay its own


# The tiny version the tests run: every stage, a few steps each.
QUICK = [
    "pretrain.max_steps=40", "pretrain.n_layer=2", "pretrain.n_embd=64", "pretrain.n_head=2", "pretrain.vocab_size=1024",
    "pretrain.batch_size=16", "pretrain.corpora=sentence_polarity", "corpora=sentence_polarity",
    "n_sft=400", "sft.max_steps=10", "n_feedback_prompts=48", "samples_per_prompt=3", "n_eval_prompts=24",
    "max_new_tokens=12", "ppo.max_steps=4", "ppo.batch_size=8", "ppo.ppo.minibatch_size=8", "ppo.ppo.epochs=1", "ppo_checkpoints=2",
    "dpo_checkpoints=2", "bon_n=[1,2,4]", "n_sample_rows=3", "annotators.pool_size=6",
]


# ----------------------------------------------------------------------------------------------
# Small helpers


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _console():
    from tether.track import console

    return console


# ----------------------------------------------------------------------------------------------
# Data: prompts and SFT examples from the reviews


def build_data(cfg: DemoConfig, out: Path) -> dict:
    """SFT examples and feedback prompts from training reviews; eval prompts from held-out reviews."""
    rng = random.Random(cfg.seed)
    holdout = cfg.pretrain.holdout
    train, held = [], []
    for name in cfg.corpora:
        for r in read_reviews(name):
            (held if is_held_out(r.id, holdout) else train).append(r)
    lo, hi = cfg.prompt_words

    def split(review, n_min_rest: int):
        words = review.lines[0].split()
        k = rng.randint(lo, hi)
        k = min(k, max(1, len(words) - n_min_rest))
        if len(words) - k < n_min_rest:
            return None
        return " ".join(words[:k]), " " + " ".join(words[k : k + cfg.completion_words])

    sft_rows = []
    for r in train:
        pc = split(r, 3)
        if pc:
            sft_rows.append({"prompt": pc[0], "completion": pc[1], "id": r.id})
    rng.shuffle(sft_rows)
    if cfg.n_sft:
        sft_rows = sft_rows[: cfg.n_sft]
    order = list(range(len(train)))
    rng.shuffle(order)
    fb = []
    for i in order:
        pc = split(train[i], 3)
        if pc:
            fb.append({"prompt": pc[0], "id": train[i].id})
        if len(fb) >= cfg.n_feedback_prompts:
            break
    held_order = list(range(len(held)))
    rng.shuffle(held_order)
    ev = []
    for i in held_order:
        pc = split(held[i], 3)
        if pc:
            ev.append({"prompt": pc[0], "id": held[i].id, "reference": pc[1].strip()})
        if len(ev) >= cfg.n_eval_prompts:
            break
    if len(ev) < cfg.n_eval_prompts:
        _console().print(f"[yellow]demo: only {len(ev)} held-out prompts available (asked for {cfg.n_eval_prompts})[/yellow]")
    write_jsonl(out / "sft.jsonl", sft_rows)
    write_jsonl(out / "prompts_feedback.jsonl", fb)
    write_jsonl(out / "prompts_eval.jsonl", ev)
    stats = {"train_reviews": len(train), "held_out_reviews": len(held), "sft_examples": len(sft_rows),
             "feedback_prompts": len(fb), "eval_prompts": len(ev)}
    write_json(out / "data.json", stats)
    return stats


# ----------------------------------------------------------------------------------------------
# Sampling and scoring with in-memory models


class Models:
    """Tokenizer, the SFT model (reference) and the reward model, loaded once for sampling and eval."""

    def __init__(self, cfg: DemoConfig, sft_dir: str, rm_dir: str | None = None):
        from tether.models import load_causal_lm, load_tokenizer

        self.cfg = cfg
        self.tok = load_tokenizer(sft_dir)
        self.sft_dir = sft_dir
        self.sft = load_causal_lm(sft_dir).eval()
        self.rm = None
        self.rm_stats = {"mean": 0.0, "std": 1.0}
        if rm_dir:
            self.load_rm(rm_dir)

    def load_rm(self, rm_dir: str) -> None:
        from tether.data import pad_id
        from tether.models import load_reward_stats, load_scalar_model

        self.rm = load_scalar_model(rm_dir, pad_token_id=pad_id(self.tok)).eval()
        self.rm_stats = load_reward_stats(rm_dir)

    def autocast(self):
        import contextlib

        import torch

        return torch.autocast("cpu", dtype=torch.bfloat16) if self.cfg.resolved_precision == "bf16" else contextlib.nullcontext()

    def encode(self, prompts: list[str]) -> list[list[int]]:
        from tether.data import encode_prompt

        return [encode_prompt(self.tok, p) for p in prompts]

    def generate(self, model, prompts: list[str], k: int = 1, seed: int = 0, want_logprobs: bool = False) -> dict:
        """k samples per prompt (T=1, no truncation: the policy's own distribution).

        Returns responses [n*k], token lengths, RM scores (raw), and with want_logprobs the summed
        logprobs under `model` and under the SFT model (for KL(model || sft) = E[sum log ratio]).
        """
        import torch

        from tether.data import collate_prompts, pad_id
        from tether.models import as_trained, causal_logprobs, sequence_scores
        from tether.rollout.base import SamplingConfig
        from tether.rollout.hf import HFRollout

        torch.manual_seed(seed)
        sampling = SamplingConfig(max_new_tokens=self.cfg.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0)
        rollout = HFRollout(model, self.tok, "cpu", torch.bfloat16 if self.cfg.resolved_precision == "bf16" else None)
        ids = self.encode(prompts)
        rows = [(i, j) for i in range(len(prompts)) for j in range(k)]
        pad = pad_id(self.tok)
        out: dict[str, list] = {"responses": [], "lengths": [], "finished": [], "proxy": [], "logp": [], "logp_sft": []}
        bs = self.cfg.eval_batch_size
        # Similar prompt lengths in a batch: less left padding.
        rows.sort(key=lambda r: len(ids[r[0]]))
        order = []
        for s in range(0, len(rows), bs):
            chunk = rows[s : s + bs]
            order += chunk
            batch = collate_prompts([ids[i] for i, _ in chunk], pad, [prompts[i] for i, _ in chunk])
            ro = rollout.generate(batch, sampling)
            R = ro.response_mask.shape[1]
            out["responses"] += ro.responses
            out["lengths"] += ro.response_mask.sum(-1).tolist()
            out["finished"] += ro.finished.tolist() if ro.finished is not None else [False] * len(chunk)
            with torch.no_grad(), self.autocast():
                if self.rm is not None:
                    out["proxy"] += sequence_scores(self.rm, *as_trained(ro.sequences, ro.attention_mask, ro.finished, self.tok.eos_token_id, pad)).float().tolist()
                if want_logprobs:
                    out["logp"] += (ro.logprobs * ro.response_mask).sum(-1).tolist()
                    if model is self.sft:
                        out["logp_sft"] += (ro.logprobs * ro.response_mask).sum(-1).tolist()
                    else:
                        lp, _ = causal_logprobs(self.sft, ro.sequences, ro.attention_mask, num_response=R)
                        out["logp_sft"] += (lp.float() * ro.response_mask).sum(-1).tolist()
        # back to (prompt, sample) order
        pos = {r: n for n, r in enumerate(order)}
        perm = [pos[r] for r in sorted(order)]
        return {key: [v[n] for n in perm] if v else [] for key, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Stages


class Demo:
    def __init__(self, cfg: DemoConfig, start_from: str = "pretrain"):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.start_from = start_from
        self.timings: dict[str, dict] = {}
        self.t0 = time.perf_counter()
        self.c0 = _cpu_seconds()
        self.n_stages = len(STAGES)
        self.state: dict[str, Any] = {}

    def d(self, stage: str) -> Path:
        return self.out / stage

    # each stage: reuse when before --from and finished; else (re)run
    def run_stage(self, i: int, name: str, fn) -> Any:
        console = _console()
        done_file = self.d(name) / "stage.json"
        reuse = STAGES.index(name) < STAGES.index(self.start_from) and done_file.exists()
        console.rule(f"[bold]stage {i}/{self.n_stages}: {name}[/bold]" + (" (reused)" if reuse else ""))
        if reuse:
            info = json.loads(done_file.read_text())
            self.timings[name] = {**info.get("timing", {}), "reused": True}
            return info.get("result")
        if self.d(name).exists() and name != "pretrain":
            shutil.rmtree(self.d(name))
        self.d(name).mkdir(parents=True, exist_ok=True)
        t, c = time.perf_counter(), _cpu_seconds()
        result = fn()
        timing = {"wall_s": round(time.perf_counter() - t, 1), "cpu_s": round(_cpu_seconds() - c, 1), "peak_rss_mb": round(peak_rss_mb())}
        self.timings[name] = timing
        write_json(done_file, {"stage": name, "timing": timing, "result": result})
        console.print(f"[green]{name}[/green] done in {timing['wall_s']:.1f}s wall ({timing['cpu_s']:.1f}s CPU), peak memory {timing['peak_rss_mb']} MB", highlight=False)
        return result

    # -- stages -------------------------------------------------------------------------------
    def pretrain(self) -> dict:
        from tether.algo.pretrain import train as pretrain_train

        if self.cfg.base_model:
            write_json(self.d("pretrain") / "skipped.json", {"base_model": self.cfg.base_model})
            return {"model": str(Path(self.cfg.base_model).resolve()), "skipped": True}
        pcfg = dataclasses.replace(self.cfg.pretrain, seed=self.cfg.seed, engine=self._engine(self.cfg.pretrain.engine))
        save_config(pcfg, self.d("pretrain") / "config.json")
        res = pretrain_train(pcfg)
        write_json(self.d("pretrain") / "summary.json", res)
        return res

    def _data(self, model_dir: str, **kw) -> dict:
        """Data settings that fit the model's context: prompt <= 32 tokens, prompt+response <= 96 or n_positions."""
        mc = json.loads((Path(model_dir) / "config.json").read_text())
        ctx = mc.get("n_positions") or mc.get("max_position_embeddings") or 96
        return {"max_length": min(96, ctx), "max_prompt_length": min(32, ctx // 2), **kw}

    def _engine(self, e):
        return dataclasses.replace(e, device="cpu", threads=self.cfg.threads, precision=self.cfg.resolved_precision)

    def sft(self, base: str) -> dict:
        from tether.algo.sft import train

        data = build_data(self.cfg, self.out / "data")
        c = stage_config(self.cfg, "sft", {"model": base, "out": str(self.d("sft")), "data": self._data(base, train=str(self.out / "data" / "sft.jsonl"))})
        summary = train(c)
        return {"model": str(self.d("sft") / "final"), "data": data, **summary}

    def sample(self, sft_dir: str) -> dict:
        m = Models(self.cfg, sft_dir)
        prompts = [r["prompt"] for r in read_jsonl(self.out / "data" / "prompts_feedback.jsonl")]
        k = self.cfg.samples_per_prompt
        t = time.perf_counter()
        res = m.generate(m.sft, prompts, k=k, seed=self.cfg.seed + 1)
        rows = [{"prompt": p, "responses": res["responses"][i * k : (i + 1) * k]} for i, p in enumerate(prompts)]
        write_jsonl(self.d("sample") / "samples.jsonl", rows)
        n = len(res["responses"])
        _console().print(f"sample: {n} responses for {len(prompts)} prompts in {time.perf_counter() - t:.1f}s "
                         f"(mean {sum(res['lengths']) / max(n, 1):.1f} tokens)", highlight=False)
        return {"responses": n, "prompts": len(prompts)}

    def annotate(self) -> dict:
        from tether.judges import get_judge
        from tether.judges.annotators import annotate

        rows = read_jsonl(self.d("sample") / "samples.jsonl")
        acfg = dataclasses.replace(self.cfg.annotators, seed=self.cfg.seed)
        save_config(acfg, self.d("annotate") / "config.json")
        n_eval = max(1, int(round(len(rows) * self.cfg.rm_eval_fraction)))
        parts = {"train": rows[n_eval:], "eval": rows[:n_eval]}
        stats = {}
        for split, rs in parts.items():
            records, st = annotate([r["prompt"] for r in rs], [r["responses"] for r in rs], get_judge("vader"), acfg,
                                   source="tether-demo:simulated-annotators", id_prefix=f"demo-{split}")
            write_jsonl(self.d("annotate") / f"preferences_{split}.jsonl", records)
            stats[split] = st
        write_json(self.d("annotate") / "annotators.json", stats)
        s = stats["train"]
        _console().print(
            f"annotate: {s['records']} train / {stats['eval']['records']} held-out preference records from {s['pairs']} pairs "
            f"({s['gold_ties']} gold ties, {s['vote_ties']} tied votes); inter-annotator agreement {s['inter_annotator_agreement']:.3f}, "
            f"labels agree with gold {s['label_gold_agreement']:.3f} (model predicts {s['expected_label_gold_agreement']:.3f})",
            highlight=False,
        )
        return stats

    def _pairs(self, sft_dir: str) -> tuple[dict, int]:
        d = self.d("annotate")
        data = self._data(sft_dir, train=str(d / "preferences_train.jsonl"), eval=str(d / "preferences_eval.jsonl"))
        return data, len(read_jsonl(d / "preferences_train.jsonl"))

    def rm(self, sft_dir: str) -> dict:
        from tether.algo.rm import train

        data, n_train = self._pairs(sft_dir)
        evals = self.cfg.rm_evals
        c = stage_config(self.cfg, "rm", {"model": sft_dir, "out": str(self.d("rm")), "data": data}, n_train,
                         lambda steps: {"eval_every": max(1, steps // evals) if evals else 0, "keep_best": evals > 0})
        summary = train(c)
        return {"model": str(self.d("rm") / "final"), **summary}

    def ppo(self, sft_dir: str, rm_dir: str) -> dict:
        from tether.algo.ppo import train

        wired = {"model": sft_dir, "out": str(self.d("ppo")), "data": self._data(sft_dir, train=str(self.out / "data" / "prompts_feedback.jsonl")),
                 "reward": {"model": rm_dir}, "rollout": {"max_new_tokens": self.cfg.max_new_tokens}, "keep_checkpoints": 1000}
        c = stage_config(self.cfg, "ppo", wired, per_run=lambda steps: {
            "save_every": max(1, steps // self.cfg.ppo_checkpoints), "sample_every": max(1, steps // 4)})
        summary = train(c)
        return {"model": str(self.d("ppo") / "final"), **summary}

    def dpo(self, sft_dir: str) -> dict:
        try:
            from tether.algo.dpo import train
        except ImportError as e:
            _console().print(f"[yellow]dpo: skipped, tether.algo.dpo is not available ({e})[/yellow]")
            return {"skipped": True}
        data, n_train = self._pairs(sft_dir)
        c = stage_config(self.cfg, "dpo", {"model": sft_dir, "out": str(self.d("dpo")), "data": data, "keep_checkpoints": 1000}, n_train,
                         lambda steps: {"save_every": max(1, steps // self.cfg.dpo_checkpoints)})
        summary = train(c)
        return {"model": str(self.d("dpo") / "final"), **summary}

    def bon(self, m: Models) -> dict:
        """Best-of-N from the SFT model on the eval prompts, ranked by the RM; KL = log N - (N-1)/N."""
        prompts = [r["prompt"] for r in read_jsonl(self.out / "data" / "prompts_eval.jsonl")]
        n_max = max(self.cfg.bon_n)
        res = m.generate(m.sft, prompts, k=n_max, seed=self.cfg.seed + 7)
        from tether.judges import get_judge

        gold = get_judge("vader")([p for p in prompts for _ in range(n_max)], res["responses"])
        rows = []
        for i, p in enumerate(prompts):
            sl = slice(i * n_max, (i + 1) * n_max)
            rows.append({"prompt": p, "responses": res["responses"][sl], "proxy": res["proxy"][sl], "gold": gold[sl], "lengths": res["lengths"][sl]})
        write_jsonl(self.d("bon") / "samples.jsonl", rows)
        return {"prompts": len(prompts), "n_max": n_max}

    # -- the full run -------------------------------------------------------------------------
    def run(self) -> dict:
        from tether.checkpoint import seed_everything

        if self.cfg.threads:
            import torch

            torch.set_num_threads(self.cfg.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out / "config.json")
        seed_everything(self.cfg.seed)
        _console().print(f"tether demo: precision {self.cfg.precision_note}", highlight=False)
        pre = self.run_stage(1, "pretrain", self.pretrain)
        base = pre["model"]
        sft = self.run_stage(2, "sft", lambda: self.sft(base))
        sft_dir = sft["model"]
        self.run_stage(3, "sample", lambda: self.sample(sft_dir))
        self.run_stage(4, "annotate", self.annotate)
        rm = self.run_stage(5, "rm", lambda: self.rm(sft_dir))
        rm_dir = rm["model"]
        self.run_stage(6, "ppo", lambda: self.ppo(sft_dir, rm_dir))
        self.run_stage(7, "dpo", lambda: self.dpo(sft_dir))
        models: dict[str, Models] = {}

        def get_models() -> Models:
            if "m" not in models:
                models["m"] = Models(self.cfg, sft_dir, rm_dir)
            return models["m"]

        self.run_stage(8, "bon", lambda: self.bon(get_models()))
        from tether.demo.report import evaluate, write_report

        self.run_stage(9, "eval", lambda: evaluate(self, get_models()))
        # total: this process plus the stages reused from an earlier run (--from), so that it is the cost of the whole run
        reused = [t for t in self.timings.values() if t.get("reused")]
        self.timings["total"] = {
            "wall_s": round(time.perf_counter() - self.t0 + sum(t.get("wall_s", 0.0) for t in reused), 1),
            "cpu_s": round(_cpu_seconds() - self.c0 + sum(t.get("cpu_s", 0.0) for t in reused), 1),
            "peak_rss_mb": round(max([peak_rss_mb()] + [t.get("peak_rss_mb", 0) for t in reused])),
        }
        report = self.run_stage(10, "report", lambda: write_report(self))
        return report


# ----------------------------------------------------------------------------------------------
# CLI


def parse(argv: list[str]) -> tuple[DemoConfig, str]:
    from tether.config import config_help

    parser = argparse.ArgumentParser(
        prog="tether demo", description=__doc__.strip().splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2] + "\nconfig keys (key=value):\n" + "\n".join(config_help(DemoConfig)),
    )
    parser.add_argument("--quick", action="store_true", help="a tiny version of every stage (what the tests run)")
    parser.add_argument("--base-model", help="a local HF causal LM folder; skips pretraining")
    parser.add_argument("--out", help="run folder (default runs/demo, runs/demo-quick with --quick)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    parser.add_argument("--from", dest="start_from", choices=STAGES, default="pretrain", help="reuse the finished stages before this one")
    parser.add_argument("--config", "-c", help="YAML file of DemoConfig keys")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of DemoConfig (see below)")
    a = parser.parse_args(argv)
    overrides = (QUICK if a.quick else []) + list(a.overrides)
    if a.quick and not a.out:
        overrides.append("out=runs/demo-quick")
    for key, val in (("base_model", a.base_model), ("out", a.out), ("seed", a.seed), ("threads", a.threads)):
        if val is not None:
            overrides.append(f"{key}={val}")
    return load_config(DemoConfig, a.config, overrides), a.start_from


def main(argv: list[str]) -> int:
    if argv[:1] == ["honesty"]:  # `tether demo honesty`: the sycophancy experiment on a real chat model
        from tether.demo.honesty import main as honesty

        return honesty(argv[1:])
    try:
        cfg, start_from = parse(argv)
    except ConfigError as e:
        print(f"tether demo: {e}", file=sys.stderr)
        return 2
    from tether.data import DataError

    try:
        report = Demo(cfg, start_from).run()
    except (ConfigError, DataError) as e:
        print(f"tether demo: {e}", file=sys.stderr)
        return 2
    console = _console()
    console.rule("[bold]results[/bold]")
    print(report["table"])
    print()
    print(report["timing_table"])
    print(f"\nprecision: {cfg.precision_note}")
    print(f"report: {report['path']}")
    return 0
