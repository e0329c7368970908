"""Rollout with a Hugging Face causal LM: batched left-padded prompts, KV cache, sampler logprobs.

The decoding loop is tether's own, around the model's forward and transformers' `StaticCache` and logits
processors (temperature, top-k, top-p, min_new_tokens), because three things `model.generate` does are most
of a small model's sampling time on a CPU (64 x 32 tokens, 4x256 GPT-2: 0.90 s -> 0.53 s):
- the KV cache is preallocated and written in place (`StaticCache`) instead of concatenated every step;
- a prompt repeated in the batch (an RL prompt's samples) is encoded once and its cache copied to its rows;
- a token is drawn by inverse-CDF sampling (one uniform number per row) instead of `torch.multinomial`,
  which draws an exponential per vocabulary entry (64 x 4,096 per step).
Greedy decoding gives `generate`'s tokens exactly (tested); sampling draws from the same distribution, not
the same tokens. Models that do not declare static-cache support use `model.generate`.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterable

import torch
from torch import Tensor, nn

from tether.models import eos_ids, position_ids_from_mask
from tether.rollout.base import SamplingConfig, assemble_rollout
from tether.types import PromptBatch, RolloutBatch


class HFRollout:
    """Samples with the policy module itself, so `update_weights` has nothing to copy."""

    def __init__(self, model: nn.Module, tokenizer, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                 lockstep=None):
        """lockstep: a sharded engine's `run(fn)` (fn inside its root unit) and `all_done(flag)` (every rank
        agrees), so that all ranks make the same forward calls until every rank's rows are finished."""
        self.model, self.tokenizer, self.lockstep = model, tokenizer, lockstep
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.eos = eos_ids(tokenizer, model)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, sampling: SamplingConfig) -> RolloutBatch:
        was_training = self.model.training
        self.model.eval()
        ids = prompts.input_ids.to(self.device)
        mask = prompts.attention_mask.to(self.device)
        # autocast keeps a weight's cast copy for its whole context only if the weight requires grad: a frozen one (a
        # LoRA policy's base) would be cast again at every decoding step. Under no_grad, marking it records nothing.
        frozen = [p for p in self.model.parameters() if not p.requires_grad and p.is_floating_point()] if self.autocast_dtype else []
        try:
            for p in frozen:
                p.requires_grad_(True)
            with contextlib.nullcontext() if self.autocast_dtype is None else torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
                decode = self._decode if self._own_loop() else self._hf_generate
                run = self.lockstep.run if self.lockstep is not None else (lambda fn: fn())
                groups = prompts.group_ids or list(range(len(ids)))
                resp, logprobs, entropy = run(lambda: decode(ids, mask, sampling, groups))
        finally:
            self.model.train(was_training)
            for p in frozen:
                p.requires_grad_(False)
        return assemble_rollout(prompts, resp, logprobs, entropy, self.eos, self.tokenizer, sampling.stop_at_eos)

    def _own_loop(self) -> bool:
        """The model declares static-cache support (transformers' `_can_compile_fullgraph`)."""
        try:
            from transformers import StaticCache  # noqa: F401
        except ImportError:
            return False
        return bool(getattr(self.model, "_can_compile_fullgraph", False))

    def _processors(self, sampling: SamplingConfig, prompt_length: int):
        """transformers' logits processors in `generate`'s order: min_new_tokens, then the sampling warpers."""
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            MinNewTokensLengthLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        procs = LogitsProcessorList()
        if sampling.min_new_tokens and sampling.stop_at_eos and self.eos:
            procs.append(MinNewTokensLengthLogitsProcessor(prompt_length, sampling.min_new_tokens, self.eos, device=self.device))
        if sampling.temperature > 0:
            if sampling.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                procs.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                procs.append(TopPLogitsWarper(sampling.top_p))
        return procs

    def _decode(self, ids: Tensor, mask: Tensor, sampling: SamplingConfig, groups: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Sample up to max_new_tokens per row. ids, mask [B, P] (left-padded), groups [B] (rows with one id
        hold the same prompt) -> tokens, logprobs, entropy [B, R]."""
        from transformers import StaticCache

        model = self.model
        B, P = ids.shape
        R = sampling.max_new_tokens
        cache = StaticCache(config=model.config, max_cache_len=P + R)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper passes kwargs on
        cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"  # renamed in transformers 5
        seq = torch.cat([ids, torch.full((B, R), self.pad, dtype=ids.dtype, device=ids.device)], 1)  # [B, P+R]
        attn = torch.cat([mask, torch.zeros((B, R), dtype=mask.dtype, device=mask.device)], 1)  # [B, P+R]
        pos = position_ids_from_mask(mask)  # [B, P] positions from the first real token, as generate
        logprobs = torch.zeros((B, R), device=ids.device)
        entropy = torch.zeros((B, R), device=ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        eos = torch.tensor(self.eos if sampling.stop_at_eos else [], dtype=ids.dtype, device=ids.device)
        procs = self._processors(sampling, P)

        # Prefill: each distinct prompt once; its cache rows are then copied to the rows that repeat it.
        keys: dict = {}
        rows = torch.tensor([keys.setdefault(g, len(keys)) for g in groups], device=ids.device)  # [B]
        first = torch.empty(len(keys), dtype=torch.long, device=ids.device)
        first[rows.flip(0)] = torch.arange(B, device=ids.device).flip(0)  # a row holding each distinct prompt
        out = model(input_ids=ids[first], attention_mask=mask[first], position_ids=pos[first], use_cache=True, logits_to_keep=1, **{cache_kw: cache})
        logits = out.logits[:, -1]
        if len(keys) < B:
            cache.reorder_cache(rows)
            logits = logits[rows]
        next_pos = pos[:, -1:] + 1
        steps = R
        for t in range(R):
            scores = procs(seq[:, : P + t], logits.float())  # [B, V], the distribution sampled from
            logp = torch.log_softmax(scores, -1)
            probs = logp.exp()
            tok = _inverse_cdf_sample(probs) if sampling.temperature > 0 else scores.argmax(-1)
            logprobs[:, t] = logp.gather(1, tok[:, None]).squeeze(1)
            entropy[:, t] = -(probs * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)
            tok = torch.where(done, torch.full_like(tok, self.pad), tok)  # finished rows are padded, as generate does
            seq[:, P + t] = tok
            attn[:, P + t] = 1
            done = done | torch.isin(tok, eos)
            if t == R - 1 or (self.lockstep.all_done(bool(done.all())) if self.lockstep is not None else bool(done.all())):
                steps = t + 1
                break
            out = model(input_ids=tok[:, None], attention_mask=attn[:, : P + t + 1], position_ids=next_pos, use_cache=True, **{cache_kw: cache})
            logits = out.logits[:, -1]
            next_pos = next_pos + 1
        return seq[:, P : P + steps], logprobs[:, :steps], entropy[:, :steps]

    def _hf_generate(self, ids: Tensor, mask: Tensor, sampling: SamplingConfig, groups: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """`model.generate` for models without static-cache support. -> tokens, logprobs, entropy [B, R]."""
        from transformers import GenerationConfig

        greedy = sampling.temperature == 0
        gen_cfg = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.min_new_tokens or None,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            # explicit values: None would fall back to transformers' defaults (top_k=50)
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else sampling.top_k,
            eos_token_id=self.eos if sampling.stop_at_eos and self.eos else None,
            pad_token_id=self.pad,
            use_cache=True,
            return_dict_in_generate=True,
            output_scores=True,  # processed scores: the distribution actually sampled from
        )
        out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, synced_gpus=self.lockstep is not None)
        resp = out.sequences[:, ids.shape[1]:]
        logp = torch.log_softmax(torch.stack(out.scores[: resp.shape[1]], 1).float(), -1)  # [B, R, V]
        logprobs = logp.gather(-1, resp[..., None]).squeeze(-1)
        entropy = -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)
        return resp, logprobs, entropy

    def exact_logprobs(self, sampling: SamplingConfig) -> bool:
        """True when the returned logprobs (and entropy) are what a float32 forward pass of the policy at the
        sampling temperature gives: this sampler runs the policy module itself, in float32, and nothing
        reshapes the distribution (no top-p, top-k or min_new_tokens). PPO then skips its old-policy pass."""
        return (self.autocast_dtype is None and sampling.temperature > 0 and sampling.top_p >= 1.0
                and sampling.top_k == 0 and sampling.min_new_tokens == 0)

    def update_weights(self, named_parameters: Iterable[tuple[str, Tensor]]) -> None:
        """The rollout shares the policy's module: weights are already current."""


def _inverse_cdf_sample(probs: Tensor) -> Tensor:
    """One token per row of probs [B, V] (rows need not sum to exactly 1): the first index whose cumulative
    probability exceeds u * total, u ~ U[0, 1). A zero-probability token is never drawn: its cumulative value
    equals its predecessor's, so it is never the first to exceed the threshold. -> [B]"""
    cdf = probs.cumsum(-1)  # [B, V], non-decreasing
    u = torch.rand((probs.shape[0], 1), device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True).squeeze(1)  # [B]
    over = tok >= probs.shape[1]  # u * total rounded up to total: the last token with probability > 0
    if bool(over.any()):
        last = probs.shape[1] - 1 - (probs[over] > 0).flip(-1).int().argmax(-1)
        tok = tok.masked_scatter(over, last)
    return tok
