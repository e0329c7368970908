"""tether's RL stage on the fixed workload: PPO with a GAE critic, the critic-free group baselines, or a
`tether ppo algo=...` preset."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.workload import Workload

# The presets benchmarked against TRL's GRPOTrainer loss types (run_trl.GRPO_LOSSES). DAPO's dynamic
# sampling is off: TRL 1.16 has none, and dropping groups would shrink tether's batch.
ALGO_STAGES = {"algo_grpo": "grpo", "dr_grpo": "dr_grpo", "dapo": "dapo", "gspo": "gspo"}


def run_rl(stage: str, w: Workload, d: Path, out: Path, precision: str, padding_free: str = "auto", reuse_logprobs: str = "auto", fuse_value_pass: str = "auto") -> dict:
    """16 prompts x 4 samples per iteration, 32 new tokens, one PPO epoch over one minibatch (as TRL's
    RLOO/GRPO with num_iterations=1 and the whole generation batch per step). Rollback snapshots and the
    missing-EOS penalty are off (TRL has neither); rewards from the shared reward model (mean 0, std 1).
    An ALGO_STAGES stage takes its preset's advantage, KL, clip, ratio and aggregation on the same work."""
    from tether.algo.ppo import train
    from tether.algo.rl_config import PPOConfig
    from tether.config import flat_keys, load_config

    tree = {
        "model": str(d / "policy"), "out": str(out), "seed": w.seed, "max_steps": w.rl_iterations, "batch_size": w.rl_prompts,
        "samples_per_prompt": w.rl_samples, "sample_every": 0,
        "data": {"train": str(d / "prompts.jsonl"), "max_length": w.max_length, "max_prompt_length": w.max_prompt_length, "shuffle": False},
        "optim": {"lr": w.rl_lr, "weight_decay": 0.0, "betas": list(w.betas), "eps": w.eps, "warmup_steps": 0, "schedule": "constant", "grad_clip": w.grad_clip},
        "engine": {"device": "cpu", "precision": precision, "threads": w.threads, "padding_free": padding_free, "lora": {"r": w.lora_r},
                   "gradient_checkpointing": w.grad_ckpt},
        "track": {"progress": False},
        "reward": {"model": str(d / "reward"), "missing_eos_penalty": 0.0},
        "rollout": {"max_new_tokens": w.rl_new_tokens, "temperature": w.rl_temperature, "top_p": 1.0, "top_k": 0, "reuse_logprobs": reuse_logprobs},
        "kl": {"coef": w.rl_kl_coef},
        "ppo": {"epochs": 1, "minibatch_size": 0, "rollback": False},
        "critic": {"fuse_value_pass": fuse_value_pass},
    }
    if stage in ALGO_STAGES:
        tree |= {"algo": ALGO_STAGES[stage], "dynamic_sampling": False}
        del tree["kl"]["coef"]  # the preset's beta (GRPO 0.04, DAPO and GSPO none); run_trl sets TRL's to match
    else:
        tree["advantage"] = {"ppo": "gae"}.get(stage, stage)
    return train(load_config(PPOConfig, overrides=[f"{k}={json.dumps(v)}" for k, v in flat_keys(tree).items()]))
