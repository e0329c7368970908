"""Every loss as a pure function of tensors. No models, no configs, no I/O, no torch.distributed.

Each loss returns `(loss, metrics)` where `metrics` holds detached scalar tensors. Metrics named
`loss/*` are partial sums under the global normaliser (the engine adds them over micro-batches);
all other metrics are means over the micro-batch (the engine averages them, weighted by size). Token-level
losses take an explicit normaliser (`num_tokens`, usually the token count of the *global* batch),
so the result does not change with micro-batching or data-parallel sharding: a loss summed over
micro-batches with the global normaliser equals the loss over the whole batch.

Shapes: B batch, T sequence, R response.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import Tensor

Metrics = dict[str, Tensor]


# -- Masked reductions -----------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over positions where mask is 1 (0 if the mask is empty)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over masked positions; with shift_mean=False the mean is added back."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


# -- Log-probabilities -----------------------------------------------------------------------------


def token_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0, chunk: int | None = None) -> Tensor:
    """log softmax(logits / temperature)[labels], [B, T, V] -> [B, T] float32, value and gradient (tested).

    One autograd node that keeps each row's logsumexp; its backward writes g * (onehot - softmax) straight into
    one gradient of the logits' dtype, `chunk` rows at a time (default 8 MB of float32, which stays in cache),
    with no full-size float32 copy, saved log-softmax or zero-filled gradient (benchmarks/README)."""
    B, T, V = logits.shape
    return _TokenLogprobs.apply(logits.reshape(B * T, V), labels.reshape(B * T), temperature, chunk or max(1, (1 << 21) // V)).view(B, T)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float, rows: int) -> Tensor:
        out = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for s in range(0, len(logits), rows):
            x = logits[s : s + rows].float() / temperature
            lse[s : s + rows] = torch.logsumexp(x, -1)
            out[s : s + rows] = x.gather(1, labels[s : s + rows, None])[:, 0] - lse[s : s + rows]  # out-of-range label: error
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature, ctx.rows = temperature, rows
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, labels, lse = ctx.saved_tensors
        g = grad.float()[:, None] / ctx.temperature
        out = torch.empty_like(logits)
        for s in range(0, len(logits), ctx.rows):
            p = (logits[s : s + ctx.rows].float() / ctx.temperature).sub_(lse[s : s + ctx.rows, None]).exp_()  # softmax
            out[s : s + ctx.rows] = p.mul_(-g[s : s + ctx.rows]).scatter_add_(1, labels[s : s + ctx.rows, None], g[s : s + ctx.rows])
        return out, None, None, None


def entropy_from_logits(logits: Tensor, chunk: int = 1024) -> Tensor:
    """Entropy of softmax(logits) per position: [B, T, V] -> [B, T] float32."""
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)
    out = torch.empty(B * T, dtype=torch.float32, device=logits.device)
    for s in range(0, B * T, chunk):
        rows = flat[s : s + chunk].float()
        p = torch.softmax(rows, -1)
        out[s : s + chunk] = torch.logsumexp(rows, -1) - (p * rows).sum(-1)
    return out.view(B, T)


# -- Supervised fine-tuning ------------------------------------------------------------------------


def sft_loss(token_logps: Tensor, loss_mask: Tensor, num_tokens: float) -> tuple[Tensor, Metrics]:
    """Negative log-likelihood of the target tokens, summed and divided by the global token count.

    token_logps [B, T] (log p of each target token), loss_mask [B, T].
    """
    loss = -(token_logps * loss_mask).sum() / num_tokens
    return loss, {"loss/sft": loss.detach()}


# -- Reward model ----------------------------------------------------------------------------------


def bradley_terry_loss(
    r_chosen: Tensor, r_rejected: Tensor, num_pairs: float, margin: Tensor | None = None
) -> tuple[Tensor, Metrics]:
    """Bradley-Terry pairwise loss, -log sigma(r_c - r_r - m) (Ouyang et al. 2022, eq. 1;
    the margin m is Llama 2's, Touvron et al. 2023, eq. 2). r_* [B]; returns the sum / num_pairs.
    """
    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    losses = -F.logsigmoid(diff)
    loss = losses.sum() / num_pairs
    raw = (r_chosen - r_rejected).detach().float()
    return loss, {
        "loss/rm": loss.detach(),
        "rm/accuracy": (raw > 0).float().mean(),
        "rm/margin": raw.mean(),
        "rm/chosen": r_chosen.detach().float().mean(),
        "rm/rejected": r_rejected.detach().float().mean(),
    }


def cost_model_loss(c_safer: Tensor, c_unsafer: Tensor, safety: Tensor | None, num_pairs: float) -> tuple[Tensor, Metrics]:
    """Safe RLHF's cost-model loss (Dai et al. 2023, "Safe RLHF"): -log sigma(c_u - c_s) - sum_y log sigma(s_y c_y),
    s_y = +1 for an unsafe response and -1 for a safe one (0 = unlabelled: no sign term), so that unsafe
    responses score above 0 and safe ones below. c_* [B], safety [B, 2] (safer, unsafer); sum / num_pairs.
    """
    cs, cu = c_safer.float(), c_unsafer.float()
    pair = -F.logsigmoid(cu - cs)
    sign = torch.zeros_like(pair)
    if safety is not None:
        s = safety.float()
        sign = -(F.logsigmoid(s[:, 0] * cs) * (s[:, 0] != 0) + F.logsigmoid(s[:, 1] * cu) * (s[:, 1] != 0))
    loss = (pair + sign).sum() / num_pairs
    raw = (cu - cs).detach()
    m = {"loss/rm": loss.detach(), "rm/accuracy": (raw > 0).float().mean(), "rm/margin": raw.mean()}
    if safety is not None:  # over the labelled responses of the micro-batch (0 when none is)
        m["rm/sign_accuracy"] = sign_accuracy(torch.cat([cs, cu]).detach(), torch.cat([safety[:, 0], safety[:, 1]]))
    return loss, m


def sign_accuracy(costs: Tensor, signs: Tensor) -> Tensor:
    """Share of labelled responses (sign +1 unsafe, -1 safe; 0 unlabelled, not counted) whose cost is on
    their side of 0; 0 when none is labelled."""
    s = signs.float()
    return (((costs > 0) == (s > 0)) & (s != 0)).float().sum() / (s != 0).sum().clamp(min=1)


def multi_objective_loss(r_chosen: Tensor, r_rejected: Tensor, labels: Tensor, num_judgments: float) -> tuple[Tensor, Metrics]:
    """Bradley-Terry per objective for a K-head reward model: sum over labelled (pair b, head k) of
    -log sigma(l_bk (r_c,bk - r_r,bk)), l = +1 when chosen is better on objective k, -1 when rejected is,
    0 = no judgment (left out). r_* and labels [B, K]; the sum / num_judgments (the labelled count).
    """
    diff = r_chosen.float() - r_rejected.float()  # [B, K]
    judged = labels != 0
    loss = torch.where(judged, -F.logsigmoid(labels.float() * diff), torch.zeros_like(diff)).sum() / num_judgments
    right = ((labels * diff.detach()) > 0) & judged
    per_head = right.float().sum(0) / judged.sum(0).clamp(min=1)  # [K], 0 for a head with no judgment here
    return loss, {"loss/rm": loss.detach(), "rm/accuracy": right.float().sum() / judged.sum().clamp(min=1),
                  **{f"rm/head{k}_accuracy": per_head[k] for k in range(labels.shape[1])}}


# -- DPO family ------------------------------------------------------------------------------------


class DPOLoss(enum.Enum):
    """Which preference-optimisation loss; the members answer the loop's questions."""

    SIGMOID = "sigmoid"  # DPO, Rafailov et al. 2023, eq. 7 (with label smoothing: cDPO, Mitchell 2023)
    IPO = "ipo"  # Azar et al. 2023, eq. 17
    HINGE = "hinge"  # SLiC-HF, Zhao et al. 2023, eq. 2
    RDPO = "rdpo"  # length-regularised DPO (R-DPO), Park et al. 2024 (arXiv:2403.19159), its regularised objective
    SIMPO = "simpo"  # Meng et al. 2024 (arXiv:2405.14734), eq. 6: no reference model
    ORPO = "orpo"  # Hong et al. 2024 (arXiv:2403.07691), eq. 6-7: no reference model

    @property
    def length_normalised(self) -> bool:
        # IPO is defined on average per-token log-ratios in the reference implementations; SimPO's reward
        # and ORPO's odds are on the average per-token logprob by definition.
        return self in (DPOLoss.IPO, DPOLoss.SIMPO, DPOLoss.ORPO)

    @property
    def needs_reference(self) -> bool:
        return self not in (DPOLoss.SIMPO, DPOLoss.ORPO)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    num_pairs: float,
    beta: float = 0.1,
    kind: DPOLoss = DPOLoss.SIGMOID,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    alpha: float = 0.0,
    length_diff: Tensor | None = None,
    nll_coef: float = 0.0,
    chosen_tokens: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """Preference loss on sequence log-probabilities (all [B]); returns the sum / num_pairs.

    h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))   (ref = 0 for simpo and orpo)
    sigmoid: -(1-eps) log sigma(beta h) - eps log sigma(-beta h)     (DPO eq. 7; cDPO for eps > 0)
    ipo:     (h - 1/(2 beta))^2                                       (IPO eq. 17)
    hinge:   max(0, 1 - beta h)                                       (SLiC)
    rdpo:    -log sigma(beta h - alpha (|y_c| - |y_r|))               (R-DPO; length_diff = |y_c| - |y_r| in tokens)
    simpo:   -log sigma(beta h - gamma), log pi averaged per token     (SimPO eq. 6)
    orpo:    -log pi(y_c) - beta log sigma(log odds(y_c) - log odds(y_r)), odds(y) = pi(y) / (1 - pi(y)),
             log pi averaged per token; the first term is the SFT loss, beta is ORPO's lambda (ORPO eq. 6-7)
    nll_coef > 0 adds RPO's term to any of them: nll_coef * -log pi(y_c) / |y_c| (Pang et al. 2024, eq. 3;
    chosen_tokens = |y_c|, not needed where log pi is already averaged per token).
    Implicit rewards are beta * (log pi - log ref) (DPO section 5; SimPO's eq. 4 and ORPO's without ref).
    """
    chosen_ratio, rejected_ratio = policy_chosen_logps, policy_rejected_logps
    if ref_chosen_logps is not None:
        chosen_ratio, rejected_ratio = chosen_ratio - ref_chosen_logps, rejected_ratio - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    extra: Metrics = {}
    if kind is DPOLoss.SIGMOID:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind is DPOLoss.IPO:
        losses = (h - 1 / (2 * beta)) ** 2
    elif kind is DPOLoss.HINGE:
        losses = torch.relu(1 - beta * h)
    elif kind is DPOLoss.RDPO:
        losses = -F.logsigmoid(beta * h - alpha * length_diff)
    elif kind is DPOLoss.SIMPO:
        losses = -F.logsigmoid(beta * h - gamma)
    elif kind is DPOLoss.ORPO:
        # log odds = log p - log(1 - p); log(1 - p) = log(-expm1(log p)) stays finite for log p < 0
        log_odds = h - (torch.log(-torch.expm1(policy_chosen_logps)) - torch.log(-torch.expm1(policy_rejected_logps)))
        nll = -policy_chosen_logps
        losses = nll - beta * F.logsigmoid(log_odds)
        extra = {"loss/nll": nll.sum().detach() / num_pairs, "orpo/log_odds_ratio": log_odds.detach().mean()}
    else:  # pragma: no cover - exhaustive enum
        raise ValueError(kind)
    if nll_coef:
        nll_c = -policy_chosen_logps if kind.length_normalised else -policy_chosen_logps / chosen_tokens.clamp(min=1)
        losses = losses + nll_coef * nll_c
        extra["loss/rpo_nll"] = nll_c.sum().detach() / num_pairs
    loss = losses.sum() / num_pairs
    rc, rr = (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()
    return loss, {
        "loss/dpo": loss.detach(),
        "rewards/chosen": rc.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/accuracy": (rc > rr).float().mean(),
        "rewards/margin": (rc - rr).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
        **extra,
    }


def kto_loss(
    policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, z0: float, num_examples: float,
    beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
) -> tuple[Tensor, Metrics]:
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, sec. 4.1) on unpaired examples (all [B]; desirable bool); the sum / num_examples.

    r = log pi(y|x) - log ref(y|x); z0 = the reference point, a constant here (the loop estimates it as
    max(0, mean r) over mismatched prompt/completion pairs of the batch and does not backpropagate it);
    v = lambda_D sigma(beta (r - z0)) for a desirable y, lambda_U sigma(beta (z0 - r)) for an undesirable one;
    loss = lambda_y - v.
    """
    r = policy_logps - ref_logps
    w = torch.where(desirable, desirable_weight, undesirable_weight)
    v = w * torch.sigmoid(torch.where(desirable, beta * (r - z0), beta * (z0 - r)))
    loss = (w - v).sum() / num_examples
    rew = (beta * r).detach()
    d, u = desirable.float(), (~desirable).float()
    return loss, {
        "loss/kto": loss.detach(),
        "kto/z0": torch.as_tensor(float(z0)),
        # share of examples whose implicit reward lies on their label's side of the reference point
        "rewards/accuracy": ((r.detach() > z0) == desirable).float().mean(),
        "rewards/desirable": (rew * d).sum() / d.sum().clamp(min=1),
        "rewards/undesirable": (rew * u).sum() / u.sum().clamp(min=1),
        "logps/mean": policy_logps.detach().mean(),
    }


# -- KL estimators (Schulman 2020, "Approximating KL divergence"), per token -----------------------


class KLEstimator(enum.Enum):
    K1 = "k1"  # log r, unbiased, high variance, can be negative
    K2 = "k2"  # (log r)^2 / 2, biased, low variance
    K3 = "k3"  # (r - 1) - log r with r = ref/pi, unbiased and always >= 0
    ABS = "abs"  # |log r|


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: KLEstimator = KLEstimator.K1) -> Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi. Inputs [B, R] -> [B, R]."""
    log_ratio = logprobs.float() - ref_logprobs.float()
    if kind is KLEstimator.K1:
        return log_ratio
    if kind is KLEstimator.K2:
        return 0.5 * log_ratio**2
    if kind is KLEstimator.K3:
        return torch.expm1(-log_ratio) + log_ratio
    if kind is KLEstimator.ABS:
        return log_ratio.abs()
    raise ValueError(kind)  # pragma: no cover


# -- PPO -------------------------------------------------------------------------------------------


class LossAgg(enum.Enum):
    TOKEN = "token"  # every token weighs the same: sum / the batch's tokens (DAPO, Yu et al. 2025, section 3.3)
    SEQUENCE = "sequence"  # each sequence's token mean, then the mean over sequences (GRPO, Shao et al. 2024, eq. 3)
    CONSTANT = "constant"  # sum / (sequences x max_new_tokens): no length normalisation (Dr. GRPO, Liu et al. 2025)


def loss_normaliser(mask: Tensor, agg: LossAgg, num_tokens: float, num_seqs: float, max_len: int) -> float | Tensor:
    """The divisor of a token loss's sum under `agg`: a number, or one per sequence [B, 1]. num_tokens and
    num_seqs count the whole batch (every micro-batch and rank), so the loss does not change with the split."""
    if agg is LossAgg.TOKEN:
        return num_tokens
    if agg is LossAgg.SEQUENCE:
        return mask.sum(-1, keepdim=True).clamp(min=1) * num_seqs
    return float(num_seqs * max_len)


def ppo_policy_loss(
    new_logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    num_tokens: float | Tensor,
    clip_eps: float = 0.2,
    clip_high: float = 0.0,
    seq_ratio: bool = False,
) -> tuple[Tensor, Metrics]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), per token, summed / num_tokens (a number
    or per sequence [B, 1]: loss_normaliser).

    L = -min(rho A, clip(rho, 1-eps, 1+eps_high) A), rho = exp(new - old). All inputs [B, R]. clip_high > 0:
    DAPO's clip-higher, eps_high != eps (Yu et al. 2025, section 3.1). seq_ratio: GSPO's one ratio per
    sequence, s_i = exp(mean_t (new - old)) (Zheng et al. 2025), on each of its tokens.
    """
    log_ratio = new_logprobs - old_logprobs
    if seq_ratio:
        log_ratio = masked_mean(log_ratio, mask, -1)[:, None].expand_as(log_ratio)
    ratio = torch.exp(log_ratio)
    surr1 = ratio * advantages
    surr2 = torch.clamp(ratio, 1 - clip_eps, 1 + (clip_high or clip_eps)) * advantages
    losses = -torch.min(surr1, surr2)
    loss = (losses * mask / num_tokens).sum()
    with torch.no_grad():
        clipped = (surr2 < surr1).float()
        # approx KL(old || new) with the k3 estimator on the minibatch (Schulman 2020)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, {
        "loss/policy": loss.detach(),
        "policy/clipfrac": masked_mean(clipped, mask),
        "policy/approx_kl": approx_kl,
        "policy/ratio": masked_mean(ratio.detach(), mask),
    }


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, num_tokens: float | Tensor, coef: float,
            kind: KLEstimator = KLEstimator.K3) -> tuple[Tensor, Metrics]:
    """beta KL(pi || ref) as a loss term rather than a reward penalty, the per-token estimate summed /
    num_tokens like the policy loss (GRPO, Shao et al. 2024, eq. 3 with the k3 estimator of eq. 4;
    REINFORCE++-baseline, Hu 2025, with k2). Inputs [B, R]; the gradient flows through logprobs."""
    kl = kl_estimate(logprobs, ref_logprobs, kind)
    loss = coef * (kl * mask / num_tokens).sum()
    return loss, {"loss/kl": loss.detach(), "policy/kl_ref": masked_mean(kl.detach(), mask)}


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, num_tokens: float, clip_eps: float = 0.2
) -> tuple[Tensor, Metrics]:
    """Clipped value loss 0.5 max((V - G)^2, (clip(V, V_old +- eps) - G)^2) (Ziegler et al. 2019's
    implementation; 'PPO implementation details' #9). clip_eps <= 0 disables clipping. Inputs [B, R].
    """
    sq = (values - returns) ** 2
    if clip_eps > 0:
        clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        sq_clipped = (clipped - returns) ** 2
        losses = 0.5 * torch.max(sq, sq_clipped)
        clipfrac = masked_mean((sq_clipped > sq).float(), mask)
    else:
        losses = 0.5 * sq
        clipfrac = torch.zeros((), device=values.device)
    loss = masked_sum(losses, mask) / num_tokens
    return loss, {"loss/value": loss.detach(), "value/clipfrac": clipfrac.detach()}


def entropy_bonus(entropy: Tensor, mask: Tensor, num_tokens: float, coef: float) -> tuple[Tensor, Metrics]:
    """-coef * mean entropy (a bonus: minimising it raises entropy)."""
    ent = masked_sum(entropy, mask) / num_tokens
    return -coef * ent, {"policy/entropy": masked_mean(entropy.detach(), mask)}
