"""The Rollout protocol: sample responses for a batch of prompts, and receive new weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

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
