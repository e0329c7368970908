"""tether's RL stage on the fixed workload: PPO with a GAE critic, or the critic-free group baselines."""

from __future__ import annotations

from pathlib import Path

from benchmarks.workload import Workload


def run_rl(stage: str, w: Workload, d: Path, out: Path, precision: str, padding_free: str = "auto", reuse_logprobs: str = "auto", fuse_value_pass: str = "auto") -> dict:
    """16 prompts x 4 samples per iteration, 32 new tokens, one PPO epoch over one minibatch (as TRL's
    RLOO/GRPO with num_iterations=1 and the whole generation batch per step). Rollback snapshots and the
    missing-EOS penalty are off (TRL has neither); rewards from the shared reward model (mean 0, std 1)."""
    from tether.algo.ppo import train
    from tether.algo.rl_config import CriticConfig, KLConfig, PPOConfig, PPOHyper, RolloutConfig
    from tether.algo.reward import RewardConfig
    from tether.config import DataConfig, EngineConfig, OptimConfig, TrackConfig

    cfg = PPOConfig(
        model=str(d / "policy"), out=str(out), seed=w.seed, max_steps=w.rl_iterations, batch_size=w.rl_prompts,
        samples_per_prompt=w.rl_samples, advantage={"ppo": "gae"}.get(stage, stage), sample_every=0,
        data=DataConfig(train=str(d / "prompts.jsonl"), max_length=w.max_length, max_prompt_length=w.max_prompt_length, shuffle=False),
        optim=OptimConfig(lr=w.rl_lr, weight_decay=0.0, betas=w.betas, eps=w.eps, warmup_steps=0, schedule="constant", grad_clip=w.grad_clip),
        engine=EngineConfig(device="cpu", precision=precision, threads=w.threads, padding_free=padding_free),
        track=TrackConfig(progress=False),
        reward=RewardConfig(model=str(d / "reward"), missing_eos_penalty=0.0),
        rollout=RolloutConfig(max_new_tokens=w.rl_new_tokens, temperature=w.rl_temperature, top_p=1.0, top_k=0, reuse_logprobs=reuse_logprobs),
        kl=KLConfig(coef=w.rl_kl_coef),
        ppo=PPOHyper(epochs=1, minibatch_size=0, rollback=False),
        critic=CriticConfig(fuse_value_pass=fuse_value_pass),
    )
    return train(cfg)
