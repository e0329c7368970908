"""What each tether optimisation buys: one SFT / RM training step, and an RL iteration, with the optimisations
switched on one at a time.

    python -m benchmarks.ablate [--steps 8] [--rounds 3] [--threads 2] [--stages sft,rm,rl]

Batches are the fixed workload's first SFT examples (batch 8) and preference pairs (batch 8 pairs). Each
variant runs `steps` optimizer steps per round; rounds interleave the variants so that load from other
processes falls on all of them. Reported: median CPU seconds and wall seconds per step, and the ratio to
the plain baseline. "plain" = transformers' GELU, a padding mask, the LM head over every position, the
for-loop AdamW, padded batches: tether before these optimisations. The last rows are bf16 autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path


@contextlib.contextmanager
def variant(fused_adamw: bool, no_mask: bool, targets: bool, fused_gelu: bool, padding_free: bool = False, upcast: bool = True, last_layer: bool = True):
    import tether.engine.local as local
    import tether.models as models
    import tether.packing as packing

    saved = (local.make_optimizer, models.is_right_padded, models.fuse_activations, models._plain_head, packing._upcast, packing._last_block)
    if not fused_adamw:
        import torch

        def plain_opt(params, cfg):
            return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=False)

        local.make_optimizer = plain_opt
    if not no_mask:
        models.is_right_padded = lambda mask: False
    if not fused_gelu:
        models.fuse_activations = lambda m: m
    if not targets:
        models._plain_head = lambda m: False
    if not upcast:
        packing._upcast = lambda q, m: False
    if not last_layer:  # the last layer computes every position (no row restriction)
        packing._last_block = lambda body: None
    try:
        yield "on" if padding_free else "off"
    finally:
        local.make_optimizer, models.is_right_padded, models.fuse_activations, models._plain_head, packing._upcast, packing._last_block = saved


_NOW = dict(fused_adamw=True, no_mask=True, targets=True, fused_gelu=True)
VARIANTS = [
    ("plain (before)", dict(fused_adamw=False, no_mask=False, targets=False, fused_gelu=False), "fp32"),
    ("+ fused AdamW", dict(fused_adamw=True, no_mask=False, targets=False, fused_gelu=False), "fp32"),
    ("+ no padding mask", dict(fused_adamw=True, no_mask=True, targets=False, fused_gelu=False), "fp32"),
    ("+ LM head on targets only", dict(fused_adamw=True, no_mask=True, targets=True, fused_gelu=False), "fp32"),
    ("+ fused GELU", dict(_NOW), "fp32"),
    ("+ padding-free, shared prompt", dict(_NOW, padding_free=True, last_layer=False), "fp32"),
    ("+ last layer on read rows", dict(_NOW, padding_free=True), "fp32"),
    ("bf16 autocast, padded", dict(_NOW), "bf16"),
    ("bf16, padding-free, bf16 attn", dict(_NOW, padding_free=True, upcast=False), "bf16"),
    ("bf16, padding-free (= tether)", dict(_NOW, padding_free=True), "bf16"),
]


def _batches(d: Path, stage: str, n: int):
    from tether.config import DataConfig
    from tether.data import collate_pairs, collate_sft, load_preferences, load_sft, pad_id, tokenize_pairs, tokenize_sft
    from tether.models import load_tokenizer

    tok = load_tokenizer(d / "policy")
    cfg = DataConfig(max_length=128, max_prompt_length=64)
    pad = pad_id(tok)
    if stage == "sft":
        items = tokenize_sft(load_sft(str(d / "sft.jsonl"))[0][: 8 * n], tok, cfg)
        out = []
        for s in range(n):
            b = collate_sft(items[8 * s : 8 * s + 8], pad)
            b.loss_mask[:, 0] = 0
            out.append(b)
        return out
    items = tokenize_pairs(load_preferences(str(d / "prefs.jsonl"))[0][: 8 * n], tok, cfg)
    return [collate_pairs(items[8 * s : 8 * s + 8], pad) for s in range(n)]


def measure(stage: str, d: Path, kw: dict, precision: str, batches, threads: int) -> tuple[float, float]:
    import torch

    from tether.config import EngineConfig, OptimConfig
    from tether.engine.local import LocalEngine

    with variant(**kw) as padding_free:
        from tether import models

        if stage == "sft":
            from tether.algo.sft import _loss_fn

            model = models.load_causal_lm(d / "policy")
            fn = lambda b: _loss_fn(float(b.loss_mask.sum()))  # noqa: E731
        else:
            from tether.algo.rm import RMConfig, _loss_fn

            model = models.load_scalar_model(d / "reward")
            fn = lambda b: _loss_fn(float(len(b)), RMConfig())  # noqa: E731
        engine = LocalEngine(model, EngineConfig(device="cpu", precision=precision, threads=threads, padding_free=padding_free), OptimConfig(lr=1e-4), total_steps=100)
        engine.train_step(batches[0], fn(batches[0]))  # warm-up
        cpu, wall = [], []
        for b in batches:
            c, t = time.process_time(), time.perf_counter()
            engine.train_step(b, fn(b))
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - t)
        del engine, model
        torch.set_num_threads(threads)
    return statistics.median(cpu), statistics.median(wall)


RL_VARIANTS = [
    ("padded, old-policy pass", dict(padding_free="off", reuse_logprobs="off", own_loop=False, fuse_value_pass="off")),
    ("+ padding-free, shared prompts", dict(padding_free="on", reuse_logprobs="off", own_loop=False, fuse_value_pass="off")),
    ("+ sampler logprobs reused", dict(padding_free="on", reuse_logprobs="auto", own_loop=False, fuse_value_pass="off")),
    ("+ own decoding loop", dict(padding_free="on", reuse_logprobs="auto", own_loop=True, fuse_value_pass="off")),
    ("+ values from the critic's step (= tether)", dict(padding_free="on", reuse_logprobs="auto", own_loop=True, fuse_value_pass="auto")),
]
RL_PHASES = ("timing/rollout", "timing/score", "timing/forward", "timing/update")


def measure_rl(stage: str, d: Path, kw: dict, iterations: int, work: Path) -> dict[str, float]:
    """Seconds per RL iteration by phase (median over iterations after the first), fp32."""
    import dataclasses

    from benchmarks.rl_tether import run_rl
    from benchmarks.workload import Workload
    from tether.rollout.hf import HFRollout
    from tether.track import read_metrics

    kw = dict(kw)
    own = HFRollout._own_loop
    if not kw.pop("own_loop", True):  # transformers' model.generate instead of tether's decoding loop
        HFRollout._own_loop = lambda self: False
    out = Path(tempfile.mkdtemp(dir=work))
    try:
        run_rl(stage, dataclasses.replace(Workload(), rl_iterations=iterations), d, out, "fp32", **kw)
    finally:
        HFRollout._own_loop = own
    rows = read_metrics(out)[1:] or read_metrics(out)
    res = {k: statistics.median(r[k] for r in rows) for k in RL_PHASES}
    res["timing/iteration"] = statistics.median(r["timing/iteration"] for r in rows)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.ablate")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stages", default="sft,rm,rl", help="sft, rm (one training step per variant), rl (tether RLOO and PPO iterations)")
    p.add_argument("--rl-iterations", type=int, default=4)
    p.add_argument("--dir", default="")
    p.add_argument("--bf16", default="auto", choices=["auto", "on", "off"],
                   help="the bf16 variants (auto: only where the CPU has bf16 instructions; elsewhere torch emulates bf16, ~100x slower)")
    args = p.parse_args(argv)
    import torch
    import transformers

    from benchmarks.workload import Workload, build

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    d = Path(args.dir or Path(tempfile.gettempdir()) / "tether-bench-workload")
    build(d, Workload())
    from tether.models import cpu_has_bf16

    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and cpu_has_bf16())
    if not bf16:
        print("bf16 variants skipped" + (": this CPU has no bf16 instructions (--bf16 on runs them anyway)" if args.bf16 == "auto" else ""), file=sys.stderr)
    results: dict = {}
    stages = args.stages.split(",")
    rl: dict = {}
    if "rl" in stages:
        work = Path(tempfile.mkdtemp(prefix="tether-ablate-"))
        for rnd in range(args.rounds):
            for algo in ("rloo", "ppo"):
                for name, kw in RL_VARIANTS if rnd % 2 == 0 else RL_VARIANTS[::-1]:
                    if algo != "ppo" and name.startswith("+ values"):  # no critic
                        continue
                    r = measure_rl(algo, d, kw, args.rl_iterations, work)
                    rl.setdefault((algo, name), []).append(r)
                    print(f"  rl {algo} round {rnd} {name}: {r['timing/iteration']:.3f}s per iteration", file=sys.stderr, flush=True)
    for stage in [s for s in stages if s != "rl"]:
        batches = _batches(d, stage, args.steps)
        for rnd in range(args.rounds):
            order = VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]
            for name, kw, prec in order:
                if stage == "rm" and name.startswith("+ LM head"):  # a reward model has no LM head
                    continue
                if prec == "bf16" and not bf16:
                    continue
                c, w = measure(stage, d, kw, prec, batches, args.threads)
                results.setdefault((stage, name), []).append((c, w))
                print(f"  {stage} round {rnd} {name}: cpu {c:.3f}s wall {w:.3f}s per step", file=sys.stderr, flush=True)
    print(f"\nper training step, median over {args.rounds} interleaved rounds x {args.steps} steps, {args.threads} threads")
    print(f"{'stage':5s}  {'variant':32s}  {'CPU s/step':>10s}  {'vs plain':>8s}  {'wall s/step':>11s}  {'vs plain':>8s}")
    for stage in [s for s in stages if s != "rl"]:
        base = None
        for name, _kw, _p in VARIANTS:
            rs = results.get((stage, name))
            if not rs:
                continue
            c = statistics.median(x[0] for x in rs)
            w = statistics.median(x[1] for x in rs)
            base = base or (c, w)
            print(f"{stage:5s}  {name:32s}  {c:10.3f}  {base[0] / c:7.2f}x  {w:11.3f}  {base[1] / w:7.2f}x")
    if rl:
        print(f"\nRL iteration (16 prompts x 4 samples, 32 new tokens, fp32), median seconds over {args.rounds} rounds x "
              f"{args.rl_iterations - 1} iterations (the first is warm-up)")
        print(f"{'algo':5s}  {'variant':42s}  {'iteration':>9s}  {'vs padded':>9s}  {'rollout':>7s}  {'score':>6s}  {'forward':>7s}  {'update':>6s}")
        for algo in ("rloo", "ppo"):
            base = None
            for name, _kw in RL_VARIANTS:
                rs = rl.get((algo, name))
                if not rs:
                    continue
                med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                base = base or med["timing/iteration"]
                print(f"{algo:5s}  {name:42s}  {med['timing/iteration']:9.3f}  {base / med['timing/iteration']:8.2f}x  "
                      + "  ".join(f"{med[k]:{w}.3f}" for k, w in zip(RL_PHASES, (7, 6, 7, 6))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
