"""What each tether optimisation buys: one SFT / RM training step with the optimisations switched on one at a time.

    python -m benchmarks.ablate [--steps 8] [--rounds 3] [--threads 2]

Batches are the fixed workload's first SFT examples (batch 8) and preference pairs (batch 8 pairs). Each
variant runs `steps` optimizer steps per round; rounds interleave the variants so that load from other
processes falls on all of them. Reported: median CPU seconds and wall seconds per step, and the ratio to
the plain baseline. "plain" = transformers' GELU, a padding mask, the LM head over every position, the
for-loop AdamW: tether before these optimisations.
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
def variant(fused_adamw: bool, no_mask: bool, targets: bool, fused_gelu: bool):
    import tether.engine.local as local
    import tether.models as models

    saved = (local.make_optimizer, models.is_right_padded, models.fuse_activations, models._plain_head)
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
    try:
        yield
    finally:
        local.make_optimizer, models.is_right_padded, models.fuse_activations, models._plain_head = saved


VARIANTS = [
    ("plain (before)", dict(fused_adamw=False, no_mask=False, targets=False, fused_gelu=False), "fp32"),
    ("+ fused AdamW", dict(fused_adamw=True, no_mask=False, targets=False, fused_gelu=False), "fp32"),
    ("+ no padding mask", dict(fused_adamw=True, no_mask=True, targets=False, fused_gelu=False), "fp32"),
    ("+ LM head on targets only", dict(fused_adamw=True, no_mask=True, targets=True, fused_gelu=False), "fp32"),
    ("+ fused GELU (= tether now)", dict(fused_adamw=True, no_mask=True, targets=True, fused_gelu=True), "fp32"),
    ("tether now, bf16 autocast", dict(fused_adamw=True, no_mask=True, targets=True, fused_gelu=True), "bf16"),
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

    with variant(**kw):
        from tether import models

        if stage == "sft":
            from tether.algo.sft import _loss_fn

            model = models.load_causal_lm(d / "policy")
            fn = lambda b: _loss_fn(float(b.loss_mask.sum()))  # noqa: E731
        else:
            from tether.algo.rm import RMConfig, _loss_fn

            model = models.load_scalar_model(d / "reward")
            fn = lambda b: _loss_fn(float(len(b)), RMConfig())  # noqa: E731
        engine = LocalEngine(model, EngineConfig(device="cpu", precision=precision, threads=threads), OptimConfig(lr=1e-4), total_steps=100)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.ablate")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stages", default="sft,rm")
    p.add_argument("--dir", default="")
    args = p.parse_args(argv)
    import torch
    import transformers

    from benchmarks.workload import Workload, build

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    d = Path(args.dir or Path(tempfile.gettempdir()) / "tether-bench-workload")
    build(d, Workload())
    results: dict = {}
    for stage in args.stages.split(","):
        batches = _batches(d, stage, args.steps)
        for rnd in range(args.rounds):
            order = VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]
            for name, kw, prec in order:
                if stage == "rm" and name.startswith("+ LM head"):  # a reward model has no LM head
                    continue
                c, w = measure(stage, d, kw, prec, batches, args.threads)
                results.setdefault((stage, name), []).append((c, w))
                print(f"  {stage} round {rnd} {name}: cpu {c:.3f}s wall {w:.3f}s per step", file=sys.stderr, flush=True)
    print(f"\nper training step, median over {args.rounds} interleaved rounds x {args.steps} steps, {args.threads} threads")
    print(f"{'stage':5s}  {'variant':30s}  {'CPU s/step':>10s}  {'vs plain':>8s}  {'wall s/step':>11s}  {'vs plain':>8s}")
    for stage in args.stages.split(","):
        base = None
        for name, _kw, _p in VARIANTS:
            rs = results.get((stage, name))
            if not rs:
                continue
            c = statistics.median(x[0] for x in rs)
            w = statistics.median(x[1] for x in rs)
            base = base or (c, w)
            print(f"{stage:5s}  {name:30s}  {c:10.3f}  {base[0] / c:7.2f}x  {w:11.3f}  {base[1] / w:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
