"""Reward model: the LM with a scalar head, trained with the Bradley-Terry loss -log sigma(r_c - r_r).

    tether rm model=runs/sft/final data.train=prefs.jsonl data.eval=held_out.jsonl out=runs/rm max_steps=100
    tether rm loss=cost model=runs/sft/final data.train=safety_pairs.jsonl out=runs/cost

loss=cost trains a Safe RLHF cost model (Dai et al. 2023) from pairs whose `chosen` is the safer response,
with optional chosen_safe / rejected_safe labels: the unsafer response costs more, and labelled unsafe
responses cost above 0, safe ones below. Its scores are saved unshifted (0 is the safe/unsafe boundary),
and its accuracy is the fraction of pairs where the unsafer response costs more.

heads=[helpful,harmless] trains one model with a head per objective from pairs that carry `labels`
({helpful: 1, harmless: -1}: chosen is the more helpful, rejected the more harmless); each head is a
Bradley-Terry model of its own judgments, reported per head, and a reward source (`reward.sources`
entries take `head: harmless`). Separate reward models are separate `tether rm` runs.

The head reads the hidden state of the last non-padding token of prompt+response. Reported on
train and held-out pairs: loss, accuracy, mean margin. At the end the mean and standard deviation
of the model's scores on the training responses are saved next to it (`tether_reward.json`) so
later stages can normalise rewards. The saved folder loads in tether and in transformers'
AutoModelForSequenceClassification (num_labels=1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from tether.algo.common import load_tokenized, sampler_and_step, should, start_run, write_summary
from tether.cli import cli_main
from tether.config import RunConfig, check, doc, to_dict
from tether.engine import make_engine
from tether.data.records import DataError
from tether.losses import bradley_terry_loss, cost_model_loss, multi_objective_loss, sign_accuracy
from tether.models import disable_dropout, load_scalar_model, save_reward_stats, sequence_scores
from tether.track import Tracker


@dataclass(frozen=True)
class RMConfig(RunConfig):
    loss: Literal["bradley_terry", "cost"] = doc("bradley_terry", "bradley_terry: a reward model; cost: a Safe RLHF cost model (chosen = the safer response; chosen_safe / rejected_safe labels add the sign term)")
    use_margin: bool = doc(False, "subtract each pair's `margin` field inside the sigmoid (Llama 2's margin term)")
    center_coef: float = doc(0.0, "auxiliary coef * (r_c + r_r)^2 that keeps scores centred at 0 (0 = off)")
    stats_pairs: int = doc(256, "training pairs scored after training for the reward mean/std (and train/* metrics), at most as many as were trained on; 0 = all")
    keep_best: bool = doc(False, "keep the weights of the evaluation (every eval_every steps) with the best held-out accuracy (early stopping)")
    heads: list[str] = doc([], "one head per named objective, trained on each pair's `labels` (e.g. [helpful, harmless]); [] = one head from the chosen/rejected order")

    def validate(self, p: str = "") -> None:
        super().validate(p)
        check(len(set(self.heads)) == len(self.heads), f"{p}heads", f"each head needs its own name; got {self.heads}")
        check(all(h.replace("_", "").replace("-", "").isalnum() for h in self.heads), f"{p}heads", "names are letters, digits, _ or -")
        check(not self.heads or (self.loss == "bradley_terry" and not self.use_margin), f"{p}heads",
              "several heads train with loss=bradley_terry and no use_margin (the margin belongs to the pair's overall order)")
        check(self.center_coef >= 0, f"{p}center_coef", "must be >= 0")
        check(self.stats_pairs >= 0, f"{p}stats_pairs", "must be >= 0")


def pair_scores(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen and rejected in one [2B, T] forward pass -> ([B], [B])."""
    ids, mask, _ = batch.stacked()  # [2B, T]
    B = batch.chosen_input_ids.shape[0]
    scores = sequence_scores(model, ids, mask, groups=batch.groups())  # packed: a pair's prompt is computed once
    return scores[:B], scores[B:]


def _loss_fn(num_pairs: float, cfg: RMConfig):
    def loss_fn(model, mb):
        rc, rr = pair_scores(model, mb)
        if cfg.heads:  # num_pairs counts the labelled (pair, head) judgments
            loss, m = multi_objective_loss(rc, rr, mb.labels, num_pairs)
            for i, h in enumerate(cfg.heads):
                m[f"rm/{h}/accuracy"] = m.pop(f"rm/head{i}_accuracy")
            return loss, m
        if cfg.loss == "cost":
            return cost_model_loss(rc, rr, mb.safety, num_pairs)
        loss, metrics = bradley_terry_loss(rc, rr, num_pairs, mb.margin if cfg.use_margin else None)
        if cfg.center_coef > 0:
            loss = loss + cfg.center_coef * ((rc + rr) ** 2).sum() / num_pairs
        return loss, metrics

    return loss_fn


def score_pairs(engine, items, pad: int, batch_size: int, cost: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (the preferred side's scores, the other's) [N] ([N, K] with K heads); a cost model prefers the
    higher cost of `rejected`."""
    from tether.data import collate_pairs

    scored = [engine.forward(collate_pairs(items[s : s + batch_size], pad), pair_scores) for s in range(0, len(items), batch_size)]
    rc, rr = (torch.cat([sides[k].float().cpu() for sides in scored]) for k in (0, 1))
    return (rr, rc) if cost else (rc, rr)


def pair_metrics(rc: torch.Tensor, rr: torch.Tensor, prefix: str, items=None) -> dict[str, float]:
    """Pairwise loss, accuracy and margin; with a cost model's labelled items, also the fraction of labelled
    responses on the right side of 0 (sign_accuracy; rc are then the unsafer sides' costs)."""
    diff = rc - rr
    out = {f"{prefix}/loss": float(-F.logsigmoid(diff).mean()), f"{prefix}/accuracy": float((diff > 0).float().mean()),
           f"{prefix}/margin": float(diff.mean()), f"{prefix}/pairs": len(diff)}
    if items and any(it.safety for it in items):
        s = torch.tensor([it.safety or (0, 0) for it in items], dtype=torch.float)  # (safer, unsafer)
        out[f"{prefix}/sign_accuracy"] = float(sign_accuracy(torch.cat([rr, rc]), torch.cat([s[:, 0], s[:, 1]])))
    return out


def head_metrics(rc: torch.Tensor, rr: torch.Tensor, items, heads: list[str], prefix: str) -> dict[str, float]:
    """Per head, pair_metrics over the pairs labelled for it (oriented by the label); prefix/accuracy and
    prefix/loss over every labelled judgment. rc, rr [N, K]."""
    labels = torch.tensor([[(it.labels or {}).get(h, 0) for h in heads] for it in items], dtype=torch.float)  # [N, K]
    out: dict[str, float] = {}
    for k, h in enumerate(heads):
        sel = labels[:, k] != 0
        if sel.any():
            d = labels[sel, k] * (rc[sel, k] - rr[sel, k])
            out |= pair_metrics(d, torch.zeros_like(d), f"{prefix}/{h}")
    judged = labels != 0
    d = (labels * (rc - rr))[judged]
    return out | {f"{prefix}/accuracy": float((d > 0).float().mean()), f"{prefix}/loss": float(-F.logsigmoid(d).mean()), f"{prefix}/pairs": len(items)}


def _labelled(heads: list[str]):
    """load_preferences that insists every pair carries labels, for these heads only."""
    from tether.data import load_preferences

    def load(spec: str, on_bad_record: str = "error"):
        pairs, report = load_preferences(spec, on_bad_record)
        for p in pairs:
            if not p.labels:
                raise DataError(f"{p.loc}: the pair has no 'labels' ({{objective: 1 | -1 | 0}}), and heads={heads} trains on them")
            if unknown := sorted(set(p.labels) - set(heads)):
                raise DataError(f"{p.loc}: labels name {', '.join(unknown)}, not among heads={heads}")
        return pairs, report

    return load


def train(cfg: RMConfig) -> dict:
    from tether.data import collate_pairs, load_preferences, tokenize_pairs

    out, ckpt = start_run(cfg, "rm")
    cost = cfg.loss == "cost"
    heads = tuple(cfg.heads)
    tok, train_items, eval_items, report, pad, steps = load_tokenized(cfg, _labelled(cfg.heads) if heads else load_preferences, tokenize_pairs)

    def metrics_of(items, prefix: str) -> dict[str, float]:
        rc, rr = score_pairs(engine, items, pad, cfg.eval_batch_size, cost)
        return head_metrics(rc, rr, items, cfg.heads, prefix) if heads else pair_metrics(rc, rr, prefix, items)

    model = load_scalar_model(cfg.model, pad_token_id=pad, heads=cfg.heads or None)
    disable_dropout(model, cfg.dropout)
    engine = make_engine(model, cfg.engine, cfg.optim, total_steps=steps)
    sampler, step, _ = sampler_and_step(cfg, ckpt, {"reward_model": engine}, len(train_items))
    tracker = Tracker(out, cfg.track, to_dict(cfg), steps, "rm", resume=cfg.resume, start_step=step)
    tracker.event(f"rm: {len(train_items)} train / {len(eval_items)} eval pairs, {steps} steps, {report.truncated} truncated")

    metrics: dict[str, float] = {}
    best: tuple[float, float, int, Any] | None = None  # (accuracy, -loss, step, the engine's snapshot)
    while step < steps:
        t0 = time.perf_counter()
        batch = collate_pairs([train_items[i] for i in sampler.next()], pad, heads)
        num_pairs = engine.global_sum(float((batch.labels != 0).sum()) if heads else float(len(batch)))
        metrics = engine.train_step(batch, _loss_fn(num_pairs, cfg))
        step += 1
        dt = time.perf_counter() - t0
        tokens = float(batch.chosen_attention_mask.sum() + batch.rejected_attention_mask.sum())
        metrics |= {"speed/pairs_per_s": len(batch) / dt, "speed/tokens_per_s": tokens / dt}
        if eval_items and should(cfg.eval_every, step, steps):
            metrics |= metrics_of(eval_items, "eval")
            if cfg.keep_best:
                key = (metrics["eval/accuracy"], -metrics["eval/loss"])
                if best is None or key > best[:2]:
                    best = (*key, step, engine.snapshot(with_optimizer=False))
        tracker.log(step, metrics, force=step == steps)
        if should(cfg.save_every, step, steps):
            ckpt.save(step, {"reward_model": engine}, {"sampler": sampler.state_dict()}, to_dict(cfg))

    last_eval = {k: v for k, v in metrics.items() if k.startswith("eval/")}  # the last step's, on these weights
    if best is not None and best[2] != step:
        engine.restore(best[3])
        last_eval = {}
        tracker.event(f"rm: keeping the weights of step {best[2]} (held-out accuracy {best[0]:.4f}), not of step {step}")
    best_step = best[2] if best is not None else step
    best = None
    # Normalisation statistics over the training responses (chosen and rejected); a seeded sample of
    # stats_pairs pairs give a mean and a std (256: the mean within ~4% of a std); capped at the pairs trained
    # on, this forward-only pass (TRL's reward trainer has none) costs at most about a third of the training.
    stats_items, n = train_items, min(cfg.stats_pairs, max(1, step) * cfg.batch_size)
    if 0 < n < len(train_items):
        g = torch.Generator().manual_seed(cfg.seed)
        stats_items = [train_items[i] for i in torch.randperm(len(train_items), generator=g)[:n].tolist()]
    rc, rr = score_pairs(engine, stats_items, pad, cfg.eval_batch_size, cost)
    all_scores = torch.cat([rc, rr])  # [2N] or [2N, K]
    train_m = head_metrics(rc, rr, stats_items, cfg.heads, "train") if heads else pair_metrics(rc, rr, "train", stats_items)
    final = train_m | (last_eval or (metrics_of(eval_items, "eval") if eval_items else {}))
    tracker.log(step, final, force=True)
    tracker.close()
    engine.save_model(out / "final", tok)
    if heads:  # per head, in the order of the score head's outputs
        std = all_scores.std(0).clamp(min=1e-6)
        save_reward_stats(out / "final", all_scores.mean(0).tolist(), std.tolist(), {"heads": list(heads), "n": len(all_scores)})
    elif cost:  # unshifted: a cost's 0 is the safe/unsafe boundary the constraint is stated in
        save_reward_stats(out / "final", 0.0, 1.0, {"kind": "cost", "n": len(all_scores), "score_mean": float(all_scores.mean())})
    else:
        save_reward_stats(out / "final", float(all_scores.mean()), float(all_scores.std().clamp(min=1e-6)), {"n": len(all_scores)})
    summary = {"stage": "rm", "steps": step, "best_step": best_step, **final}
    write_summary(out, summary)
    tracker.event("rm: " + "  ".join(f"{k}={v:.4g}" for k, v in final.items() if not k.endswith("pairs")))
    return summary


def main(argv: list[str]) -> int:
    return cli_main(RMConfig, train, argv, "tether rm", __doc__.strip().splitlines()[0])
