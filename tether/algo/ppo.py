"""PPO against a reward model with a KL leash to a frozen reference (Ziegler et al. 2019; Stiennon et
al. 2020; Ouyang et al. 2022), with the clipped objective of Schulman et al. 2017.

    tether ppo --config configs/ppo.yaml
    tether ppo model=runs/sft/final reward.model=runs/rm/final data.train=prompts.jsonl out=runs/ppo max_steps=100
    tether ppo model=runs/sft/final reward.fn=tether.rewards:word_fraction critic.init=policy ...

Each iteration (one `max_steps` step):
  1. rollout    sample a response for each of `batch_size` prompts (x samples_per_prompt)
  2. score      reward model (normalised with `tether rm`'s statistics) or a Python reward function;
                optional clipping and a penalty for responses that never reached EOS
  3. forward    old-policy logprobs, reference logprobs, values; per-token KL penalty in the reward
                r_t = -beta KL_t (+ score on the last token); beta fixed or adaptive (Ziegler 2.2)
  4. advantage  GAE(gamma, lambda) with the critic (or RLOO / GRPO group baselines without one); whitening
  5. update     `ppo.epochs` passes over shuffled minibatches: clipped policy loss (+ entropy bonus),
                clipped value loss, gradient clipping; stop early when approx KL > ppo.target_approx_kl
  6. guard      a non-finite loss/gradient, or KL to the reference above kl.max, rolls the update back
The defaults follow "The N+ implementation details of RLHF with PPO" (Huang et al. 2024) and
lm-human-preferences (Ziegler et al. 2019). `make_experience` and `ppo_update` are the per-iteration
pieces; a distributed controller calls the same two functions with remote engines.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tether.advantages import (
    Advantage,
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    group_advantages,
    kl_shaped_rewards,
    whiten_advantages,
)
from tether.algo.common import require_examples, sampler_and_step, start_run, total_steps, write_summary
from tether.cli import cli_main
from tether.config import ConfigError, RunConfig, RunStopped, check, doc, sub, to_dict
from tether.engine import make_engine, make_reference
from tether.losses import KLEstimator, entropy_bonus, kl_estimate, masked_mean, ppo_policy_loss, value_loss
from tether.models import as_trained, causal_logprobs, disable_dropout, eos_ids, load_causal_lm, load_reward_stats, save_reward_stats, load_scalar_model, load_tokenizer, scalar_values, sequence_scores
from tether.rollout import SamplingConfig, make_rollout
from tether.track import Tracker
from tether.types import Experience, PromptBatch, RolloutBatch, prompt_groups

# -- Config ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardConfig:
    model: str = doc("", "reward model folder from `tether rm` (its tether_reward.json holds the normalisation statistics)")
    fn: str = doc("", "a Python reward instead of a model: package.module:function(prompts, responses, **kwargs) -> floats")
    kwargs: dict = doc({}, "keyword arguments passed to reward.fn")
    normalize: bool = doc(True, "score = (r - mean) / std with the statistics saved by `tether rm` (Ziegler et al. 2019)")
    clip: float = doc(0.0, "clip the normalised score to [-clip, clip] (0 = off)")
    missing_eos_penalty: float = doc(1.0, "subtract this from the score of a response that never reached EOS (Huang et al. 2024's 'EOS trick'; 0 = off); the RM scores such a response with EOS appended, as it was trained (models.as_trained)")

    def validate(self, p: str) -> None:
        check(bool(self.model) != bool(self.fn), f"{p}model", "set exactly one of reward.model (a reward model folder) and reward.fn (module:function)")
        check(self.clip >= 0, f"{p}clip", "must be >= 0")
        check(self.missing_eos_penalty >= 0, f"{p}missing_eos_penalty", "must be >= 0")


@dataclass(frozen=True)
class RolloutConfig(SamplingConfig):
    backend: str = doc("hf", "sampler: hf (the policy module itself, static KV cache, each distinct prompt encoded once) or vllm")
    reuse_logprobs: Literal["auto", "off"] = doc("auto", "auto: take the old-policy logprobs and entropy from the sampler when they are exact (the hf sampler, float32, no top-p/top-k/min_new_tokens), skipping a forward pass; off: always recompute")


@dataclass(frozen=True)
class KLConfig:
    coef: float = doc(0.05, "beta: the per-token KL penalty in the reward (initial value when adaptive; Stiennon et al. 2020 use 0.05)")
    adaptive: bool = doc(False, "adapt beta towards kl.target (Ziegler et al. 2019, section 2.2)")
    target: float = doc(6.0, "adaptive controller: target KL per sequence, in nats")
    horizon: int = doc(10000, "adaptive controller: horizon in sequences")
    estimator: Literal["k1", "k2", "k3", "abs"] = doc("k1", "per-token KL estimator in the reward (k1 = log pi/ref; k1/k2/k3 are all logged)")
    max: float = doc(0.0, "roll an update back when the KL per sequence of the updated policy to the reference exceeds this (0 = off)")

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
    fuse_value_pass: Literal["auto", "off"] = doc("auto", "auto: when a critic step covers the whole rollout batch (ppo.minibatch_size 0 or >= the batch) and the critic is in this process, take the old values from that step's forward instead of a separate no-grad pass (same numbers, one pass fewer); off: always a separate pass")

    def validate(self, p: str) -> None:
        check(self.lr >= 0, f"{p}lr", "must be >= 0")


@dataclass(frozen=True)
class PPOHyper:
    epochs: int = doc(4, "passes over each rollout batch (lm-human-preferences: 4)")
    minibatch_size: int = doc(0, "sequences per optimizer step (0 = the whole rollout batch)")
    clip: float = doc(0.2, "policy ratio clip epsilon (Schulman et al. 2017)")
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
        check(self.value_clip >= 0, f"{p}value_clip", "must be >= 0")
        check(0 <= self.gamma <= 1, f"{p}gamma", "must be in [0, 1]")
        check(0 <= self.lam <= 1, f"{p}lam", "must be in [0, 1]")
        check(self.target_approx_kl >= 0, f"{p}target_approx_kl", "must be >= 0")
        check(self.max_rollbacks >= 0, f"{p}max_rollbacks", "must be >= 0")


@dataclass(frozen=True)
class PPOConfig(RunConfig):
    # the run-wide keys, in PPO's terms
    max_steps: int = doc(0, "PPO iterations, each a rollout, scoring and ppo.epochs update passes (0 = run `epochs` passes over the prompts)")
    epochs: float = doc(1.0, "passes over the prompt set when max_steps is 0 (ppo.epochs is the passes over each rollout batch)")
    batch_size: int = doc(8, "prompts per iteration, each sampled samples_per_prompt times (ppo.minibatch_size splits them per optimizer step)")
    ref_model: str = doc("", "frozen reference model folder (empty = the initial policy, `model`)")
    reward: RewardConfig = sub(RewardConfig, "the reward: a reward model or a Python function")
    rollout: RolloutConfig = sub(RolloutConfig, "sampling: max_new_tokens, temperature, top_p, backend ...")
    kl: KLConfig = sub(KLConfig, "KL penalty to the reference and the KL guard")
    critic: CriticConfig = sub(CriticConfig, "the value model")
    ppo: PPOHyper = sub(PPOHyper, "PPO update")
    samples_per_prompt: int = doc(1, "responses sampled per prompt (>= 2 for rloo/grpo)")
    advantage: Literal["gae", "rloo", "grpo"] = doc("gae", "advantage estimator: gae (critic), rloo or grpo (group baselines, no critic)")
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

    @property
    def advantage_kind(self) -> Advantage:
        return Advantage(self.advantage)

    @property
    def critic_from_reward_model(self) -> bool:
        return self.critic.init == "reward_model" or (self.critic.init == "auto" and bool(self.reward.model))


# -- Scoring ---------------------------------------------------------------------------------------


class Scorer:
    """Scores rollouts: a frozen reward-model engine or a Python reward function -> raw rewards [B]."""

    def __init__(self, cfg: RewardConfig, engine=None, fn=None, tokenizer=None, rm_tokenizer=None, eos: list[int] | None = None):
        self.cfg, self.engine, self.fn = cfg, engine, fn
        self.eos = set(eos or [])
        self.tok, self.rm_tok = tokenizer, rm_tokenizer
        self.stats = load_reward_stats(cfg.model) if cfg.model else {"mean": 0.0, "std": 1.0}

    def raw(self, ro: RolloutBatch) -> Tensor:
        if self.fn is not None:
            from tether.rewards import call_reward_fn

            R = ro.response_mask.shape[1]
            resp = ro.sequences[:, -R:].tolist()
            ids = [[t for t, m in zip(row, mask) if m] for row, mask in zip(resp, ro.response_mask.tolist())]
            ids = [[t for t in row if t not in self.eos] for row in ids]
            return torch.tensor(call_reward_fn(self.fn, ro.prompts, ro.responses, ids, self.cfg.kwargs), dtype=torch.float)
        from tether.data import pad_id

        if self.rm_tok is None:  # scored as the RM was trained: a cut response gets its EOS (models.as_trained)
            seqs, attn = as_trained(ro.sequences, ro.attention_mask, ro.finished, self.tok.eos_token_id, pad_id(self.tok))
            batch = dataclasses.replace(ro, sequences=seqs, attention_mask=attn)
        else:
            batch = self._retokenize(ro)
        return self.engine.forward(batch, lambda m, b: sequence_scores(m, b.sequences, b.attention_mask, prompt_groups(b))).float().cpu()

    def _retokenize(self, ro: RolloutBatch) -> RolloutBatch:
        """The RM has its own tokenizer: decode and encode again, its EOS after a cut response (as_trained)."""
        rows = []
        cut = (~ro.finished).tolist() if ro.finished is not None else [False] * len(ro.sequences)
        for ids, mask, c in zip(ro.sequences.tolist(), ro.attention_mask.tolist(), cut):
            text = self.tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
            rows.append(self.rm_tok(text, add_special_tokens=False)["input_ids"] + ([self.rm_tok.eos_token_id] if c else []))
        width = max(len(r) for r in rows)
        pad = self.rm_tok.pad_token_id or 0
        seqs = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return dataclasses.replace(ro, sequences=seqs, attention_mask=attn, group_ids=[])  # its prompt boundary is not known

    def score(self, ro: RolloutBatch) -> tuple[Tensor, Tensor, dict[str, float]]:
        """-> (raw [B], score [B] used in the reward, metrics)."""
        raw = self.raw(ro)
        s = (raw - self.stats["mean"]) / self.stats["std"] if self.cfg.normalize else raw.clone()
        if self.cfg.clip > 0:
            s = s.clamp(-self.cfg.clip, self.cfg.clip)
        finished = ro.finished.cpu() if ro.finished is not None else torch.ones_like(s, dtype=torch.bool)
        if self.cfg.missing_eos_penalty > 0:
            s = s - self.cfg.missing_eos_penalty * (~finished).float()
        return raw, s, {
            "rewards/raw_mean": float(raw.mean()), "rewards/raw_std": float(raw.std()) if len(raw) > 1 else 0.0,
            "rewards/mean": float(s.mean()), "rewards/std": float(s.std()) if len(s) > 1 else 0.0,
        }


# -- One iteration's experience --------------------------------------------------------------------


def _values(model, b, R: int) -> Tensor:
    """V(s_t) for each response token t: the head on the hidden state that predicts token t. -> [B, R]"""
    return scalar_values(model, b.sequences, b.attention_mask, groups=prompt_groups(b))[:, -R - 1 : -1]


@torch.no_grad()
def make_experience(prompts: PromptBatch, rollout, policy, ref, critic, scorer: Scorer, cfg: PPOConfig, kl_coef: float,
                    fuse_values: bool = False) -> tuple[Experience, dict[str, float], RolloutBatch, Tensor]:
    """Rollout, score, forward passes, KL-shaped rewards and advantages. -> (experience, metrics, rollout, scores).

    fuse_values: skip the critic's pass; the experience then has values, advantages and returns None, and
    `ppo_update` computes them in the critic's first training step (`fused_value_step`)."""
    timing: dict[str, float] = {}
    t = time.perf_counter()
    ro = rollout.generate(prompts, cfg.rollout)
    ro = ro.to("cpu")
    timing["timing/rollout"] = time.perf_counter() - t

    t = time.perf_counter()
    raw, scores, metrics = scorer.score(ro)
    timing["timing/score"] = time.perf_counter() - t

    t = time.perf_counter()
    mask = ro.response_mask  # [B, R]
    R = mask.shape[1]
    temp = cfg.rollout.temperature or 1.0
    # Logprobs at the sampling temperature: the policy being optimised is the one that sampled. When the
    # sampler's own logprobs are exactly that (same module, float32, untruncated distribution) the pass
    # is skipped, as TRL does with num_iterations=1; otherwise the trainer recomputes them.
    reuse = (cfg.rollout.reuse_logprobs == "auto" and ro.entropy is not None
             and getattr(rollout, "exact_logprobs", lambda s: False)(cfg.rollout))
    if reuse:
        logprobs, entropy = ro.logprobs, ro.entropy
    else:
        logprobs, entropy = policy.forward(ro, lambda m, b: causal_logprobs(m, b.sequences, b.attention_mask, num_response=R, temperature=temp, with_entropy=True, groups=prompt_groups(b)))
    ref_logprobs, _ = ref.forward(ro, lambda m, b: causal_logprobs(m, b.sequences, b.attention_mask, num_response=R, temperature=temp, groups=prompt_groups(b)))
    logprobs, entropy, ref_logprobs = logprobs.cpu() * mask, entropy.cpu(), ref_logprobs.cpu() * mask
    if critic is None:
        values = torch.zeros_like(logprobs)
    elif fuse_values:
        values = None  # with advantages and returns, from the critic's first training step
    else:
        values = critic.forward(ro, lambda m, b: _values(m, b, R)).float().cpu() * mask
    timing["timing/forward"] = time.perf_counter() - t

    # Per-token KL penalty in the reward (Ziegler et al. 2019, eq. 2), score on the last token.
    kl = kl_estimate(logprobs, ref_logprobs, cfg.kl.kind) * mask  # [B, R]
    rewards, non_score = kl_shaped_rewards(scores, kl, mask, kl_coef)
    kind = cfg.advantage_kind
    if values is None:
        advantages = returns = None
    elif kind.needs_critic:
        advantages, returns = critic_advantages(rewards, values, mask, cfg)
    else:  # a group baseline on the whole-sequence KL-shaped return
        advantages = group_advantages(rewards.sum(-1), cfg.samples_per_prompt, kind)[:, None] * mask
        returns = torch.zeros_like(advantages)
        if cfg.ppo.whiten_advantages:
            advantages = whiten_advantages(advantages, mask)

    lengths = mask.sum(-1)
    k1 = kl_estimate(logprobs, ref_logprobs, KLEstimator.K1) * mask
    finished = ro.finished if ro.finished is not None else torch.zeros(len(lengths), dtype=torch.bool)
    metrics |= {
        "objective/kl": float(k1.sum(-1).mean()),  # per sequence
        "objective/kl_token": float(masked_mean(k1, mask)),
        "objective/kl_k2_token": float(masked_mean(kl_estimate(logprobs, ref_logprobs, KLEstimator.K2), mask)),
        "objective/kl_k3_token": float(masked_mean(kl_estimate(logprobs, ref_logprobs, KLEstimator.K3), mask)),
        "objective/kl_coef": kl_coef,
        "objective/non_score_reward": float(non_score.sum(-1).mean()),
        "objective/total_reward": float(rewards.sum(-1).mean()),
        "policy/entropy": float(masked_mean(entropy, mask)),
        "rollout/logprobs_reused": float(reuse),
        "response/length_mean": float(lengths.mean()),
        "response/hit_max_fraction": float(((lengths >= cfg.rollout.max_new_tokens) & ~finished).float().mean()),
        "response/eos_fraction": float(finished.float().mean()),
        "speed/gen_tokens_per_s": float(lengths.sum()) / max(timing["timing/rollout"], 1e-9),
    } | timing
    if not reuse:  # sampler vs trainer logprobs of the same tokens (0 up to rounding for the hf sampler)
        metrics["rollout/logprob_drift"] = float(masked_mean((ro.logprobs.cpu() - logprobs).abs(), mask))
    if critic is not None and values is not None:
        metrics |= value_metrics(values, returns, mask)
    exp = Experience(
        sequences=ro.sequences, attention_mask=ro.attention_mask, response_mask=mask, logprobs=logprobs,
        ref_logprobs=ref_logprobs, values=values, advantages=advantages, returns=returns, prompt_length=ro.prompt_length,
        rewards=rewards, group_ids=ro.group_ids,
    )
    return exp, metrics, ro, raw


def critic_advantages(rewards: Tensor, values: Tensor, mask: Tensor, cfg: PPOConfig) -> tuple[Tensor, Tensor]:
    """GAE(gamma, lambda) advantages (whitened when ppo.whiten_advantages) and returns. [B, R] each."""
    advantages, returns = gae(rewards, values, mask, cfg.ppo.gamma, cfg.ppo.lam)
    if cfg.ppo.whiten_advantages:
        advantages = whiten_advantages(advantages, mask)
    return advantages, returns


def value_metrics(values: Tensor, returns: Tensor, mask: Tensor) -> dict[str, float]:
    return {"value/explained_variance": float(explained_variance(values, returns, mask)), "value/mean": float(masked_mean(values, mask))}


def fused_value_step(exp: Experience, critic, cfg: PPOConfig) -> tuple[Experience, dict[str, float]]:
    """The critic's first step over the whole batch, whose forward also gives the old values: before any
    update they are exactly what make_experience's no-grad pass would have computed. GAE is per row, so
    each micro-batch gets its returns from its own values; the value clip is inactive (values == old).
    -> (experience with values, advantages and returns, the step's metrics)."""
    num_tokens = critic.global_sum(float(exp.response_mask.sum()))
    old: list[Tensor] = []  # per micro-batch, in order (Batch.split keeps the order)

    def loss_fn(model, mb: Experience):
        R = mb.response_mask.shape[1]
        values = _values(model, mb, R)
        v_old = values.detach().float() * mb.response_mask
        _, returns = gae(mb.rewards, v_old, mb.response_mask, cfg.ppo.gamma, cfg.ppo.lam)
        old.append(v_old.cpu())
        loss, metrics = value_loss(values, v_old, returns, mb.response_mask, num_tokens, cfg.ppo.value_clip)
        return cfg.ppo.vf_coef * loss, metrics

    m = critic.train_step(exp, loss_fn)
    values = torch.cat(old)
    advantages, returns = critic_advantages(exp.rewards, values, exp.response_mask, cfg)
    exp = dataclasses.replace(exp, values=values, advantages=advantages, returns=returns)
    return exp, m | value_metrics(values, returns, exp.response_mask)


# -- The update ------------------------------------------------------------------------------------


def policy_loss_fn(cfg: PPOConfig, num_tokens: float):
    """Clipped surrogate (+ entropy bonus) on a micro-batch of Experience, normalised by num_tokens."""
    temp = cfg.rollout.temperature or 1.0
    coef = cfg.ppo.entropy_coef

    def loss_fn(model, mb: Experience):
        R = mb.response_mask.shape[1]
        new_logprobs, ent = causal_logprobs(model, mb.sequences, mb.attention_mask, num_response=R, temperature=temp, with_entropy=coef > 0, groups=prompt_groups(mb))
        loss, metrics = ppo_policy_loss(new_logprobs, mb.logprobs, mb.advantages, mb.response_mask, num_tokens, cfg.ppo.clip)
        if coef > 0:
            bonus, m = entropy_bonus(ent, mb.response_mask, num_tokens, coef)
            loss = loss + bonus
            metrics |= {"policy/entropy_update": m["policy/entropy"]}
        return loss, metrics

    return loss_fn


def value_loss_fn(cfg: PPOConfig, num_tokens: float):
    """Clipped value loss, scaled by ppo.vf_coef, on a micro-batch of Experience."""

    def loss_fn(model, mb: Experience):
        R = mb.response_mask.shape[1]
        values = _values(model, mb, R)
        loss, metrics = value_loss(values, mb.values, mb.returns, mb.response_mask, num_tokens, cfg.ppo.value_clip)
        return cfg.ppo.vf_coef * loss, metrics

    return loss_fn


def ppo_update(exp: Experience, policy, critic, cfg: PPOConfig, iteration: int) -> tuple[dict[str, float], Experience]:
    """ppo.epochs passes over shuffled minibatches; early stop on approx KL; stops at a non-finite step.

    The shuffle is seeded by (seed, iteration), so a resumed run draws the same minibatches. An experience
    without values (make_experience(fuse_values=True)) gets them from the critic's first step, which then
    stands for the critic's step of the first (whole-batch) minibatch. -> (metrics, the experience).
    """
    n = len(exp)
    mbs = cfg.ppo.minibatch_size or n
    fused: dict[str, float] | None = None
    if exp.values is None:
        if mbs < n:
            raise ValueError("an experience without values needs a whole-batch minibatch (ppo.minibatch_size 0 or >= the batch)")
        exp, fused = fused_value_step(exp, critic, cfg)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration)
    parts: list[dict[str, float]] = []
    early, bad = False, False
    for epoch in range(cfg.ppo.epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, mbs):
            mb = exp.select(perm[s : s + mbs])
            num_tokens = policy.global_sum(float(mb.response_mask.sum()))
            m = policy.train_step(mb, policy_loss_fn(cfg, num_tokens))
            m = {f"{k}_policy" if k.startswith("optim/") else k: v for k, v in m.items()}
            if critic is not None:
                mv = fused if fused is not None and epoch == 0 else critic.train_step(mb, value_loss_fn(cfg, num_tokens))
                m |= {f"{k}_value" if k.startswith("optim/") else k: v for k, v in mv.items()}
            parts.append(m)
            if any(k.startswith("optim/skipped") and v > 0 for k, v in m.items()) or not all(math.isfinite(v) for v in m.values()):
                bad = True
                break
            if cfg.ppo.target_approx_kl > 0 and m["policy/approx_kl"] > cfg.ppo.target_approx_kl:
                early = True
                break
        if bad or early:
            break
    keys = {k for p in parts for k in p}
    out = {k: sum(p[k] for p in parts if k in p) / sum(k in p for p in parts) for k in keys}
    out |= {"ppo/epochs": epoch + 1, "ppo/minibatch_steps": len(parts), "ppo/early_stop": float(early), "guard/nonfinite": float(bad)}
    if critic is not None:  # the fused step's value/* metrics came in with the first minibatch's
        out["value/fused_pass"] = float(fused is not None)
    return out, exp


@torch.no_grad()
def kl_after_update(policy, exp: Experience, cfg: PPOConfig) -> float:
    """KL per sequence of the updated policy to the reference on the batch's tokens (k3, always >= 0)."""
    R = exp.response_mask.shape[1]
    temp = cfg.rollout.temperature or 1.0
    lp, _ = policy.forward(exp, lambda m, b: causal_logprobs(m, b.sequences, b.attention_mask, num_response=R, temperature=temp, groups=prompt_groups(b)))
    k3 = kl_estimate(lp.cpu(), exp.ref_logprobs, KLEstimator.K3) * exp.response_mask
    return float(k3.sum(-1).mean())


# -- The loop --------------------------------------------------------------------------------------


def _peak_memory_mb(device: torch.device) -> dict[str, float]:
    out = {"memory/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["memory/peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def train(cfg: PPOConfig) -> dict:
    from tether.data import collate_prompts, load_prompts, pad_id, prompt_text, tokenize_prompts
    from tether.rewards import load_reward_fn

    out, ckpt = start_run(cfg, "ppo")
    tok = load_tokenizer(cfg.model)
    if not cfg.data.train:
        raise ConfigError("config key 'data.train': required (a prompt file)")
    prompts, report = load_prompts(cfg.data.train, cfg.data.on_bad_record)
    kept: list[int] = []
    prompt_ids = require_examples(tokenize_prompts(prompts, tok, cfg.data, report, kept), cfg, report)
    texts = [prompt_text(prompts[i].prompt) for i in kept]
    pad = pad_id(tok)
    steps = total_steps(cfg, len(prompt_ids))
    rows = min(cfg.batch_size, len(prompt_ids)) * cfg.samples_per_prompt
    optim_steps = steps * cfg.ppo.epochs * math.ceil(rows / (cfg.ppo.minibatch_size or rows))  # for the LR schedule

    # policy (trained), ref (frozen), critic (trained, unless a group baseline), reward (frozen model or fn)
    policy_model = load_causal_lm(cfg.model)
    disable_dropout(policy_model, cfg.dropout)
    policy = make_engine(policy_model, cfg.engine, cfg.optim, total_steps=optim_steps)
    ref = make_reference(policy, cfg.engine, cfg.ref_model or cfg.model, cfg.model)
    reward_engine, reward_fn, rm_tok = None, None, None
    if cfg.reward.model:
        rm = load_scalar_model(cfg.reward.model, pad_token_id=pad)
        disable_dropout(rm, cfg.dropout)
        reward_engine = make_engine(rm, cfg.engine, None, trainable=False)
        other = load_tokenizer(cfg.reward.model)
        rm_tok = None if other.get_vocab() == tok.get_vocab() else other
    else:
        reward_fn = load_reward_fn(cfg.reward.fn)
    scorer = Scorer(cfg.reward, reward_engine, reward_fn, tok, rm_tok, eos_ids(tok, policy_model))
    critic = None
    if cfg.advantage_kind.needs_critic:
        if cfg.critic_from_reward_model and rm_tok is not None:
            raise ConfigError("config key 'critic.init': the reward model's tokenizer differs from the policy's; use critic.init=policy")
        critic_model = load_scalar_model(cfg.reward.model if cfg.critic_from_reward_model else cfg.model, pad_token_id=pad)
        disable_dropout(critic_model, cfg.dropout)
        critic_optim = dataclasses.replace(cfg.optim, lr=cfg.critic.lr or cfg.optim.lr)
        critic = make_engine(critic_model, cfg.engine, critic_optim, total_steps=optim_steps)
    rollout = make_rollout(cfg.rollout.backend, policy, tok)

    # the critic's first step stands for its old-value pass when it covers the whole batch in this process
    fuse_values = (critic is not None and cfg.critic.fuse_value_pass == "auto" and critic.in_process
                   and (cfg.ppo.minibatch_size == 0 or cfg.ppo.minibatch_size >= rows))
    kl_ctl = AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive else FixedKLController(cfg.kl.coef)
    engines = {"policy": policy} | ({"value": critic} if critic is not None else {})
    sampler, step, state = sampler_and_step(cfg, ckpt, engines, len(prompt_ids))
    rollbacks, in_a_row, first_reward = state.get("rollbacks", 0), state.get("rollbacks_in_a_row", 0), state.get("first_reward")
    if state:
        kl_ctl.load_state_dict(state["kl_controller"])
        rollout.update_weights(policy.named_parameters())
    tracker = Tracker(out, cfg.track, to_dict(cfg), steps, "ppo", resume=cfg.resume)
    tracker.event(f"ppo: {len(prompt_ids)} prompts, {steps} iterations of {cfg.batch_size} x {cfg.samples_per_prompt} responses, advantage={cfg.advantage}")

    metrics: dict[str, float] = {}
    recent: list[float] = []
    while step < steps:
        t_iter = time.perf_counter()
        # 1-4. rollout, score, forward passes, advantages
        idx = [i for i in sampler.next() for _ in range(cfg.samples_per_prompt)]  # G copies, contiguous
        batch = collate_prompts([prompt_ids[i] for i in idx], pad, [texts[i] for i in idx], idx)
        exp, metrics, ro, raw = make_experience(batch, rollout, policy, ref, critic, scorer, cfg, kl_ctl.value, fuse_values)

        # 5. update, 6. guarded
        t = time.perf_counter()
        snap = {name: e.snapshot() for name, e in engines.items()} if cfg.ppo.rollback else None
        update, exp = ppo_update(exp, policy, critic, cfg, step)
        metrics |= update
        bad = metrics["guard/nonfinite"] > 0
        if cfg.kl.max > 0 and not bad:
            metrics["guard/kl_after_update"] = kl_after_update(policy, exp, cfg)
            bad = metrics["guard/kl_after_update"] > cfg.kl.max
        why = "non-finite loss/gradient" if metrics["guard/nonfinite"] else "KL to reference above kl.max"
        rolled_back = bad and snap is not None
        if rolled_back:
            for name, e in engines.items():
                e.restore(snap[name])
            rollbacks += 1
            tracker.event(f"ppo: iteration {step + 1}: update rolled back ({why})")
        in_a_row = in_a_row + 1 if rolled_back else 0
        if cfg.ppo.max_rollbacks and in_a_row >= cfg.ppo.max_rollbacks and cfg.ppo.on_rollbacks == "lower_lr":
            for e in engines.values():  # before this iteration's checkpoint, so that a resume continues from here
                e.scale_lr(0.5)
            tracker.event(f"ppo: {in_a_row} updates in a row rolled back ({why}): learning rates halved")
            in_a_row = 0
        del snap
        rollout.update_weights(policy.named_parameters())
        metrics["timing/update"] = time.perf_counter() - t
        kl_ctl.update(metrics["objective/kl"], len(exp))
        step += 1

        metrics["timing/iteration"] = time.perf_counter() - t_iter
        metrics |= {"guard/rollbacks": rollbacks, "guard/rolled_back": float(bad)} | _peak_memory_mb(policy.device)
        if first_reward is None:
            first_reward = metrics["rewards/raw_mean"]
        recent = (recent + [metrics["rewards/raw_mean"]])[-5:]
        tracker.log(step, metrics, force=step == steps)
        if cfg.sample_every and (step % cfg.sample_every == 0 or step == 1 or step == steps):
            _log_samples(tracker, out, step, ro, raw, cfg.num_samples)
        if cfg.save_every and step % cfg.save_every == 0 or step == steps:
            ckpt.save(step, engines, {"sampler": sampler.state_dict(), "kl_controller": kl_ctl.state_dict(), "rollbacks": rollbacks,
                                      "rollbacks_in_a_row": in_a_row, "first_reward": first_reward}, to_dict(cfg))
        if cfg.ppo.max_rollbacks and in_a_row >= cfg.ppo.max_rollbacks:  # on_rollbacks=stop (lower_lr reset it)
            tracker.close()
            raise RunStopped(f"{in_a_row} updates in a row were rolled back ({why}), {rollbacks} in {step} iterations: the policy is not "
                             f"training, so the run stopped. Lower optim.lr, raise kl.max, set ppo.on_rollbacks=lower_lr, or ppo.max_rollbacks=0 to go on")
    tracker.close()
    policy.save_model(out / "final", tok)
    if critic is not None:
        critic.save_model(out / "value", tok)
        # marks the folder as a trained scalar model, so load_scalar_model keeps its head
        save_reward_stats(out / "value", 0.0, 1.0, {"kind": "critic"})
    summary = {
        "stage": "ppo", "steps": step, "reward_first": first_reward, "reward_last5": sum(recent) / max(len(recent), 1),
        "rollbacks": rollbacks, **{k: v for k, v in metrics.items() if k.startswith(("rewards/", "objective/", "timing/", "memory/", "speed/"))},
    }
    write_summary(out, summary)
    tracker.event(f"ppo: raw reward {first_reward:.4g} -> {summary['reward_last5']:.4g} (mean of last {len(recent)}), KL/seq {metrics.get('objective/kl', 0):.4g}, rollbacks {rollbacks}")
    return summary


def _log_samples(tracker: Tracker, out, step: int, ro: RolloutBatch, raw: Tensor, n: int) -> None:
    from tether.ranks import is_main

    if not is_main():  # under torchrun, rank 0 writes for everyone
        return
    rows = [{"step": step, "prompt": p, "response": r, "reward": float(s)} for p, r, s in list(zip(ro.prompts, ro.responses, raw.tolist()))[:n]]
    with open(out / "samples.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    for r in rows:
        tracker.event(f"[sample @{step}] reward={r['reward']:.3g} | {r['prompt'][-60:]!r} -> {r['response'][:120]!r}")


def main(argv: list[str]) -> int:
    return cli_main(PPOConfig, train, argv, "tether ppo", __doc__.strip().splitlines()[0])
