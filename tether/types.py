"""Batch and record types, one per stage, with the shape of every tensor field.

Shapes: B batch, T sequence, P prompt, R response. Padding: SFT/pair batches are right-padded;
prompt batches are left-padded so that generation appends at a common column; rollouts are
[left-padded prompt | right-padded response].

Every batch is a dataclass whose tensor fields share the leading dimension B, so the engine can
split any batch into micro-batches (`split`) and move it to a device (`to`) without knowing its type.
Non-tensor fields that are lists of length B are split alongside; everything else is copied.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

B_ = TypeVar("B_", bound="Batch")


@dataclass
class Batch:
    def __len__(self) -> int:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                return v.shape[0]
        raise TypeError(f"{type(self).__name__} has no tensor field")

    def _map(self: B_, fn_tensor, fn_list) -> B_:
        def one(v):
            return fn_tensor(v) if isinstance(v, Tensor) else fn_list(v) if isinstance(v, list) and len(v) == len(self) else v

        return type(self)(**{f.name: one(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def to(self: B_, device: torch.device | str) -> B_:
        return self._map(lambda t: t.to(device, non_blocking=True), lambda x: x)

    def select(self: B_, index: Tensor | list[int]) -> B_:
        idx = torch.as_tensor(index, dtype=torch.long)
        il = idx.tolist()
        return self._map(lambda t: t[idx.to(t.device)], lambda x: [x[i] for i in il])

    def split(self: B_, micro_batch_size: int) -> list[B_]:
        n = len(self)
        if micro_batch_size <= 0 or micro_batch_size >= n:
            return [self]
        return [self.select(list(range(s, min(s + micro_batch_size, n)))) for s in range(0, n, micro_batch_size)]


@dataclass
class SFTBatch(Batch):
    input_ids: Tensor  # [B, T] long, right-padded
    attention_mask: Tensor  # [B, T] long, 1 on real tokens
    loss_mask: Tensor  # [B, T] float, 1 where token t is a training target (completion tokens)
    # [B, T] long; set when sequences are packed: it restarts at 0 at each example, which is how the
    # examples of a packed row are told apart (data.packing)
    position_ids: Tensor | None = None


@dataclass
class PairBatch(Batch):
    """Preference pairs. Chosen and rejected are run as one [2B, T] forward pass by the losses."""

    chosen_input_ids: Tensor  # [B, Tc] long, right-padded prompt+chosen response
    chosen_attention_mask: Tensor  # [B, Tc] long
    chosen_loss_mask: Tensor  # [B, Tc] float, 1 on response tokens (for DPO logprobs)
    rejected_input_ids: Tensor  # [B, Tr] long
    rejected_attention_mask: Tensor  # [B, Tr] long
    rejected_loss_mask: Tensor  # [B, Tr] float
    margin: Tensor | None = None  # [B] float, optional preference strength for the margin term
    safety: Tensor | None = None  # [B, 2] float (chosen, rejected): +1 unsafe, -1 safe, 0 unlabelled (cost models)
    labels: Tensor | None = None  # [B, K] float, per objective: +1 chosen better, -1 rejected better, 0 none (multi-head RMs)
    # [B] float, cached reference logprob sums (DPO); None until the reference pass has run.
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    prompt_len: list[int] = field(default_factory=list)  # B: the prompt's tokens at the start of both rows

    def groups(self) -> tuple[list, list[int]] | None:
        """For a packed pass over `stacked()`: row b and row B+b are one pair and share its prompt."""
        return (list(range(len(self))) * 2, self.prompt_len * 2) if self.prompt_len else None

    def stacked(self) -> tuple[Tensor, Tensor, Tensor]:
        """Chosen rows over rejected rows, right-padded to T = max(Tc, Tr), for one forward pass.
        -> (input_ids, attention_mask, loss_mask), each [2B, T]."""
        T = max(self.chosen_input_ids.shape[1], self.rejected_input_ids.shape[1])
        pad = torch.nn.functional.pad
        return tuple(torch.cat([pad(c, (0, T - c.shape[1])), pad(r, (0, T - r.shape[1]))]) for c, r in (
            (self.chosen_input_ids, self.rejected_input_ids), (self.chosen_attention_mask, self.rejected_attention_mask),
            (self.chosen_loss_mask, self.rejected_loss_mask)))


@dataclass
class KTOBatch(Batch):
    """Unpaired examples (KTO): prompt+completion rows, each with its label and reference logprob."""

    input_ids: Tensor  # [B, T] long, right-padded prompt+completion
    attention_mask: Tensor  # [B, T] long
    loss_mask: Tensor  # [B, T] float, 1 on completion tokens
    desirable: Tensor  # [B] bool: the record's label
    ref_logps: Tensor  # [B] float, the reference model's completion logprob sums


@dataclass
class PromptBatch(Batch):
    input_ids: Tensor  # [B, P] long, left-padded
    attention_mask: Tensor  # [B, P] long
    prompts: list[str] = field(default_factory=list)  # B prompt texts (as given, before templating)
    group_ids: list[int] = field(default_factory=list)  # B: rows with the same id hold the same prompt (collate_prompts; empty: all distinct)
    fields: list[dict] = field(default_factory=list)  # B: each prompt record's other fields (a reference answer), for reward functions


@dataclass
class RolloutBatch(Batch):
    """What a Rollout returns: prompts with sampled responses.

    Named RolloutBatch (not Rollout) because `Rollout` is the sampling seam in tether.rollout.
    """

    sequences: Tensor  # [B, P+R] long: left-padded prompt then right-padded response
    attention_mask: Tensor  # [B, P+R] long
    response_mask: Tensor  # [B, R] float, 1 on sampled tokens up to and including EOS
    logprobs: Tensor  # [B, R] float, the sampler's own logprobs of the sampled tokens
    prompt_length: int = 0  # P
    prompts: list[str] = field(default_factory=list)  # B
    responses: list[str] = field(default_factory=list)  # B decoded responses (EOS and padding removed)
    finished: Tensor | None = None  # [B] bool, True where the response ended with EOS
    entropy: Tensor | None = None  # [B, R] float, entropy of the sampling distribution at each step (when the sampler has it)
    group_ids: list[int] = field(default_factory=list)  # B, the PromptBatch's
    fields: list[dict] = field(default_factory=list)  # B, the PromptBatch's


def prompt_groups(b: "RolloutBatch | Experience") -> tuple[list, list[int]] | None:
    """For a packed pass: rows with the same group id share their prompt (its real tokens in the first
    prompt_length columns)."""
    if not b.group_ids:
        return None
    return b.group_ids, b.attention_mask[:, : b.prompt_length].sum(-1).tolist()


@dataclass
class Experience(Batch):
    """One PPO training example per sequence, everything the clipped update needs."""

    sequences: Tensor  # [B, P+R] long
    attention_mask: Tensor  # [B, P+R] long
    response_mask: Tensor  # [B, R] float
    logprobs: Tensor | None  # [B, R] old-policy logprobs (trainer's forward at rollout time); None: the first update step's
    ref_logprobs: Tensor  # [B, R]
    values: Tensor | None  # [B, R] old value estimates (zeros without a critic); None only inside make_experience
    advantages: Tensor | None  # [B, R]
    returns: Tensor | None  # [B, R]
    prompt_length: int = 0  # P
    rewards: Tensor | None = None  # [B, R] KL-shaped per-token rewards (GAE's input)
    scores: Tensor | None = None  # [B] the raw reward of each sequence
    group_ids: list[int] = field(default_factory=list)  # B, the rollout's
    # PPO-Lagrangian (cost.model or cost.fn): the cost of each sequence [B], the cost critic's values and
    # returns [B, R], and the cost advantages [B, R] before they are combined with the reward's.
    costs: Tensor | None = None
    cost_values: Tensor | None = None
    cost_returns: Tensor | None = None
    cost_advantages: Tensor | None = None
    sampler_logprobs: Tensor | None = None  # [B, R] the sampler's, for the drift metrics, unless they are `logprobs`
