"""One tether stage on the fixed workload, in this process; writes a result JSON.

    python -m benchmarks.run_tether --stage sft --dir /tmp/tether-bench --out r.json [--precision bf16]

The stage is tether's own `train(cfg)` with a config built in code. The clock starts when the stage's
Tracker is created (after model load and tokenisation, just before the loop) and stops at the end of
the last optimizer step; the final save and end-of-run statistics are outside it. Instrumentation wraps
LocalEngine.train_step / HFRollout.generate from the outside; tether's code is unchanged.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Clock, current_rss_mb, pair_tokens, runner_args, setup_threads, sft_tokens, write_result
from benchmarks.rl_tether import ALGO_STAGES
from benchmarks.workload import Workload

LOSS_KEYS = {"sft": "loss/sft", "rm": "loss/rm", "dpo": "loss/dpo", "orpo": "loss/dpo", "simpo": "loss/dpo", "kto": "loss/kto", "ppo": "loss/policy", "rloo": "loss/policy", "grpo": "loss/policy", "algo_grpo": "loss/policy", "dr_grpo": "loss/policy", "dapo": "loss/policy", "gspo": "loss/policy"}


def _instrument(clock: Clock, record: dict) -> None:
    import tether.track
    from tether.engine.local import LocalEngine

    init = tether.track.Tracker.__init__

    @functools.wraps(init)
    def tracker_init(self, *a, **k):
        init(self, *a, **k)
        record.setdefault("rss_before_loop_mb", current_rss_mb())
        clock.start()

    tether.track.Tracker.__init__ = tracker_init

    step = LocalEngine.train_step

    @functools.wraps(step)
    def train_step(self, batch, loss_fn, *a, **k):
        clock.start()
        t = time.perf_counter()
        m = step(self, batch, loss_fn, *a, **k)
        clock.add("train", time.perf_counter() - t)
        clock.step_end()
        metrics = m[0] if isinstance(m, tuple) else m  # (metrics, per-row outputs): PPO's fused value step
        record["metrics"].append({k2: v for k2, v in metrics.items() if k2.startswith(("loss/", "rm/", "rewards/", "policy/", "objective/"))})
        return m

    LocalEngine.train_step = train_step

    fwd = LocalEngine.forward

    @functools.wraps(fwd)
    def forward(self, *a, **k):
        clock.start()  # DPO's reference pass runs before the loop: it is part of the work (KTO's no-grad passes, every step)
        t = time.perf_counter()
        out = fwd(self, *a, **k)
        clock.add("forward (no grad)", time.perf_counter() - t)
        return out

    LocalEngine.forward = forward

    try:
        from tether.rollout.hf import HFRollout
    except ImportError:  # pragma: no cover
        return
    gen = HFRollout.generate

    @functools.wraps(gen)
    def generate(self, prompts, sampling):
        clock.start()
        t = time.perf_counter()
        out = gen(self, prompts, sampling)
        clock.add("generate", time.perf_counter() - t)
        record["gen_tokens"] = record.get("gen_tokens", 0) + int(out.response_mask.sum())
        record["gen_calls"] = record.get("gen_calls", 0) + 1
        return out

    HFRollout.generate = generate


def _common(w: Workload, d: Path, out: Path, precision: str, steps: int, batch: int, train: str) -> dict:
    from tether.config import DataConfig, EngineConfig, LoRAConfig, OptimConfig, TrackConfig

    return dict(
        out=str(out), seed=w.seed, max_steps=steps, batch_size=batch,
        data=DataConfig(train=str(d / train), max_length=w.max_length, max_prompt_length=w.max_prompt_length, shuffle=False),
        optim=OptimConfig(lr=w.lr, weight_decay=0.0, betas=w.betas, eps=w.eps, warmup_steps=0, schedule="constant", grad_clip=w.grad_clip),
        engine=EngineConfig(device="cpu", precision=precision, threads=w.threads, lora=LoRAConfig(r=w.lora_r),
                            gradient_checkpointing=w.grad_ckpt),
        track=TrackConfig(progress=False),
    )


def run(stage: str, d: Path, precision: str, w: Workload, work: Path) -> dict:
    setup_threads(w.threads)
    clock = Clock()
    record: dict = {"lib": "tether", "stage": stage, "precision": precision, "metrics": []}
    _instrument(clock, record)
    out = work / f"tether-{stage}-{precision}"

    if stage == "sft":
        from tether.algo.sft import SFTConfig, train

        cfg = SFTConfig(model=str(d / "policy"), **_common(w, d, out, precision, w.sft_steps, w.sft_batch, "sft.jsonl"))
        train(cfg)
        seq, tgt = sft_tokens(d, w.sft_steps * w.sft_batch)
        record |= {"samples": w.sft_steps * w.sft_batch, "tokens": seq, "target_tokens": tgt}
    elif stage == "rm":
        from tether.algo.rm import RMConfig, train

        cfg = RMConfig(model=str(d / "reward"), **_common(w, d, out, precision, w.rm_steps, w.rm_batch, "prefs.jsonl"))
        train(cfg)
        record |= {"samples": w.rm_steps * w.rm_batch, "tokens": pair_tokens(d, w.rm_steps * w.rm_batch)}
    elif stage == "dpo":
        from tether.algo import dpo

        cfg = dpo.DPOConfig(model=str(d / "policy"), beta=w.dpo_beta, **_common(w, d, out, precision, w.dpo_steps, w.dpo_batch, "prefs.jsonl"))
        dpo.train(cfg)
        record |= {"samples": w.dpo_steps * w.dpo_batch, "tokens": pair_tokens(d, w.dpo_steps * w.dpo_batch)}
    elif stage in ("orpo", "simpo"):  # `tether dpo`'s reference-free loss types, on the DPO stage's pairs
        from tether.algo import dpo

        extra = dict(loss="orpo", beta=w.orpo_lambda) if stage == "orpo" else dict(loss="simpo", beta=w.simpo_beta, gamma=w.simpo_gamma)
        cfg = dpo.DPOConfig(model=str(d / "policy"), **extra, **_common(w, d, out, precision, w.dpo_steps, w.dpo_batch, "prefs.jsonl"))
        dpo.train(cfg)
        record |= {"samples": w.dpo_steps * w.dpo_batch, "tokens": pair_tokens(d, w.dpo_steps * w.dpo_batch)}
    elif stage == "kto":
        from tether.algo import kto

        cfg = kto.KTOConfig(model=str(d / "policy"), beta=w.kto_beta, **_common(w, d, out, precision, w.kto_steps, w.kto_batch, "kto.jsonl"))
        kto.train(cfg)
        seq, tgt = sft_tokens(d, w.kto_steps * w.kto_batch, "kto.jsonl")
        record |= {"samples": w.kto_steps * w.kto_batch, "tokens": seq, "target_tokens": tgt}
    elif stage in ("ppo", "rloo", "grpo", *ALGO_STAGES):
        from benchmarks.rl_tether import run_rl

        run_rl(stage, w, d, out, precision)
        record["samples"] = w.rl_iterations * w.rl_prompts * w.rl_samples
        record["tokens"] = record.get("gen_tokens", 0)
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    record |= {"wall_s": clock.wall, "cpu_s": clock.cpu, "steps": len(clock.step_ends), "phases": clock.phases}
    key = LOSS_KEYS[stage]
    record["losses"] = [m.get(key) for m in record["metrics"]]
    return record


def main(argv: list[str] | None = None) -> int:
    args = runner_args(argv, "tether")
    work = Path(args.work or tempfile.mkdtemp(prefix="tether-bench-"))
    result = run(args.stage, Path(args.dir), args.precision, args.w, work)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
