"""Supervised fine-tuning: maximise log p(completion | prompt) on demonstrations.

    tether sft model=DIR data.train=demos.jsonl data.eval_fraction=0.05 out=runs/sft max_steps=200
    tether sft model=DIR data.train=demos.jsonl engine.lora.r=8 optim.lr=2e-5

The loss is on completion (assistant) tokens only; prompts are masked. Reported: train loss, eval
loss and perplexity on held-out data, tokens/s.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from tether.algo.common import load_tokenized, sampler_and_step, should, start_run, write_summary
from tether.cli import cli_main
from tether.config import RunConfig, to_dict
from tether.engine import make_engine
from tether.losses import sft_loss
from tether.models import causal_logprobs, disable_dropout, load_causal_lm
from tether.track import Tracker


@dataclass(frozen=True)
class SFTConfig(RunConfig):
    pass


def _loss_fn(num_tokens: float):
    def loss_fn(model, mb):
        # targets: the LM head runs on the loss positions only (not the prompt, not the padding)
        lp, _ = causal_logprobs(model, mb.input_ids, mb.attention_mask, mb.position_ids, targets=mb.loss_mask)
        return sft_loss(lp, mb.loss_mask, num_tokens)

    return loss_fn


def _targets(batch) -> torch.Tensor:
    mask = batch.loss_mask.clone()
    mask[:, 0] = 0  # the first token has no prefix to predict it from
    return mask


def evaluate(engine, items, pad: int, cfg) -> dict[str, float]:
    from tether.data import collate_sft

    nll, tokens = 0.0, 0.0
    for s in range(0, len(items), cfg.eval_batch_size):
        batch = collate_sft(items[s : s + cfg.eval_batch_size], pad, False, cfg.data.max_length)
        batch.loss_mask = _targets(batch)

        def fn(model, mb):
            lp, _ = causal_logprobs(model, mb.input_ids, mb.attention_mask, mb.position_ids)
            return torch.stack([-(lp * mb.loss_mask).sum(), mb.loss_mask.sum()])[None]

        sums = engine.forward(batch, fn).sum(0)
        nll, tokens = nll + float(sums[0]), tokens + float(sums[1])
    loss = nll / max(tokens, 1)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50)), "eval/tokens": tokens}


def train(cfg: SFTConfig) -> dict:
    from tether.data import collate_sft, load_sft, tokenize_sft

    out, ckpt = start_run(cfg, "sft")
    tok, train_items, eval_items, report, pad, steps = load_tokenized(cfg, load_sft, tokenize_sft)

    model = load_causal_lm(cfg.model)
    disable_dropout(model, cfg.dropout)
    engine = make_engine(model, cfg.engine, cfg.optim, total_steps=steps)
    sampler, step, _ = sampler_and_step(cfg, ckpt, {"policy": engine}, len(train_items))
    tracker = Tracker(out, cfg.track, to_dict(cfg), steps, "sft", resume=cfg.resume, start_step=step)
    tracker.event(f"sft: {len(train_items)} train / {len(eval_items)} eval examples, {steps} steps, {report.truncated} truncated")

    metrics: dict[str, float] = {}
    while step < steps:
        t0 = time.perf_counter()
        batch = collate_sft([train_items[i] for i in sampler.next()], pad, cfg.data.packing, cfg.data.max_length)
        batch.loss_mask = _targets(batch)
        num_tokens = engine.global_sum(float(batch.loss_mask.sum()))
        metrics = engine.train_step(batch, _loss_fn(num_tokens))
        step += 1
        dt = time.perf_counter() - t0
        metrics |= {
            "speed/tokens_per_s": float(batch.attention_mask.sum()) / dt if batch.position_ids is None else batch.input_ids.numel() / dt,
            "speed/steps_per_s": 1 / dt,
            "train/epoch": sampler.epoch + sampler.pos / len(train_items),
        }
        if eval_items and should(cfg.eval_every, step, steps):
            metrics |= evaluate(engine, eval_items, pad, cfg)
        tracker.log(step, metrics, force=step == steps)
        if should(cfg.save_every, step, steps):
            ckpt.save(step, {"policy": engine}, {"sampler": sampler.state_dict()}, to_dict(cfg))
    tracker.close()
    engine.save_model(out / "final", tok)
    return write_summary(out, {"stage": "sft", "steps": step, **{k: v for k, v in metrics.items() if k.startswith(("eval/", "loss/"))}})


def main(argv: list[str]) -> int:
    return cli_main(SFTConfig, train, argv, "tether sft", __doc__.strip().splitlines()[0])
