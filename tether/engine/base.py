"""The Engine protocol: the seam where data-parallel and sharded training plug in."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol

import torch
from torch import Tensor, nn

from tether.types import Batch

# loss_fn(model, micro_batch) -> (loss, metrics). The loss is already divided by the *global*
# normaliser (token or pair count of the whole batch across all ranks), so summing the micro-batch
# losses gives the batch loss exactly.
LossFn = Callable[[nn.Module, Any], tuple[Tensor, dict[str, Tensor]]]


class Engine(Protocol):
    model: nn.Module
    device: torch.device

    def train_step(self, batch: Batch, loss_fn: LossFn) -> dict[str, float]:
        """Forward+backward over micro-batches, one optimizer step; returns averaged metrics."""

    def forward(self, batch: Batch, fn: Callable[[nn.Module, Any], Any]) -> Any:
        """No-grad pass of fn(model, micro_batch) over micro-batches; results concatenated on dim 0."""

    @property
    def in_process(self) -> bool:
        """The model lives in this process, so a loss_fn may hand results back through a closure
        (PPO's fused value pass relies on it). False for engines whose steps run elsewhere (Ray actors)."""

    def rollout(self, cls, tokenizer):
        """A sampler (Rollout class `cls`) of this engine's model, placed where the model lives."""

    def global_sum(self, value: float) -> float:
        """Sum a local number over data-parallel ranks (the identity in one process)."""

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...

    def unwrapped_model(self) -> nn.Module: ...

    def optimizer_state(self) -> dict | None: ...

    def load_optimizer_state(self, state: dict) -> None: ...

    def snapshot(self, with_optimizer: bool = True) -> Any:
        """A handle to a copy of the weights (and optimizer state) that `restore` brings back."""

    def restore(self, snap: Any) -> None: ...
