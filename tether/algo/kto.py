"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on unpaired desirable / undesirable examples.

Fits the policy to thumbs-up / thumbs-down examples, without pairs or a reward model.

    tether kto model=runs/sft/final data.train=kto.jsonl data.eval_fraction=0.1 out=runs/kto beta=0.1
    tether label export --project P --format kto --threshold 4 --out kto.jsonl   (1-5 ratings as KTO records)

Records are {prompt, completion, label: true|false} (tether/data/formats.py). Each step pairs every
row's prompt with the next row's completion, the batch's mismatched pairs, and takes the reference
point z0 = max(0, mean log pi/ref) over them across the global batch, with no gradient through it
(KTO sec. 4.1). Those pairs change with every batch, so the reference model stays loaded (no logprob
cache as in DPO). Logged: loss, z0, implicit-reward accuracy (reward on its label's side of z0), the
mean implicit reward of desirable and of undesirable examples, on train and held-out examples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tether.algo.common import load_tokenized, sampler_and_step, should, start_run, write_summary
from tether.cli import cli_main
from tether.config import RunConfig, check, doc, to_dict
from tether.engine import make_reference, make_engine
from tether.losses import kto_loss
from tether.models import causal_logprobs, disable_dropout, load_causal_lm
from tether.track import Tracker
from tether.types import KTOBatch

Item = tuple[list[int], list[int], list[float], bool]  # prompt ids, completion ids, completion loss mask, desirable


@dataclass(frozen=True)
class KTOConfig(RunConfig):
    ref_model: str = doc("", "frozen reference model folder (empty = the initial policy, `model`)")
    beta: float = doc(0.1, "beta: scale of the implicit reward log pi/ref inside the value function's sigmoid (KTO sec. 4.1)")
    desirable_weight: float = doc(1.0, "lambda_D: weight of desirable examples")
    undesirable_weight: float = doc(1.0, "lambda_U: weight of undesirable examples (the paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3])")

    def validate(self, p: str = "") -> None:
        super().validate(p)
        check(self.beta > 0, f"{p}beta", "must be positive")
        check(self.desirable_weight > 0 and self.undesirable_weight > 0, f"{p}desirable_weight", "both weights must be positive")
        check(self.batch_size >= 2, f"{p}batch_size", "must be at least 2: z0 pairs each prompt with another row's completion")


def tokenize_kto(examples, tokenizer, cfg, report=None) -> list[Item]:
    """tokenize_sft's rows split where the completion starts (its first target token), with the label."""
    from tether.data import tokenize_sft

    kept: list[int] = []
    rows = tokenize_sft(examples, tokenizer, cfg, report, kept)
    out = []
    for (ids, mask), i in zip(rows, kept):
        n = mask.index(1)
        out.append((ids[:n], ids[n:], mask[n:], examples[i].label))
    return out


def seq_logps(model, mb) -> torch.Tensor:
    """Completion logprob sums [B]."""
    lp, _ = causal_logprobs(model, mb.input_ids, mb.attention_mask, targets=mb.loss_mask)
    return (lp * mb.loss_mask).sum(-1)


def make_batch(engine, ref_engine, items: list[Item], pad: int, max_length: int) -> tuple[KTOBatch, float]:
    """The batch with its reference logprobs, and the reference point z0 over the global batch."""
    from tether.data import collate_sft

    B = len(items)
    rows = collate_sft([(p + c, [0.0] * len(p) + m) for p, c, m, _ in items], pad)
    # row b's prompt with row b+1's completion: a pair the policy was never trained on (KTO sec. 4.1)
    kl = collate_sft([((p + items[(b + 1) % B][1])[:max_length], ([0.0] * len(p) + items[(b + 1) % B][2])[:max_length])
                      for b, (p, *_) in enumerate(items)], pad)
    kl_ratio = engine.forward(kl, seq_logps).float().cpu() - ref_engine.forward(kl, seq_logps).float().cpu()
    z0 = max(0.0, engine.global_sum(float(kl_ratio.sum())) / engine.global_sum(float(B)))
    desirable = torch.tensor([d for *_, d in items], dtype=torch.bool)
    ref = ref_engine.forward(rows, seq_logps).float().cpu()
    return KTOBatch(rows.input_ids, rows.attention_mask, rows.loss_mask, desirable, ref), z0


def kto_loss_fn(cfg: KTOConfig, z0: float, num_examples: float):
    return lambda model, mb: kto_loss(seq_logps(model, mb), mb.ref_logps, mb.desirable, z0, num_examples, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)


def evaluate(engine, ref_engine, items: list[Item], pad: int, cfg: KTOConfig) -> dict[str, float]:
    """Loss and implicit-reward metrics over all `items`, example-weighted; z0 per evaluation batch."""
    totals: dict[str, float] = {}
    for s in range(0, len(items), cfg.eval_batch_size):
        chunk = items[s : s + cfg.eval_batch_size]
        batch, z0 = make_batch(engine, ref_engine, chunk, pad, cfg.data.max_length)
        lp = engine.forward(batch, seq_logps).float().cpu()
        _, m = kto_loss(lp, batch.ref_logps, batch.desirable, z0, len(chunk), cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + float(v) * len(chunk)
    return {f"eval/{k.replace('/', '_')}": v / max(len(items), 1) for k, v in totals.items()}


def train(cfg: KTOConfig) -> dict:
    from tether.data import load_kto

    out, ckpt = start_run(cfg, "kto")
    tok, train_items, eval_items, report, pad, steps = load_tokenized(cfg, load_kto, tokenize_kto)

    model = load_causal_lm(cfg.model)
    disable_dropout(model, cfg.dropout)
    engine = make_engine(model, cfg.engine, cfg.optim, total_steps=steps)
    ref_engine = make_reference(engine, cfg.engine, cfg.ref_model or cfg.model, cfg.model)

    sampler, step, _ = sampler_and_step(cfg, ckpt, {"policy": engine}, len(train_items))
    tracker = Tracker(out, cfg.track, to_dict(cfg), steps, "kto", resume=cfg.resume, start_step=step)
    n_good = sum(d for *_, d in train_items)
    tracker.event(f"kto: {len(train_items)} train ({n_good} desirable, {len(train_items) - n_good} undesirable) / {len(eval_items)} eval "
                  f"examples, {steps} steps, beta={cfg.beta}, {report.truncated} truncated")

    metrics: dict[str, float] = {}
    while step < steps:
        t0 = time.perf_counter()
        batch, z0 = make_batch(engine, ref_engine, [train_items[i] for i in sampler.next()], pad, cfg.data.max_length)
        metrics = engine.train_step(batch, kto_loss_fn(cfg, z0, engine.global_sum(float(len(batch)))))
        step += 1
        dt = time.perf_counter() - t0
        metrics |= {"speed/examples_per_s": len(batch) / dt, "speed/tokens_per_s": float(batch.attention_mask.sum()) / dt}
        if eval_items and should(cfg.eval_every, step, steps):
            metrics |= evaluate(engine, ref_engine, eval_items, pad, cfg)
        tracker.log(step, metrics, force=step == steps)
        if should(cfg.save_every, step, steps):
            ckpt.save(step, {"policy": engine}, {"sampler": sampler.state_dict()}, to_dict(cfg))
    tracker.close()
    engine.save_model(out / "final", tok)
    return write_summary(out, {"stage": "kto", "steps": step, **{k: v for k, v in metrics.items() if k.startswith(("eval/", "loss/", "rewards/", "kto/"))}})


def main(argv: list[str]) -> int:
    return cli_main(KTOConfig, train, argv, "tether kto", __doc__.strip().splitlines()[0])
