"""The Rollout protocol: sample responses for a batch of prompts, and receive new weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch
from torch import Tensor

from tether.config import check, doc
from tether.types import PromptBatch, RolloutBatch


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = doc(32, "maximum tokens sampled per response")
    min_new_tokens: int = doc(0, "suppress EOS until this many tokens were sampled")
    temperature: float = doc(1.0, "sampling temperature (0 = greedy)")
    top_p: float = doc(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability")
    top_k: int = doc(0, "keep only the k most likely tokens (0 = off)")
    stop_at_eos: bool = doc(True, "end a response at the EOS token")

    def validate(self, p: str) -> None:
        check(self.max_new_tokens > 0, f"{p}max_new_tokens", "must be positive")
        check(self.temperature >= 0, f"{p}temperature", "must be >= 0")
        check(0 < self.top_p <= 1, f"{p}top_p", "must be in (0, 1]")
        check(self.top_k >= 0, f"{p}top_k", "must be >= 0")


class Rollout(Protocol):
    def generate(self, prompts: PromptBatch, sampling: SamplingConfig) -> RolloutBatch:
        """Sample one response per prompt row (repeat rows for several samples per prompt)."""

    def update_weights(self, named_parameters: Iterable[tuple[str, Tensor]]) -> None:
        """Load the trainer's current policy weights into the sampler."""


def response_mask_from_tokens(responses: Tensor, eos: list[int], stop_at_eos: bool = True) -> tuple[Tensor, Tensor]:
    """1 on sampled tokens up to and including the first EOS, 0 after it. [B, R] -> ([B, R] float, [B] bool)."""
    if not stop_at_eos or not eos:
        return torch.ones_like(responses, dtype=torch.float), torch.zeros(responses.shape[0], dtype=torch.bool, device=responses.device)
    is_eos = torch.isin(responses, torch.tensor(eos, device=responses.device))
    before = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # no EOS strictly before t
    return before.float(), is_eos.any(-1)


def assemble_rollout(prompts: PromptBatch, resp: Tensor, logprobs: Tensor, entropy: Tensor | None, eos: list[int], tokenizer,
                     stop_at_eos: bool) -> RolloutBatch:
    """A sampler's tokens [B, R] (right-padded), their logprobs and entropy [B, R] as a RolloutBatch: the mask up to
    and including EOS, values after it zeroed, texts decoded without EOS."""
    ids, mask = prompts.input_ids.to(resp.device), prompts.attention_mask.to(resp.device)
    resp_mask, finished = response_mask_from_tokens(resp, eos, stop_at_eos)
    logprobs = torch.where(resp_mask.bool(), logprobs, torch.zeros_like(logprobs))
    entropy = None if entropy is None else torch.where(resp_mask.bool(), entropy, torch.zeros_like(entropy))
    texts = [tokenizer.decode([t for t, keep in zip(row, m) if keep and t not in eos], skip_special_tokens=True)
             for row, m in zip(resp.tolist(), resp_mask.tolist())]
    return RolloutBatch(sequences=torch.cat([ids, resp], 1), attention_mask=torch.cat([mask, resp_mask.long()], 1), response_mask=resp_mask,
                        logprobs=logprobs, prompt_length=ids.shape[1], prompts=list(prompts.prompts), responses=texts, finished=finished,
                        entropy=entropy, group_ids=list(prompts.group_ids), fields=list(prompts.fields))


def cat_rollouts(parts: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Several rollouts as one: each re-padded to the widest prompt (on the left) and response (on the
    right), group ids kept apart. For DAPO's refill, which samples more batches than one."""
    if len(parts) == 1:
        return parts[0]
    P, R = max(p.prompt_length for p in parts), max(p.response_mask.shape[1] for p in parts)
    pad = torch.nn.functional.pad

    def two_sided(x: Tensor, p: RolloutBatch, value: int) -> Tensor:
        q = p.prompt_length
        return torch.cat([pad(x[:, :q], (P - q, 0), value=value), pad(x[:, q:], (0, R - (x.shape[1] - q)), value=value)], 1)

    right = lambda x: None if x is None else pad(x, (0, R - x.shape[1]))  # noqa: E731
    offsets = [0]
    for p in parts[:-1]:
        offsets.append(offsets[-1] + (max(p.group_ids) + 1 if p.group_ids else 0))
    entropy = None if any(p.entropy is None for p in parts) else torch.cat([right(p.entropy) for p in parts])
    finished = None if any(p.finished is None for p in parts) else torch.cat([p.finished for p in parts])
    return RolloutBatch(
        sequences=torch.cat([two_sided(p.sequences, p, pad_id) for p in parts]), attention_mask=torch.cat([two_sided(p.attention_mask, p, 0) for p in parts]),
        response_mask=torch.cat([right(p.response_mask) for p in parts]), logprobs=torch.cat([right(p.logprobs) for p in parts]), prompt_length=P,
        prompts=[x for p in parts for x in p.prompts], responses=[x for p in parts for x in p.responses], finished=finished, entropy=entropy,
        group_ids=[g + o for p, o in zip(parts, offsets) for g in p.group_ids] if all(p.group_ids for p in parts) else [],
        fields=[x for p in parts for x in p.fields] if all(len(p.fields) == len(p) for p in parts) else [])
