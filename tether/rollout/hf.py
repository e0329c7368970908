"""Rollout with Hugging Face `model.generate`: batched left-padded prompts, KV cache, sampler logprobs."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import Tensor, nn

from tether.rollout.base import SamplingConfig
from tether.types import PromptBatch, RolloutBatch


def eos_ids(tokenizer, model=None) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.eos_token_id is not None:
        ids.update([gen.eos_token_id] if isinstance(gen.eos_token_id, int) else gen.eos_token_id)
    return sorted(ids)


def response_mask_from_tokens(responses: Tensor, eos: list[int], stop_at_eos: bool = True) -> tuple[Tensor, Tensor]:
    """1 on sampled tokens up to and including the first EOS, 0 after it. [B, R] -> ([B, R] float, [B] bool)."""
    if not stop_at_eos or not eos:
        return torch.ones_like(responses, dtype=torch.float), torch.zeros(responses.shape[0], dtype=torch.bool, device=responses.device)
    is_eos = torch.isin(responses, torch.tensor(eos, device=responses.device))
    before = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # no EOS strictly before t
    return before.float(), is_eos.any(-1)


class HFRollout:
    """Samples with the policy module itself, so `update_weights` has nothing to copy."""

    def __init__(self, model: nn.Module, tokenizer, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.eos = eos_ids(tokenizer, model)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, sampling: SamplingConfig) -> RolloutBatch:
        from transformers import GenerationConfig

        was_training = self.model.training
        self.model.eval()
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
        ids = prompts.input_ids.to(self.device)
        mask = prompts.attention_mask.to(self.device)
        with self._autocast():
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        self.model.train(was_training)
        P = ids.shape[1]
        seqs = out.sequences  # [B, P+R]
        resp = seqs[:, P:]
        R = resp.shape[1]
        scores = torch.stack(out.scores[:R], 1).float()  # [B, R, V]
        logp = torch.log_softmax(scores, -1)
        logprobs = logp.gather(-1, resp[..., None]).squeeze(-1)
        entropy = -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)  # [B, R]
        resp_mask, finished = response_mask_from_tokens(resp, self.eos, sampling.stop_at_eos)
        logprobs = torch.where(resp_mask.bool(), logprobs, torch.zeros_like(logprobs))
        entropy = torch.where(resp_mask.bool(), entropy, torch.zeros_like(entropy))
        attn = torch.cat([mask, resp_mask.long()], 1)
        texts = []
        for row, m in zip(resp.tolist(), resp_mask.tolist()):
            toks = [t for t, keep in zip(row, m) if keep and t not in self.eos]
            texts.append(self.tokenizer.decode(toks, skip_special_tokens=True))
        return RolloutBatch(
            sequences=seqs, attention_mask=attn, response_mask=resp_mask, logprobs=logprobs,
            prompt_length=P, prompts=list(prompts.prompts), responses=texts, finished=finished, entropy=entropy,
        )

    def exact_logprobs(self, sampling: SamplingConfig) -> bool:
        """True when the returned logprobs (and entropy) are what a float32 forward pass of the policy at the
        sampling temperature gives: this sampler runs the policy module itself, in float32, and nothing
        reshapes the distribution (no top-p, top-k or min_new_tokens). PPO then skips its old-policy pass."""
        return (self.autocast_dtype is None and sampling.temperature > 0 and sampling.top_p >= 1.0
                and sampling.top_k == 0 and sampling.min_new_tokens == 0)

    def update_weights(self, named_parameters: Iterable[tuple[str, Tensor]]) -> None:
        """The rollout shares the policy's module: weights are already current."""
