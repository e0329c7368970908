"""The keys of `tether ppo` (its --help): sampling, the reward, the KL leash and its guard, the critic, the
PPO update, and the run-wide keys in PPO's terms. Kept apart from the algorithm (tether/algo/ppo.py) so
that the online stages built on the same loop share the sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tether.advantages import Advantage
from tether.algo.reward import RewardConfig
from tether.config import RunConfig, check, doc, sub
from tether.losses import KLEstimator
from tether.rollout import SamplingConfig


@dataclass(frozen=True)
class RolloutConfig(SamplingConfig):
    backend: str = doc("hf", "sampler: hf (the policy module itself, static KV cache, each distinct prompt encoded once) or vllm")
    drift_tolerance: float = doc(0.01, "sampler-vs-trainer logprob difference above which a token counts in rollout/logprob_drift_share")
    tis_cap: float = doc(0.0, "truncated importance sampling (as verl's and TRL's TIS): weight each token's advantage by min(pi_trainer/pi_sampler, cap) when the sampler's logprobs differ from the trainer's (vllm); 0 = off")
    reuse_logprobs: Literal["auto", "off"] = doc("auto", "auto: take the old-policy logprobs and entropy from the sampler when they are exact (the hf sampler, float32, no top-p/top-k/min_new_tokens), skipping a forward pass; else, when the rewards do not depend on them (kl.in_loss or kl.coef 0, rollout.tis_cap 0) and the first update step covers the whole batch, from that step's forward before it updates (TRL's num_iterations=1 way); off: always a separate pass")

    def validate(self, p: str) -> None:
        super().validate(p)
        check(self.drift_tolerance > 0, f"{p}drift_tolerance", "must be positive")
        check(self.tis_cap >= 0, f"{p}tis_cap", "must be >= 0")


@dataclass(frozen=True)
class KLConfig:
    coef: float = doc(0.05, "beta: the per-token KL penalty in the reward (initial value when adaptive; Stiennon et al. 2020 use 0.05)")
    adaptive: bool = doc(False, "adapt beta towards kl.target (Ziegler et al. 2019, section 2.2)")
    target: float = doc(6.0, "adaptive controller: target KL per sequence, in nats")
    horizon: int = doc(10000, "adaptive controller: horizon in sequences")
    estimator: Literal["k1", "k2", "k3", "abs"] = doc("k1", "per-token KL estimator in the reward (k1 = log pi/ref; k1/k2/k3 are all logged)")
    max: float = doc(0.0, "roll an update back when the KL per sequence of the updated policy to the reference exceeds this (0 = off)")
    in_loss: bool = doc(False, "put beta * KL (kl.estimator, per token) in the policy loss, aggregated like it, instead of in the reward (GRPO: k3)")

    def validate(self, p: str) -> None:
        check(self.coef >= 0, f"{p}coef", "must be >= 0")
        check(self.target > 0, f"{p}target", "must be positive")
        check(self.horizon > 0, f"{p}horizon", "must be positive")
        check(self.max >= 0, f"{p}max", "must be >= 0")

    @property
    def kind(self) -> KLEstimator:
        return KLEstimator(self.estimator)


@dataclass(frozen=True)
class CriticConfig:
    init: Literal["auto", "reward_model", "policy"] = doc("auto", "value model initialised from the reward model (Ouyang et al. 2022) or the policy; auto = reward model when there is one")
    lr: float = doc(0.0, "critic learning rate (0 = optim.lr)")
    fuse_value_pass: Literal["auto", "off"] = doc("auto", "auto: when a critic step covers the whole rollout batch (ppo.minibatch_size 0 or >= the batch), take the old values from that step's forward instead of a separate no-grad pass (same numbers, one pass fewer); off: always a separate pass")

    def validate(self, p: str) -> None:
        check(self.lr >= 0, f"{p}lr", "must be >= 0")


@dataclass(frozen=True)
class CostConfig:
    model: str = doc("", "a cost model folder from `tether rm loss=cost`: PPO-Lagrangian keeps E[cost] <= cost.threshold (Safe RLHF, Dai et al. 2023); empty = no constraint")
    fn: str = doc("", "or a Python cost: package.module:function(prompts, responses, **kwargs) -> floats")
    kwargs: dict = doc({}, "keyword arguments passed to cost.fn")
    threshold: float = doc(0.0, "d in E[cost] <= d (a cost model places safe responses below 0)")
    lambda_init: float = doc(1.0, "the Lagrange multiplier's starting value")
    lambda_lr: float = doc(0.1, "lambda <- max(0, lambda + lambda_lr (the batch's mean cost - threshold)) each iteration")
    lambda_max: float = doc(0.0, "cap on lambda (0 = none)")
    critic_lr: float = doc(0.0, "the cost critic's learning rate (0 = the reward critic's)")

    def validate(self, p: str) -> None:
        check(not (self.model and self.fn), f"{p}model", "set at most one of cost.model and cost.fn")
        check(self.lambda_init >= 0, f"{p}lambda_init", "must be >= 0")
        check(self.lambda_lr >= 0, f"{p}lambda_lr", "must be >= 0")
        check(self.lambda_max >= 0, f"{p}lambda_max", "must be >= 0")
        check(self.critic_lr >= 0, f"{p}critic_lr", "must be >= 0")

    @property
    def enabled(self) -> bool:
        return bool(self.model or self.fn)


@dataclass(frozen=True)
class PPOHyper:
    epochs: int = doc(4, "passes over each rollout batch (lm-human-preferences: 4)")
    minibatch_size: int = doc(0, "sequences per optimizer step (0 = the whole rollout batch)")
    clip: float = doc(0.2, "policy ratio clip epsilon (Schulman et al. 2017)")
    clip_high: float = doc(0.0, "upper clip epsilon when it differs from ppo.clip (DAPO's clip-higher: 0.28; 0 = ppo.clip)")
    ratio: Literal["token", "sequence"] = doc("token", "token: a ratio per token; sequence: GSPO's per-sequence ratio exp(mean log ratio) (Zheng et al. 2025)")
    loss_agg: Literal["token", "sequence", "constant"] = doc("token", "token: mean over the batch's tokens (DAPO); sequence: mean per sequence, then over sequences (GRPO); constant: sum / (sequences x rollout.max_new_tokens) (Dr. GRPO)")
    value_clip: float = doc(0.2, "value clip around the old values (0 = off)")
    vf_coef: float = doc(0.1, "value loss coefficient (lm-human-preferences: 0.1)")
    entropy_coef: float = doc(0.0, "entropy bonus coefficient (0 = off, as in the RLHF papers)")
    gamma: float = doc(1.0, "discount")
    lam: float = doc(0.95, "GAE lambda")
    whiten_advantages: bool = doc(True, "normalise advantages over the batch")
    target_approx_kl: float = doc(0.0, "stop the epoch loop when a minibatch's approx KL(old||new) exceeds this (0 = off)")
    rollback: bool = doc(True, "snapshot weights before each update and roll back a bad one (costs a copy of policy+critic+optimizer state)")
    max_rollbacks: int = doc(3, "after this many rolled-back updates in a row, do on_rollbacks (0 = never)")
    on_rollbacks: Literal["stop", "lower_lr"] = doc("stop", "stop: end the run with exit 3; lower_lr: multiply the policy's and critic's learning rates by 0.5 and go on")

    def validate(self, p: str) -> None:
        check(self.epochs > 0, f"{p}epochs", "must be positive")
        check(self.minibatch_size >= 0, f"{p}minibatch_size", "must be >= 0")
        check(0 < self.clip < 1, f"{p}clip", "must be in (0, 1)")
        check(self.clip_high >= 0, f"{p}clip_high", "must be >= 0")
        check(self.value_clip >= 0, f"{p}value_clip", "must be >= 0")
        check(0 <= self.gamma <= 1, f"{p}gamma", "must be in [0, 1]")
        check(0 <= self.lam <= 1, f"{p}lam", "must be in [0, 1]")
        check(self.target_approx_kl >= 0, f"{p}target_approx_kl", "must be >= 0")
        check(self.max_rollbacks >= 0, f"{p}max_rollbacks", "must be >= 0")


# Each method of `tether ppo algo=...`: the keys it sets (load_config lays the user's keys over them). The
# same loop runs every one; what differs is the advantage, where the KL goes, the ratio, the clip and the loss's
# aggregation. Sources: GRPO Shao et al. 2024 (beta 0.04, k3 in the loss); Dr. GRPO Liu et al. 2025; DAPO
# Yu et al. 2025 (no KL, clip 0.2/0.28, token mean, dynamic sampling); GSPO Zheng et al. 2025 (clip 3e-4/4e-4);
# RLOO Ahmadian et al. 2024 and ReMax Li et al. 2023 (one plain policy-gradient step per batch); REINFORCE++
# and its baseline form Hu 2025 (k1 in the reward, or k2 in the loss; advantages whitened over the batch).
_GROUP = ["samples_per_prompt=4", "ppo.whiten_advantages=false"]
ALGOS = {
    "ppo": [],
    "grpo": ["advantage=grpo", *_GROUP, "kl.in_loss=true", "kl.estimator=k3", "kl.coef=0.04", "ppo.loss_agg=sequence"],
    "dr_grpo": ["advantage=dr_grpo", *_GROUP, "kl.in_loss=true", "kl.estimator=k3", "kl.coef=0.04", "ppo.loss_agg=constant"],
    "dapo": ["advantage=grpo", *_GROUP, "kl.coef=0", "ppo.clip_high=0.28", "ppo.loss_agg=token", "dynamic_sampling=true", "dynamic_sampling_batches=10"],
    "gspo": ["advantage=grpo", *_GROUP, "kl.coef=0", "ppo.ratio=sequence", "ppo.loss_agg=sequence", "ppo.clip=3e-4", "ppo.clip_high=4e-4"],
    "rloo": ["advantage=rloo", *_GROUP, "ppo.epochs=1", "ppo.minibatch_size=0"],
    "reinforce_pp": ["advantage=reinforce", "ppo.whiten_advantages=true"],
    "reinforce_pp_baseline": ["advantage=reinforce_baseline", "samples_per_prompt=4", "ppo.whiten_advantages=true", "kl.in_loss=true", "kl.estimator=k2"],
    "remax": ["advantage=remax", "ppo.whiten_advantages=false", "ppo.epochs=1", "ppo.minibatch_size=0"],
}


@dataclass(frozen=True)
class PPOConfig(RunConfig):
    PRESETS = ("algo", ALGOS)  # not a field: load_config's table of method presets
    # the run-wide keys, in PPO's terms
    max_steps: int = doc(0, "PPO iterations, each a rollout, scoring and ppo.epochs update passes (0 = run `epochs` passes over the prompts)")
    epochs: float = doc(1.0, "passes over the prompt set when max_steps is 0 (ppo.epochs is the passes over each rollout batch)")
    batch_size: int = doc(8, "prompts per iteration, each sampled samples_per_prompt times (ppo.minibatch_size splits them per optimizer step)")
    ref_model: str = doc("", "frozen reference model folder (empty = the initial policy, `model`)")
    reward: RewardConfig = sub(RewardConfig, "the reward: a reward model, a Python function, or several named sources")
    cost: CostConfig = sub(CostConfig, "a cost to keep under a threshold (PPO-Lagrangian, Safe RLHF)")
    rollout: RolloutConfig = sub(RolloutConfig, "sampling: max_new_tokens, temperature, top_p, backend ...")
    kl: KLConfig = sub(KLConfig, "KL penalty to the reference and the KL guard")
    critic: CriticConfig = sub(CriticConfig, "the value model")
    ppo: PPOHyper = sub(PPOHyper, "PPO update")
    samples_per_prompt: int = doc(1, "responses sampled per prompt (>= 2 for the group baselines)")
    algo: Literal[tuple(ALGOS)] = doc("ppo", "method: sets the keys of ALGOS (tether/algo/rl_config.py, README) to the paper's choices; a key you set wins")
    advantage: Literal[tuple(a.value for a in Advantage)] = doc("gae", "gae (critic); group baselines without a critic: rloo, grpo, dr_grpo (no std); returns-to-go: reinforce (REINFORCE++), reinforce_baseline (minus the group mean), remax (minus the greedy response's reward)")
    dynamic_sampling: bool = doc(False, "drop each prompt's group whose rewards are all equal before the forward passes (DAPO; rollout/groups_dropped), refilled from further prompt batches up to dynamic_sampling_batches; kept whole when every group is uniform")
    dynamic_sampling_batches: int = doc(1, "dynamic sampling: prompt batches sampled at most per iteration to fill batch_size groups with unequal rewards (1 = no refill: the batch shrinks; algo=dapo sets 10, verl's DAPO recipe)")
    overlong_buffer: int = doc(0, "DAPO's soft overlong penalty: over the last N of rollout.max_new_tokens tokens the score falls linearly by up to overlong_penalty (0 = off)")
    overlong_penalty: float = doc(1.0, "the penalty at rollout.max_new_tokens tokens")
    sample_every: int = doc(10, "print and save a few sample completions every N iterations (0 = off)")
    num_samples: int = doc(3, "completions shown each time")

    def validate(self, p: str = "") -> None:
        super().validate(p)
        check(self.samples_per_prompt > 0, f"{p}samples_per_prompt", "must be positive")
        if self.advantage_kind.needs_groups:
            check(self.samples_per_prompt >= 2, f"{p}samples_per_prompt", f"advantage={self.advantage} needs at least 2 samples per prompt")
        if self.critic.init == "reward_model":
            check(bool(self.reward.model), f"{p}critic.init", "reward_model needs reward.model; use critic.init=policy with reward.fn")
        check(self.sample_every >= 0, f"{p}sample_every", "must be >= 0")
        check(not self.dynamic_sampling or self.samples_per_prompt >= 2, f"{p}dynamic_sampling", "needs samples_per_prompt >= 2")
        check(self.dynamic_sampling_batches >= 1, f"{p}dynamic_sampling_batches", "must be >= 1")
        check(0 <= self.overlong_buffer <= self.rollout.max_new_tokens, f"{p}overlong_buffer", "must be in [0, rollout.max_new_tokens]")
        if self.reward.sources and self.reward.combine == "gdpo":
            check(self.samples_per_prompt >= 2, f"{p}reward.combine", "gdpo normalises each reward within a prompt's samples: set samples_per_prompt >= 2")

    @property
    def advantage_kind(self) -> Advantage:
        return Advantage(self.advantage)

    @property
    def critic_from_reward_model(self) -> bool:
        return self.critic.init == "reward_model" or (self.critic.init == "auto" and bool(self.reward.model))
