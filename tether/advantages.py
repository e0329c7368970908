"""Reward shaping and advantage estimators as pure functions of tensors.

Shapes: B sequences, R response tokens, G samples per prompt (B = num_prompts * G, grouped
contiguously: rows [i*G, (i+1)*G) share prompt i).
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor

from tether.losses import masked_mean, masked_whiten


class Advantage(enum.Enum):
    GAE = "gae"  # Schulman et al. 2016 with a learned critic (PPO as in Ouyang et al. 2022)
    RLOO = "rloo"  # leave-one-out baseline over G samples (Ahmadian et al. 2024, eq. 4)
    GRPO = "grpo"  # group mean/std normalised reward (Shao et al. 2024, eq. 3)
    DR_GRPO = "dr_grpo"  # group mean baseline, no std division (Dr. GRPO, Liu et al. 2025)
    REINFORCE = "reinforce"  # returns-to-go, whitened over the batch (REINFORCE++, Hu 2025)
    REINFORCE_BASELINE = "reinforce_baseline"  # returns-to-go minus the group's mean return (REINFORCE++-baseline, Hu 2025)
    REMAX = "remax"  # returns-to-go minus the greedy response's reward (ReMax, Li et al. 2023, Algorithm 1)

    @property
    def needs_critic(self) -> bool:
        return self is Advantage.GAE

    @property
    def needs_groups(self) -> bool:
        return self in (Advantage.RLOO, Advantage.GRPO, Advantage.DR_GRPO, Advantage.REINFORCE_BASELINE)

    @property
    def per_token(self) -> bool:  # returns-to-go of the per-token rewards rather than one value per sequence
        return self in (Advantage.REINFORCE, Advantage.REINFORCE_BASELINE, Advantage.REMAX)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last 1 in each row of a [B, R] right-padded mask (0 for an empty row)."""
    lengths = mask.long().sum(-1)
    return (lengths - 1).clamp(min=0)


def kl_shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards r_t = -beta * kl_t, plus the sequence score on the last response token
    (Ziegler et al. 2019, eq. 2; Stiennon et al. 2020, eq. 1).

    scores [B], kl [B, R] (per-token estimate), mask [B, R] -> (rewards [B, R], non_score [B, R]).
    """
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    idx = last_token_index(mask)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), idx] += scores.to(rewards.dtype)
    return rewards * mask, non_score


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), right-to-left.

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; V after the last valid
    token is 0 (the episode ends there). rewards/values/mask [B, R] -> (advantages, returns) [B, R],
    returns = advantages + values (the critic's regression target).
    """
    B, R = rewards.shape
    values = values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(R)):
        next_v = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]  # 0 past the end, so A_{L} = 0 there
        adv[:, t] = last
    returns = adv + values
    return adv * mask, returns * mask


def whiten_advantages(adv: Tensor, mask: Tensor) -> Tensor:
    """Normalise advantages to zero mean and unit variance over valid tokens (implementation detail #7)."""
    return masked_whiten(adv, mask, shift_mean=True) * mask


def group_advantages(scores: Tensor, group_size: int, kind: Advantage, eps: float = 1e-6) -> Tensor:
    """Sequence-level advantages from G samples per prompt. scores [B] -> [B].

    rloo: A_i = s_i - mean_{j != i} s_j;  grpo: A_i = (s_i - mean(s)) / (std(s) + eps);
    dr_grpo: A_i = s_i - mean(s) (Liu et al. 2025: the std division weighs near-uniform groups up).
    """
    if scores.shape[0] % group_size:
        raise ValueError(f"batch of {scores.shape[0]} is not a multiple of group size {group_size}")
    s = scores.float().view(-1, group_size)
    if kind is Advantage.RLOO:
        if group_size < 2:
            raise ValueError("RLOO needs at least 2 samples per prompt")
        baseline = (s.sum(1, keepdim=True) - s) / (group_size - 1)
        return (s - baseline).view(-1)
    if kind is Advantage.GRPO:
        std = s.std(1, keepdim=True) if group_size > 1 else torch.ones_like(s)
        return ((s - s.mean(1, keepdim=True)) / (std + eps)).view(-1)
    if kind is Advantage.DR_GRPO:
        return (s - s.mean(1, keepdim=True)).view(-1)
    raise ValueError(f"{kind} is not a group estimator")


def reinforce_advantages(rewards: Tensor, mask: Tensor, baseline: Tensor | None = None, gamma: float = 1.0) -> Tensor:
    """REINFORCE with returns-to-go (Williams 1992): A_t = sum_{s>=t} gamma^(s-t) r_s - b, one baseline b per
    sequence [B] (None = 0). rewards/mask [B, R] -> [B, R]. REINFORCE++ (Hu 2025, section 3) uses no b and
    whitens A over the batch; REINFORCE++-baseline takes b = the mean return of the prompt's group; ReMax
    (Li et al. 2023, Algorithm 1) b = the reward of the prompt's greedy response. GAE with V = 0, lambda = 1."""
    adv = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)[0]
    return adv if baseline is None else (adv - baseline.to(adv.dtype)[:, None]) * mask


def uniform_groups(scores: Tensor, group_size: int) -> Tensor:
    """[B] -> [B] bool: True on every row of a group whose G scores are all equal. DAPO's dynamic sampling
    (Yu et al. 2025, section 3.2: keep 0 < #correct < G) drops them: their group advantage is 0."""
    s = scores.view(-1, group_size)
    return (s == s[:, :1]).all(1).repeat_interleave(group_size)


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, section 3.4): 0 up to max_len - buffer tokens, then
    falling linearly to -1 at max_len. lengths [B] -> [B]."""
    return (((max_len - buffer) - lengths.float()) / buffer).clamp(-1.0, 0.0)


def combine_rewards(scores: Tensor, weights: Tensor, group_size: int = 0, eps: float = 1e-6) -> Tensor:
    """Several rewards -> one: sum_k w_k s_k. scores [K, B], weights [K] -> [B].

    group_size > 0 (GDPO, Liu et al. 2026): each reward is first normalised within each prompt's group of
    group_size contiguous samples, (s - mean_g) / (std_g + eps), so that a reward with a wide range does
    not drown the others and each keeps its own ranking inside the group before they are summed.
    """
    s = scores.float()
    if group_size:
        if s.shape[1] % group_size or group_size < 2:
            raise ValueError(f"batch of {s.shape[1]} is not a multiple of a group size >= 2 (got {group_size})")
        g = s.view(s.shape[0], -1, group_size)
        s = ((g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True) + eps)).view_as(s)
    return (weights.float()[:, None] * s).sum(0)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[G - V] / Var[G] over valid tokens (1 = perfect critic, <= 0 = no better than a constant)."""
    var_g = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return 1 - var_d / var_g.clamp(min=1e-8)


class _Value:
    """A coefficient `value` that a checkpoint saves and restores (the loop state of PPO's controllers)."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(_Value):
    """Adaptive KL coefficient (Ziegler et al. 2019, section 2.2):
    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + K_beta e), K_beta = n_steps / horizon.
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        err = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + err * n_steps / self.horizon


class FixedKLController(_Value):
    def __init__(self, coef: float):
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


def lagrangian_advantages(reward_adv: Tensor, cost_adv: Tensor, lam: float) -> Tensor:
    """PPO-Lagrangian's combined advantage (Dai et al. 2023, "Safe RLHF"): (A_r - lambda A_c) / (1 + lambda);
    the 1 + lambda keeps its scale from growing with the multiplier."""
    return (reward_adv - lam * cost_adv) / (1 + lam)


class LagrangeMultiplier(_Value):
    """lambda >= 0 for the constraint E[cost] <= threshold, by projected gradient ascent on the Lagrangian
    (Ray et al. 2019; Dai et al. 2023): lambda <- clip(lambda + lr (mean cost - threshold), 0, max).
    It rises while the constraint is violated and falls to 0 once it is kept with room to spare."""

    def __init__(self, init: float, lr: float, threshold: float, max_value: float = 0.0):
        self.value, self.lr, self.threshold, self.max_value = init, lr, threshold, max_value

    def update(self, mean_cost: float) -> None:
        v = max(0.0, self.value + self.lr * (mean_cost - self.threshold))
        self.value = min(v, self.max_value) if self.max_value > 0 else v
