"""Direct preference optimisation: fit the policy to preference pairs without a reward model
(Rafailov et al. 2023), with conservative DPO (label smoothing), IPO, hinge, length-regularised DPO,
and the reference-free SimPO and ORPO as loss options.

    tether dpo --config configs/dpo.yaml
    tether dpo model=runs/sft/final data.train=prefs.jsonl data.eval_fraction=0.05 out=runs/dpo beta=0.1
    tether dpo model=runs/sft/final data.train=prefs.jsonl out=runs/simpo loss=simpo beta=2 gamma=0.5

Reads the same preference files as `tether rm`. The reference model's sequence logprobs are computed
once per example before training and cached in the run folder (ref_logps.pt), so training runs only
the policy: chosen and rejected as one concatenated [2B, T] forward pass. Logged: loss, implicit
reward accuracy and margin, chosen/rejected implicit rewards and logprobs, on train and held-out pairs.
A loss that needs no reference (simpo, orpo) loads none and runs no reference pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from tether.algo.common import load_tokenized, sampler_and_step, should, start_run, write_summary
from tether.checkpoint import atomic_torch_save
from tether.cli import cli_main
from tether.config import RunConfig, check, doc, to_dict
from tether.engine import make_engine, make_reference
from tether.losses import DPOLoss, dpo_loss
from tether.models import causal_logprobs, disable_dropout, load_causal_lm
from tether.ranks import barrier
from tether.track import Tracker

REF_CACHE = "ref_logps.pt"


@dataclass(frozen=True)
class DPOConfig(RunConfig):
    ref_model: str = doc("", "frozen reference model folder (empty = the initial policy, `model`)")
    beta: float = doc(0.1, "beta: strength of the implicit KL constraint (DPO eq. 7; IPO's tau); SimPO's reward scale "
                      "(its paper uses 2-2.5); ORPO's lambda, the weight of the odds-ratio term beside the SFT loss")
    loss: Literal["sigmoid", "ipo", "hinge", "rdpo", "simpo", "orpo"] = doc(
        "sigmoid", "sigmoid (DPO), ipo (Azar et al. 2023), hinge (SLiC-HF), rdpo (DPO with a length penalty, Park et al. 2024), "
        "simpo (Meng et al. 2024: length-normalised, no reference), orpo (Hong et al. 2024: SFT + odds ratio, no reference)")
    label_smoothing: float = doc(0.0, "conservative DPO: assumed probability that a label is flipped (sigmoid loss only)")
    gamma: float = doc(0.5, "SimPO's target reward margin gamma (loss=simpo)")
    alpha: float = doc(0.0, "R-DPO's length penalty alpha, times (chosen - rejected) response tokens inside the sigmoid (loss=rdpo)")
    nll_coef: float = doc(0.0, "RPO (Pang et al. 2024): add nll_coef x the chosen response's per-token NLL to the loss, so the model also learns to write "
                          "the chosen replies (TRL's rpo_alpha; the paper uses 1.0; not with loss=orpo, which has its own SFT term)")

    def validate(self, p: str = "") -> None:
        super().validate(p)
        check(self.beta > 0, f"{p}beta", "must be positive")
        check(0 <= self.label_smoothing < 0.5, f"{p}label_smoothing", "must be in [0, 0.5)")
        check(self.label_smoothing == 0 or self.loss == "sigmoid", f"{p}label_smoothing", "only applies to loss=sigmoid")
        check(self.alpha == 0 or self.loss == "rdpo", f"{p}alpha", "only applies to loss=rdpo")
        check(self.nll_coef >= 0, f"{p}nll_coef", "must be >= 0")
        check(self.nll_coef == 0 or self.loss != "orpo", f"{p}nll_coef", "loss=orpo has its own NLL term (beta weighs the other one)")
        check(self.kind.needs_reference or not self.ref_model, f"{p}ref_model", f"loss={self.loss} uses no reference model")

    @property
    def kind(self) -> DPOLoss:
        return DPOLoss(self.loss)


def pair_logps(model, batch, length_normalised: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence logprobs of chosen and rejected responses in one [2B, T] forward pass -> ([B], [B]).

    Summed over response tokens, or averaged when length_normalised (IPO).
    """
    ids, attn, mask = batch.stacked()  # [2B, T]
    # targets: the LM head runs on response tokens only; [2B, T], column t = log p(x_t | x_<t)
    B = batch.chosen_input_ids.shape[0]
    lp, _ = causal_logprobs(model, ids, attn, targets=mask, groups=batch.groups())  # packed: a pair's prompt once
    seq = (lp * mask).sum(-1)
    if length_normalised:
        seq = seq / mask.sum(-1).clamp(min=1)
    return seq[:B], seq[B:]


def dpo_loss_fn(cfg: DPOConfig, num_pairs: float):
    """The DPO-family loss on a micro-batch of PairBatch with cached reference logprobs."""
    norm = cfg.kind.length_normalised
    return lambda model, mb: pair_loss(cfg, pair_logps(model, mb, norm), mb, num_pairs)


def pair_loss(cfg: DPOConfig, logps: tuple[torch.Tensor, torch.Tensor], mb, num_pairs: float):
    """dpo_loss with this config's options; ref logprobs are None for a loss that needs no reference."""
    length_diff = mb.chosen_loss_mask.sum(-1) - mb.rejected_loss_mask.sum(-1)  # [B] response tokens (R-DPO)
    return dpo_loss(*logps, mb.ref_chosen_logps, mb.ref_rejected_logps, num_pairs, cfg.beta, cfg.kind, cfg.label_smoothing,
                    cfg.gamma, cfg.alpha, length_diff.to(logps[0].device), cfg.nll_coef, mb.chosen_loss_mask.sum(-1).to(logps[0].device))


def reference_logps(engine, items, pad: int, batches: list[list[int]], length_normalised: bool) -> torch.Tensor:
    """[N, 2] reference logprobs (chosen, rejected) of the items in `batches`, each at its first batch (others
    NaN). Given the training batches, this pass has the training pass's shapes, so that below float32 (where
    a product's rounding depends on its shape) an unmoved policy's margin is exactly 0, as in float32."""
    from tether.data import collate_pairs

    ref = torch.full((len(items), 2), float("nan"))
    for chunk in batches:
        new = torch.isnan(ref[chunk, 0])
        if new.any():
            c, r = engine.forward(collate_pairs([items[i] for i in chunk], pad), lambda m, b: pair_logps(m, b, length_normalised))
            ref[torch.tensor(chunk)[new]] = torch.stack([c.float().cpu(), r.float().cpu()], 1)[new]
    return ref


def batches_to_visit(n: int, batch_size: int, seed: int, shuffle: bool, steps: int) -> list[list[int]]:
    """The batches `steps` draws of the (deterministic) sampler give, up to the one that completes the set."""
    from tether.data.loader import BatchSampler

    s, out, seen = BatchSampler(n, batch_size, seed, shuffle), [], set()
    while len(out) < steps and len(seen) < n:
        out.append(s.next())
        seen.update(out[-1])
    return out


def make_batch(items, ref: torch.Tensor | None, idx: list[int], pad: int):
    from tether.data import collate_pairs

    batch = collate_pairs([items[i] for i in idx], pad)
    if ref is not None:
        batch.ref_chosen_logps, batch.ref_rejected_logps = ref[idx, 0], ref[idx, 1]  # [B], [B]
    return batch


def evaluate(engine, items, ref: torch.Tensor | None, pad: int, cfg: DPOConfig, prefix: str = "eval") -> dict[str, float]:
    """Loss and implicit-reward metrics over all `items`, pair-weighted."""
    totals: dict[str, float] = {}
    n = len(items)
    for s in range(0, n, cfg.eval_batch_size):
        idx = list(range(s, min(s + cfg.eval_batch_size, n)))
        batch = make_batch(items, ref, idx, pad)
        c, r = engine.forward(batch, lambda m, b: pair_logps(m, b, cfg.kind.length_normalised))
        _, m = pair_loss(cfg, (c.cpu(), r.cpu()), batch, len(idx))
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + float(v) * len(idx)
    return {f"{prefix}/{k.replace('/', '_')}": v / max(n, 1) for k, v in totals.items()}


def reference_cache(cfg: DPOConfig, engine, out, train_items, eval_items, pad: int, steps: int):
    """Reference logprobs, once per example -> (train [N, 2], eval [M, 2], seconds). With ref_model = model
    the initial policy *is* the reference, so no second model is loaded; the cache makes a resumed run skip this pass."""
    t = time.perf_counter()
    cache = out / REF_CACHE
    key = {"ref": cfg.ref_model or cfg.model, "loss": cfg.loss, "n": (len(train_items), len(eval_items)), "max_length": cfg.data.max_length}
    # Only the pairs this run will train on: a 50-step run of batch 8 needs 400 of them, not the whole set.
    visit = batches_to_visit(len(train_items), cfg.batch_size, cfg.seed, cfg.data.shuffle, steps)
    chunks = lambda idx: [idx[s : s + cfg.eval_batch_size] for s in range(0, len(idx), cfg.eval_batch_size)]  # noqa: E731
    # every rank looks before rank 0 may write it below: a late rank that found the new file would skip the write's barrier
    cached = torch.load(cache, weights_only=False) if barrier(cache.exists()) else None
    if cached is not None and cached["key"] == key:
        ref_train, ref_eval = cached["train"], cached["eval"]
        missing = sorted({i for b in visit for i in b if bool(torch.isnan(ref_train[i]).any())})
        if missing:  # resumed with more steps: the policy has moved, so top up from the reference on disk
            fresh = make_reference(engine, cfg.engine, cfg.ref_model or cfg.model, cfg.model)
            ref_train[missing] = reference_logps(fresh, train_items, pad, chunks(missing), cfg.kind.length_normalised)[missing]
            del fresh  # the cache file keeps what the first run computed (a resume never rewrites it)
    else:
        ref_engine = engine if not cfg.ref_model or cfg.ref_model == cfg.model else make_reference(engine, cfg.engine, cfg.ref_model, cfg.model)
        norm = cfg.kind.length_normalised
        ref_train = reference_logps(ref_engine, train_items, pad, visit, norm)
        ref_eval = reference_logps(ref_engine, eval_items, pad, chunks(list(range(len(eval_items)))), norm)
        del ref_engine
        atomic_torch_save({"key": key, "train": ref_train, "eval": ref_eval}, cache)
    return ref_train, ref_eval, time.perf_counter() - t


def train(cfg: DPOConfig) -> dict:
    from tether.data import load_preferences, tokenize_pairs

    out, ckpt = start_run(cfg, "dpo")
    tok, train_items, eval_items, report, pad, steps = load_tokenized(cfg, load_preferences, tokenize_pairs)

    model = load_causal_lm(cfg.model)
    disable_dropout(model, cfg.dropout)
    engine = make_engine(model, cfg.engine, cfg.optim, total_steps=steps)

    # simpo and orpo have no reference: no second model, no reference pass, no cache
    ref_train, ref_eval, ref_seconds = reference_cache(cfg, engine, out, train_items, eval_items, pad, steps) if cfg.kind.needs_reference else (None, None, 0.0)

    sampler, step, _ = sampler_and_step(cfg, ckpt, {"policy": engine}, len(train_items))
    tracker = Tracker(out, cfg.track, to_dict(cfg), steps, "dpo", resume=cfg.resume, start_step=step)
    ref_note = f"reference logprobs in {ref_seconds:.1f}s" if cfg.kind.needs_reference else "no reference model"
    tracker.event(f"dpo: {len(train_items)} train / {len(eval_items)} eval pairs, {steps} steps, loss={cfg.loss} beta={cfg.beta}, "
                  f"{ref_note}, {report.truncated} truncated")

    metrics: dict[str, float] = {}
    while step < steps:
        t0 = time.perf_counter()
        batch = make_batch(train_items, ref_train, sampler.next(), pad)
        num_pairs = engine.global_sum(float(len(batch)))
        metrics = engine.train_step(batch, dpo_loss_fn(cfg, num_pairs))
        step += 1
        dt = time.perf_counter() - t0
        tokens = float(batch.chosen_attention_mask.sum() + batch.rejected_attention_mask.sum())
        metrics |= {"speed/pairs_per_s": len(batch) / dt, "speed/tokens_per_s": tokens / dt}
        if eval_items and should(cfg.eval_every, step, steps):
            metrics |= evaluate(engine, eval_items, ref_eval, pad, cfg)
        tracker.log(step, metrics, force=step == steps)
        if should(cfg.save_every, step, steps):
            ckpt.save(step, {"policy": engine}, {"sampler": sampler.state_dict()}, to_dict(cfg))
    tracker.close()
    engine.save_model(out / "final", tok)
    return write_summary(out, {"stage": "dpo", "steps": step, **{k: v for k, v in metrics.items() if k.startswith(("eval/", "loss/", "rewards/"))}})


def main(argv: list[str]) -> int:
    return cli_main(DPOConfig, train, argv, "tether dpo", __doc__.strip().splitlines()[0])
