"""PPO against a reward model with a KL leash to a frozen reference (Ziegler et al. 2019; Stiennon et
al. 2020; Ouyang et al. 2022), with the clipped objective of Schulman et al. 2017.

    tether ppo --config configs/ppo.yaml
    tether ppo model=runs/sft/final reward.model=runs/rm/final data.train=prompts.jsonl out=runs/ppo max_steps=100
    tether ppo model=runs/sft/final reward.fn=tether.rewards:word_fraction critic.init=policy ...

Each iteration (one `max_steps` step):
  1. rollout    sample a response for each of `batch_size` prompts (x samples_per_prompt)
  2. score      reward model (normalised with `tether rm`'s statistics) or a Python reward function;
                optional clipping and a penalty for responses that never reached EOS
  3. forward    old-policy logprobs, reference logprobs, values (from the critic's first update step
                when it covers the whole batch: critic.fuse_value_pass); per-token KL penalty in the
                reward r_t = -beta KL_t (+ score on the last token); beta fixed or adaptive (Ziegler 2.2)
  4. advantage  GAE(gamma, lambda) with the critic, or without one (algo=grpo, rloo, remax ...: rl_config.ALGOS)
                a group baseline or REINFORCE returns-to-go minus a baseline; whitening
  5. update     `ppo.epochs` passes over shuffled minibatches: clipped policy loss (+ entropy bonus),
                clipped value loss, gradient clipping; stop early when approx KL > ppo.target_approx_kl
  6. guard      a non-finite loss/gradient, or KL to the reference above kl.max, rolls the iteration's
                updates back to a copy taken before it (ppo.rollback)
With a cost (cost.model or cost.fn) the run is PPO-Lagrangian (Safe RLHF, Dai et al. 2023): the cost is
scored in step 2, a cost critic gives its own GAE advantages in step 4, the multiplier lambda follows the
batch's mean cost against cost.threshold, and the policy's advantage is (A_r - lambda A_c) / (1 + lambda).
The defaults follow "The N+ implementation details of RLHF with PPO" (Huang et al. 2024) and
lm-human-preferences (Ziegler et al. 2019). `make_experience` and `ppo_update` are the per-iteration
pieces; a distributed controller calls the same two functions with remote engines.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import Tensor

from tether.advantages import (AdaptiveKLController, Advantage, FixedKLController, LagrangeMultiplier, explained_variance, gae, group_advantages, kl_shaped_rewards,
                               lagrangian_advantages, overlong_penalty, reinforce_advantages, uniform_groups, whiten_advantages)
from tether.algo.common import require_examples, sampler_and_step, start_run, total_steps, write_summary
from tether.algo.reward import RewardConfig, Rewards, Scorer
from tether.algo.rl_config import PPOConfig
from tether.cli import cli_main
from tether.config import ConfigError, RunStopped, to_dict
from tether.engine import make_engine, make_reference
from tether.losses import KLEstimator, LossAgg, entropy_bonus, kl_estimate, kl_loss, loss_normaliser, masked_mean, ppo_policy_loss, value_loss
from tether.models import causal_logprobs, disable_dropout, eos_ids, load_causal_lm, load_scalar_model, load_tokenizer, save_reward_stats, scalar_values
from tether.rollout import make_rollout
from tether.rollout.base import cat_rollouts
from tether.track import Tracker, peak_memory_mb
from tether.types import Experience, PromptBatch, RolloutBatch, prompt_groups

# -- One iteration's experience --------------------------------------------------------------------


def _values(model, b, R: int) -> Tensor:
    """V(s_t) for each response token t: the head on the hidden state that predicts token t. -> [B, R]"""
    return scalar_values(model, b.sequences, b.attention_mask, groups=prompt_groups(b))[:, -R - 1 : -1]


def _logprobs(R: int, temp: float, with_entropy: bool = False):
    return lambda m, b: causal_logprobs(m, b.sequences, b.attention_mask, num_response=R, temperature=temp, with_entropy=with_entropy, groups=prompt_groups(b))


def _sample_scored(prompts: PromptBatch, rollout, scorer: Rewards, cfg: PPOConfig, cost, timing: dict) -> tuple:
    """Rollout and scores of one prompt batch -> (rollout, raw rewards, scores with DAPO's overlong
    penalty, costs or None, ReMax's greedy baseline or None, metrics)."""
    t = time.perf_counter()
    ro = rollout.generate(prompts, cfg.rollout).to("cpu")
    timing["timing/rollout"] = timing.get("timing/rollout", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    raw, scores, metrics = scorer.score(ro)
    costs = cost[0].raw(ro) if cost is not None else None
    G, baseline, buf = cfg.samples_per_prompt, None, cfg.overlong_buffer
    length_penalty = lambda r: cfg.overlong_penalty * overlong_penalty(r.response_mask.sum(-1), cfg.rollout.max_new_tokens, buf) if buf else 0.0  # noqa: E731 (DAPO)
    if cfg.advantage_kind is Advantage.REMAX:  # ReMax's baseline: the reward of one greedy response per prompt, shaped alike
        greedy = rollout.generate(prompts.select(list(range(0, len(prompts), G))), dataclasses.replace(cfg.rollout, temperature=0.0)).to("cpu")
        _, baseline, m = scorer.score(greedy)
        baseline, metrics["rewards/greedy_raw_mean"] = (baseline + length_penalty(greedy)).repeat_interleave(G), m["rewards/raw_mean"]
    if buf:
        penalty = length_penalty(ro)
        scores, metrics["rewards/overlong_penalty"] = scores + penalty, float(penalty.mean())
    timing["timing/score"] = timing.get("timing/score", 0.0) + time.perf_counter() - t
    return ro, raw, scores, costs, baseline, metrics


def make_experience(prompts: PromptBatch, rollout, policy, ref, critic, scorer: Rewards, cfg: PPOConfig, kl_coef: float,
                    fuse_values: bool = False, cost: tuple | None = None, more=None, pad_id: int = 0,
                    fuse_logprobs: bool = False) -> tuple[Experience, RolloutBatch, dict[str, float], dict[str, float] | None]:
    """Rollout, score, forward passes, KL-shaped rewards, values and advantages. -> (experience, the rollout,
    metrics, and with fuse_values the metrics of the critic's first update step, whose forward gave the
    old values: `fused_value_step`). fuse_logprobs: the rewards do not depend on the old-policy logprobs
    (KL in the loss, or none), so unless the sampler's are exact they are left (None) to the policy's first
    update step, whose forward gives them before any update (`ppo_update`). cost = (the cost's Scorer, the cost critic or None): the experience
    also carries the costs and their own advantages (combined with lambda by the caller). more: returns
    the next prompt batch, for dynamic sampling's refill (pad_id pads the joined rollouts)."""
    timing: dict[str, float] = {}
    ro, raw, scores, costs, baseline, metrics = _sample_scored(prompts, rollout, scorer, cfg, cost, timing)
    G = cfg.samples_per_prompt
    if cfg.dynamic_sampling:  # DAPO: a group whose rewards are all equal carries no signal: drop it, and refill
        # from further batches (up to dynamic_sampling_batches in all) until the batch's groups are full again
        want, parts = len(raw), [(ro, raw, scores, costs, baseline)]
        signal = lambda r: int((~uniform_groups(r, G)).sum())  # noqa: E731 (rows of groups whose rewards differ)
        n = signal(raw)
        while n < want and len(parts) < cfg.dynamic_sampling_batches and more is not None:
            parts.append(_sample_scored(more(), rollout, scorer, cfg, cost, timing)[:5])
            n += signal(parts[-1][1])
        joined = [None if parts[0][i] is None else torch.cat([p[i] for p in parts]) for i in range(1, 5)]
        uniform = uniform_groups(joined[0], G)
        if n:  # those rows, in the order they were sampled, up to the batch's size
            keep = (~uniform).nonzero().view(-1)[:want]
            ro = cat_rollouts([p[0] for p in parts], pad_id).select(keep)
            raw, scores, costs, baseline = (x if x is None else x[keep] for x in joined)
        # else every group is uniform: the first batch is kept whole (its advantages are all 0)
        n_uniform = float(uniform.sum()) / G
        metrics |= {"rollout/groups_uniform": n_uniform, "rollout/groups_dropped": n_uniform if n else 0.0,
                    "rollout/sample_batches": float(len(parts)), "rollout/groups_kept": len(raw) / G}

    t = time.perf_counter()
    mask = ro.response_mask  # [B, R]
    R, temp = mask.shape[1], cfg.rollout.temperature or 1.0
    # Logprobs at the sampling temperature: the policy being optimised is the one that sampled. When the
    # sampler's own logprobs are exactly that (same module, float32, untruncated distribution) the pass
    # is skipped, as TRL does with num_iterations=1; otherwise the trainer recomputes them (or its first step does).
    reuse = cfg.rollout.reuse_logprobs == "auto" and ro.entropy is not None and getattr(rollout, "exact_logprobs", lambda s: False)(cfg.rollout)
    fused = fuse_logprobs and not reuse
    ref_logprobs = ref.forward(ro, _logprobs(R, temp))[0].cpu() * mask
    logprobs, entropy = (ro.logprobs, ro.entropy) if reuse or fused else policy.forward(ro, _logprobs(R, temp, with_entropy=True))
    logprobs, entropy = (None, None) if fused else (logprobs.cpu() * mask, entropy.cpu())

    # Per-token KL penalty in the reward (Ziegler et al. 2019, eq. 2), score on the last token.
    kl = torch.zeros_like(ref_logprobs) if fused else kl_estimate(logprobs, ref_logprobs, cfg.kl.kind) * mask  # [B, R]
    rewards, non_score = kl_shaped_rewards(scores, kl, mask, 0.0 if cfg.kl.in_loss else kl_coef)
    exp = Experience(sequences=ro.sequences, attention_mask=ro.attention_mask, response_mask=mask, logprobs=logprobs, ref_logprobs=ref_logprobs,
                     values=None, advantages=None, returns=None, prompt_length=ro.prompt_length, rewards=rewards, scores=raw, group_ids=ro.group_ids,
                     sampler_logprobs=None if reuse else ro.logprobs.cpu() * mask)
    value_step = None
    if critic is None:
        values = torch.zeros_like(ref_logprobs)
    elif fuse_values:
        values, value_step = fused_value_step(exp, critic, cfg)
    else:
        values = critic.forward(ro, lambda m, b: _values(m, b, R)).float().cpu() * mask
    if costs is not None:  # the cost's own critic and returns: the cost on the last token, no KL term
        c_values = cost[1].forward(ro, lambda m, b: _values(m, b, R)).float().cpu() * mask if cost[1] is not None else torch.zeros_like(ref_logprobs)
        c_adv, c_returns = estimate_advantages(kl_shaped_rewards(costs, torch.zeros_like(kl), mask, 0.0)[0], c_values, mask, cfg)
        exp = dataclasses.replace(exp, costs=costs, cost_values=c_values, cost_returns=c_returns, cost_advantages=c_adv)
        metrics |= {"cost/mean": float(costs.mean()), "cost/std": float(costs.std()) if len(costs) > 1 else 0.0,
                    "cost/violation_rate": float((costs > cfg.cost.threshold).float().mean())}
        if cost[1] is not None:
            metrics["cost_value/explained_variance"] = float(explained_variance(c_values, c_returns, mask))
    timing["timing/forward"] = time.perf_counter() - t
    advantages, returns = estimate_advantages(rewards, values, mask, cfg, baseline)
    if cfg.rollout.tis_cap > 0 and not reuse:  # truncated importance sampling: the tokens came from the sampler, not the trainer's policy
        tis = torch.exp(logprobs - ro.logprobs.cpu() * mask).clamp(max=cfg.rollout.tis_cap).detach() * mask
        advantages, metrics["rollout/tis_weight_mean"] = advantages * tis, float(masked_mean(tis, mask))
    exp = dataclasses.replace(exp, values=values, advantages=advantages, returns=returns)

    lengths = mask.sum(-1)
    finished = ro.finished if ro.finished is not None else torch.zeros(len(lengths), dtype=torch.bool)
    metrics |= ({} if fused else logprob_metrics(exp, entropy, cfg)) | {
        "objective/kl_coef": kl_coef,
        "objective/non_score_reward": float(non_score.sum(-1).mean()),
        "objective/total_reward": float(rewards.sum(-1).mean()),
        "rollout/logprobs_reused": float(reuse), "rollout/logprobs_fused": float(fused),
        "response/length_mean": float(lengths.mean()),
        "response/hit_max_fraction": float(((lengths >= cfg.rollout.max_new_tokens) & ~finished).float().mean()),
        "response/eos_fraction": float(finished.float().mean()),
        "speed/gen_tokens_per_s": float(lengths.sum()) / max(timing["timing/rollout"], 1e-9),
    } | timing
    if critic is not None:
        metrics |= {"value/explained_variance": float(explained_variance(values, returns, mask)), "value/mean": float(masked_mean(values, mask))}
    return exp, ro, metrics, value_step


def logprob_metrics(exp: Experience, entropy: Tensor, cfg: PPOConfig) -> dict[str, float]:
    """The old policy's KL to the reference per sequence and per token (k1, k2, k3), its entropy, and, when
    its logprobs are not the sampler's, the sampler's drift from them (0 up to rounding for the hf sampler)."""
    lp, ref, mask = exp.logprobs, exp.ref_logprobs, exp.response_mask
    m = {"objective/kl": float(kl_estimate(lp, ref, KLEstimator.K1).mul(mask).sum(-1).mean()),  # per sequence
         **{f"objective/kl{n}_token": float(masked_mean(kl_estimate(lp, ref, k), mask)) for n, k in (("", KLEstimator.K1), ("_k2", KLEstimator.K2), ("_k3", KLEstimator.K3))},
         "policy/entropy": float(masked_mean(entropy, mask))}
    if exp.sampler_logprobs is not None:
        drift = (exp.sampler_logprobs - lp).abs() * mask
        m |= {"rollout/logprob_drift": float(masked_mean(drift, mask)), "rollout/logprob_drift_max": float(drift.max()),
              "rollout/logprob_drift_share": float(masked_mean((drift > cfg.rollout.drift_tolerance).float(), mask))}
    return m


def estimate_advantages(rewards: Tensor, values: Tensor, mask: Tensor, cfg: PPOConfig, baseline: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """GAE(gamma, lambda) with the critic, a group baseline (RLOO / GRPO / Dr. GRPO) on the whole-sequence
    KL-shaped return, or returns-to-go minus a per-sequence baseline (REINFORCE++: none; its baseline form:
    the group's mean return; ReMax: `baseline`, the greedy reward); whitened over the batch when
    ppo.whiten_advantages. -> (advantages, returns) [B, R]."""
    kind, G = cfg.advantage_kind, cfg.samples_per_prompt
    if kind.needs_critic:
        advantages, returns = gae(rewards, values, mask, cfg.ppo.gamma, cfg.ppo.lam)
    elif kind.per_token:
        baseline = rewards.sum(-1).view(-1, G).mean(1).repeat_interleave(G) if kind is Advantage.REINFORCE_BASELINE else baseline
        advantages, returns = reinforce_advantages(rewards, mask, baseline, cfg.ppo.gamma), torch.zeros_like(rewards)
    else:
        advantages, returns = group_advantages(rewards.sum(-1), cfg.samples_per_prompt, kind)[:, None] * mask, torch.zeros_like(rewards)
    return (whiten_advantages(advantages, mask) if cfg.ppo.whiten_advantages else advantages), returns


def fused_value_step(exp: Experience, critic, cfg: PPOConfig) -> tuple[Tensor, dict[str, float]]:
    """The critic's first update step over the whole batch, whose forward also gives the old values: before
    any update they are exactly what a separate no-grad pass would compute. GAE is per row, so each
    micro-batch gets its returns from its own values; the value clip is inactive (values == old). The
    engine hands the values back with the step's metrics. -> (values [B, R], the step's metrics)."""
    num_tokens = critic.global_sum(float(exp.response_mask.sum()))

    def loss_fn(model, mb: Experience):
        values = _values(model, mb, mb.response_mask.shape[1])
        v_old = values.detach().float() * mb.response_mask
        _, returns = gae(mb.rewards, v_old, mb.response_mask, cfg.ppo.gamma, cfg.ppo.lam)
        loss, metrics = value_loss(values, v_old, returns, mb.response_mask, num_tokens, cfg.ppo.value_clip)
        return cfg.ppo.vf_coef * loss, metrics, v_old

    metrics, values = critic.train_step(exp, loss_fn)
    return values, metrics


# -- The update ------------------------------------------------------------------------------------


def policy_loss_fn(cfg: PPOConfig, num_tokens: float, num_seqs: float = 1.0, kl_coef: float | None = None, fused: bool = False):
    """Clipped surrogate (+ KL term with kl.in_loss, + entropy bonus) on a micro-batch of Experience,
    aggregated by ppo.loss_agg over the whole batch's num_tokens / num_seqs. fused: the first step before any
    update, whose own logprobs are the old ones (ratio 1); it hands them back with their entropy [B, R, 2]."""
    temp, coef, beta = cfg.rollout.temperature or 1.0, cfg.ppo.entropy_coef, cfg.kl.coef if kl_coef is None else kl_coef

    def loss_fn(model, mb: Experience):
        new_logprobs, ent = _logprobs(mb.response_mask.shape[1], temp, with_entropy=coef > 0 or fused and "detached")(model, mb)
        norm = loss_normaliser(mb.response_mask, LossAgg(cfg.ppo.loss_agg), num_tokens, num_seqs, cfg.rollout.max_new_tokens)
        old = new_logprobs.detach() if fused else mb.logprobs
        loss, metrics = ppo_policy_loss(new_logprobs, old, mb.advantages, mb.response_mask, norm, cfg.ppo.clip, cfg.ppo.clip_high, cfg.ppo.ratio == "sequence")
        if cfg.kl.in_loss and beta > 0:
            kl, m = kl_loss(new_logprobs, mb.ref_logprobs, mb.response_mask, norm, beta, cfg.kl.kind)
            loss, metrics = loss + kl, metrics | m
        if coef > 0:
            bonus, m = entropy_bonus(ent, mb.response_mask, num_tokens, coef)
            loss, metrics = loss + bonus, metrics | {"policy/entropy_update": m["policy/entropy"]}
        return (loss, metrics, torch.stack([old, ent.detach()], -1)) if fused else (loss, metrics)

    return loss_fn


def value_loss_fn(cfg: PPOConfig, num_tokens: float):
    """Clipped value loss, scaled by ppo.vf_coef, on a micro-batch of Experience."""

    def loss_fn(model, mb: Experience):
        values = _values(model, mb, mb.response_mask.shape[1])
        loss, metrics = value_loss(values, mb.values, mb.returns, mb.response_mask, num_tokens, cfg.ppo.value_clip)
        return cfg.ppo.vf_coef * loss, metrics

    return loss_fn


def ppo_update(exp: Experience, policy, critic, cfg: PPOConfig, iteration: int, value_step: dict[str, float] | None = None,
               cost_critic=None, kl_coef: float | None = None) -> dict[str, float]:
    """ppo.epochs passes over shuffled minibatches; early stop on approx KL; stops at a non-finite step.

    The shuffle is seeded by (seed, iteration), so a resumed run draws the same minibatches. value_step:
    the critic's step of the first (whole-batch) minibatch, already taken by make_experience (fused).
    cost_critic: fitted to the cost returns with the same value loss (metrics cost_value/*). kl_coef: beta
    of a KL term in the loss (kl.in_loss; the adaptive controller's value). Old-policy logprobs left to this
    update (make_experience's fuse_logprobs) come from the first step's forward, a whole-batch minibatch."""
    n, fused = len(exp), exp.logprobs is None
    mbs = cfg.ppo.minibatch_size or n
    assert not fused or mbs >= n, "the old-policy logprobs are left to a first step that covers the whole batch"
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration)
    parts: list[dict[str, float]] = []
    early = bad = False
    for epoch in range(cfg.ppo.epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, mbs):
            mb = exp if fused else exp.select(perm[s : s + mbs])
            num_tokens = policy.global_sum(float(mb.response_mask.sum()))
            m = policy.train_step(mb, policy_loss_fn(cfg, num_tokens, policy.global_sum(float(len(mb))), kl_coef, fused))
            if fused:  # the step's own logprobs, before its update, are the old policy's from here on
                m, out = m
                exp, fused = dataclasses.replace(exp, logprobs=out[..., 0] * exp.response_mask), False
                m |= logprob_metrics(exp, out[..., 1], cfg)
            m = {f"{k}_policy" if k.startswith("optim/") else k: v for k, v in m.items()}
            if critic is not None:
                mv = value_step if value_step is not None and epoch == 0 else critic.train_step(mb, value_loss_fn(cfg, num_tokens))
                m |= {f"{k}_value" if k.startswith("optim/") else k: v for k, v in mv.items()}
            if cost_critic is not None:
                mc = cost_critic.train_step(dataclasses.replace(mb, values=mb.cost_values, returns=mb.cost_returns), value_loss_fn(cfg, num_tokens))
                m |= {f"{k}_cost_value" if k.startswith("optim/") else k.replace("value", "cost_value", 1): v for k, v in mc.items()}
            parts.append(m)
            bad = any(k.startswith("optim/skipped") and v > 0 for k, v in m.items()) or not all(math.isfinite(v) for v in m.values())
            early = not bad and cfg.ppo.target_approx_kl > 0 and m["policy/approx_kl"] > cfg.ppo.target_approx_kl
            if bad or early:
                break
        if bad or early:
            break
    keys = {k for p in parts for k in p}
    out = {k: sum(p[k] for p in parts if k in p) / sum(k in p for p in parts) for k in keys}
    out |= {"ppo/epochs": epoch + 1, "ppo/minibatch_steps": len(parts), "ppo/early_stop": float(early), "guard/nonfinite": float(bad)}
    return out | ({"value/fused_pass": float(value_step is not None)} if critic is not None else {})


@torch.no_grad()
def kl_after_update(policy, exp: Experience, cfg: PPOConfig) -> float:
    """KL per sequence of the updated policy to the reference on the batch's tokens (k3, always >= 0)."""
    lp, _ = policy.forward(exp, _logprobs(exp.response_mask.shape[1], cfg.rollout.temperature or 1.0))
    return float((kl_estimate(lp.cpu(), exp.ref_logprobs, KLEstimator.K3) * exp.response_mask).sum(-1).mean())


# -- The loop --------------------------------------------------------------------------------------


def train(cfg: PPOConfig) -> dict:
    from tether.data import collate_prompts, load_prompts, pad_id, prompt_text, tokenize_prompts

    out, ckpt = start_run(cfg, "ppo")
    tok = load_tokenizer(cfg.model)
    if not cfg.data.train:
        raise ConfigError("config key 'data.train': required (a prompt file)")
    prompts, report = load_prompts(cfg.data.train, cfg.data.on_bad_record)
    kept: list[int] = []
    prompt_ids = require_examples(tokenize_prompts(prompts, tok, cfg.data, report, kept), cfg, report)
    texts, fields = [prompt_text(prompts[i].prompt) for i in kept], [prompts[i].meta for i in kept]  # fields: for reward.fn
    pad = pad_id(tok)
    steps = total_steps(cfg, len(prompt_ids))
    rows = min(cfg.batch_size, len(prompt_ids)) * cfg.samples_per_prompt
    optim_steps = steps * cfg.ppo.epochs * math.ceil(rows / (cfg.ppo.minibatch_size or rows))  # for the LR schedule

    # policy (trained), ref (frozen), critic (trained, unless a group baseline), reward (frozen model or fn)
    policy_model = load_causal_lm(cfg.model)
    disable_dropout(policy_model, cfg.dropout)
    policy = make_engine(policy_model, cfg.engine, cfg.optim, total_steps=optim_steps)
    ref = make_reference(policy, cfg.engine, cfg.ref_model or cfg.model, cfg.model)
    frozen = sum(bool(m) for m in (cfg.reward.model, cfg.cost.model, *(s.model for s in cfg.reward.sources)))
    if cfg.engine.backend == "ray" and (frozen > 1 or (cfg.cost.enabled and cfg.advantage_kind.needs_critic)):
        raise ConfigError("config key 'engine.backend': ray places one reward model and one critic; several reward models or a cost critic need backend=local or ddp")
    scorer = Rewards.build(cfg.reward, cfg.engine, tok, pad, eos_ids(tok, policy_model), cfg.dropout, cfg.samples_per_prompt)
    coster = Scorer.build(RewardConfig(model=cfg.cost.model, fn=cfg.cost.fn, kwargs=cfg.cost.kwargs), cfg.engine, tok, pad, eos_ids(tok, policy_model),
                          cfg.dropout, what="cost.model") if cfg.cost.enabled else None

    def make_critic(init: str, rm_tok, lr: float, what: str):
        if init != cfg.model and rm_tok is not None:
            raise ConfigError(f"config key 'critic.init': the {what} model's tokenizer differs from the policy's; use critic.init=policy")
        model = load_scalar_model(init, pad_token_id=pad)
        disable_dropout(model, cfg.dropout)
        return make_engine(model, cfg.engine, dataclasses.replace(cfg.optim, lr=lr), total_steps=optim_steps)

    critic = cost_critic = None
    if cfg.advantage_kind.needs_critic:  # each critic starts from its scorer's model (Ouyang et al. 2022) unless critic.init=policy
        critic = make_critic(cfg.reward.model if cfg.critic_from_reward_model else cfg.model, scorer.rm_tok, cfg.critic.lr or cfg.optim.lr, "reward")
        if coster is not None:
            init = cfg.cost.model if cfg.cost.model and cfg.critic.init != "policy" else cfg.model
            cost_critic = make_critic(init, coster.rm_tok, cfg.cost.critic_lr or cfg.critic.lr or cfg.optim.lr, "cost")
    rollout = make_rollout(cfg.rollout.backend, policy, tok)
    # the critic's first step stands for its old-value pass when it covers the whole batch, and the policy's for
    # its old-logprob pass when the rewards do not depend on them (KL in the loss, or none; no importance weights)
    whole = cfg.ppo.minibatch_size == 0 or cfg.ppo.minibatch_size >= rows
    fuse_values = critic is not None and cfg.critic.fuse_value_pass == "auto" and whole
    fuse_logprobs = cfg.rollout.reuse_logprobs == "auto" and whole and cfg.rollout.tis_cap == 0 and (cfg.kl.in_loss or (cfg.kl.coef == 0 and not cfg.kl.adaptive))
    kl_ctl = AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive else FixedKLController(cfg.kl.coef)
    engines = {"policy": policy} | ({"value": critic} if critic is not None else {}) | ({"cost_value": cost_critic} if cost_critic is not None else {})
    lagrange = LagrangeMultiplier(cfg.cost.lambda_init, cfg.cost.lambda_lr, cfg.cost.threshold, cfg.cost.lambda_max)
    sampler, step, state = sampler_and_step(cfg, ckpt, engines, len(prompt_ids))
    rollbacks, in_a_row, first_reward = state.get("rollbacks", 0), state.get("rollbacks_in_a_row", 0), state.get("first_reward")
    if state:
        kl_ctl.load_state_dict(state["kl_controller"])
        lagrange.load_state_dict(state.get("lagrange", {"value": cfg.cost.lambda_init}))
        rollout.update_weights(policy.named_parameters())
    tracker = Tracker(out, cfg.track, to_dict(cfg), steps, "ppo", resume=cfg.resume, start_step=step)
    tracker.event(f"ppo: {len(prompt_ids)} prompts, {steps} iterations of {cfg.batch_size} x {cfg.samples_per_prompt} responses, algo={cfg.algo}, advantage={cfg.advantage}")

    def next_prompts() -> PromptBatch:  # the sampler's next batch_size prompts, each samples_per_prompt times
        idx = [i for i in sampler.next() for _ in range(cfg.samples_per_prompt)]
        return collate_prompts([prompt_ids[i] for i in idx], pad, [texts[i] for i in idx], [fields[i] for i in idx])

    metrics: dict[str, float] = {}
    recent: list[float] = []
    while step < steps:
        t_iter = time.perf_counter()
        snap = {name: e.snapshot() for name, e in engines.items()} if cfg.ppo.rollback else None  # 6. the guard's copy
        # 1-4. rollout, score, forward passes, advantages (G copies of each prompt, contiguous)
        exp, ro, metrics, value_step = make_experience(next_prompts(), rollout, policy, ref, critic, scorer, cfg, kl_ctl.value, fuse_values,
                                                   (coster, cost_critic) if coster is not None else None, next_prompts, pad, fuse_logprobs)
        if exp.costs is not None:  # lambda follows this batch's cost, then weighs the cost advantage (Safe RLHF)
            lagrange.update(float(exp.costs.mean()))
            exp = dataclasses.replace(exp, advantages=lagrangian_advantages(exp.advantages, exp.cost_advantages, lagrange.value))
            metrics["lagrange/lambda"] = lagrange.value
        # 5. update, 6. guarded
        t = time.perf_counter()
        metrics |= ppo_update(exp, policy, critic, cfg, step, value_step, cost_critic, kl_ctl.value)
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
        t_push = time.perf_counter()
        rollout.update_weights(policy.named_parameters())
        metrics["timing/weight_push"] = time.perf_counter() - t_push
        kl_ctl.update(metrics["objective/kl"], len(exp))
        step += 1

        metrics |= {"timing/update": time.perf_counter() - t, "timing/iteration": time.perf_counter() - t_iter,
                    "guard/rollbacks": rollbacks, "guard/rolled_back": float(bad)} | peak_memory_mb(policy.device)
        first_reward = metrics["rewards/raw_mean"] if first_reward is None else first_reward
        recent = (recent + [metrics["rewards/raw_mean"]])[-5:]
        tracker.log(step, metrics, force=step == steps)
        if cfg.sample_every and (step % cfg.sample_every == 0 or step == 1 or step == steps):
            rs = list(zip(ro.prompts, ro.responses, exp.scores.tolist()))[: cfg.num_samples]
            tracker.samples(step, [{"prompt": p, "response": r, "reward": s} for p, r, s in rs])
        if cfg.save_every and step % cfg.save_every == 0 or step == steps:
            ckpt.save(step, engines, {"sampler": sampler.state_dict(), "kl_controller": kl_ctl.state_dict(), "lagrange": lagrange.state_dict(), "rollbacks": rollbacks,
                                      "rollbacks_in_a_row": in_a_row, "first_reward": first_reward}, to_dict(cfg))
        if cfg.ppo.max_rollbacks and in_a_row >= cfg.ppo.max_rollbacks:  # on_rollbacks=stop (lower_lr reset it)
            tracker.close()
            raise RunStopped(f"{in_a_row} updates in a row were rolled back ({why}), {rollbacks} in {step} iterations: the policy is not "
                             f"training, so the run stopped. Lower optim.lr, raise kl.max, set ppo.on_rollbacks=lower_lr, or ppo.max_rollbacks=0 to go on")
    tracker.close()
    policy.save_model(out / "final", tok)
    if critic is not None:
        critic.save_model(out / "value", tok)
        save_reward_stats(out / "value", 0.0, 1.0, {"kind": "critic"})  # marks a trained scalar model: load_scalar_model keeps its head
    summary = {
        "stage": "ppo", "steps": step, "reward_first": first_reward, "reward_last5": sum(recent) / max(len(recent), 1),
        "rollbacks": rollbacks, **{k: v for k, v in metrics.items() if k.startswith(("rewards/", "objective/", "cost/", "lagrange/", "timing/", "memory/", "speed/"))},
    }
    write_summary(out, summary)
    tracker.event(f"ppo: raw reward {first_reward:.4g} -> {summary['reward_last5']:.4g} (mean of last {len(recent)}), KL/seq {metrics.get('objective/kl', 0):.4g}, rollbacks {rollbacks}")
    return summary


def main(argv: list[str]) -> int:
    return cli_main(PPOConfig, train, argv, "tether ppo", __doc__.strip().splitlines()[0])
