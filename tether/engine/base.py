"""The Engine protocol: the seam where data-parallel and sharded training plug in."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol

import torch
from torch import Tensor, nn

from tether.types import Batch

# loss_fn(model, micro_batch) -> (loss, metrics) or (loss, metrics, outputs). The loss is already divided
# by the *global* normaliser (token or pair count of the whole batch across all ranks), so summing the
# micro-batch losses gives the batch loss exactly. outputs: a per-row tensor of the micro-batch (PPO's
# old values from the critic's first step), handed back by train_step wherever the step ran.
LossFn = Callable[[nn.Module, Any], tuple[Tensor, dict[str, Tensor]]]


class Engine(Protocol):
    device: torch.device  # where results of `forward` arrive

    def train_step(self, batch: Batch, loss_fn: LossFn) -> dict[str, float] | tuple[dict[str, float], Tensor]:
        """Forward+backward over micro-batches, one optimizer step; returns averaged metrics, and the
        outputs concatenated on dim 0 (detached, on the CPU) when loss_fn returns outputs."""

    def forward(self, batch: Batch, fn: Callable[[nn.Module, Any], Any]) -> Any:
        """No-grad pass of fn(model, micro_batch) over micro-batches; results concatenated on dim 0."""

    def rollout(self, cls, tokenizer):
        """A sampler (Rollout class `cls`) of this engine's model, placed where the model lives."""

    def global_sum(self, value: float) -> float:
        """Sum a local number over data-parallel ranks (the identity in one process)."""

    def without_adapters(self) -> "Engine | None":
        """This model with its LoRA adapters off, as a frozen engine (a LoRA policy's reference); None without."""

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """What a rollout's `update_weights` reads."""

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load the full weights of the trained module (LoRA layers included; tied weights may be absent), as
        `save_model(merged=False)` wrote them; RuntimeError names a mismatch."""

    def save_model(self, path, tokenizer=None, merged: bool = True) -> None:
        """An HF folder at `path`, atomically (under torchrun every rank calls it, rank 0 writes). With LoRA,
        merged: W + BA and `adapter/`; merged=False: the module as trained (what checkpoints hold)."""

    def optimizer_state(self) -> dict | None: ...

    def load_optimizer_state(self, state: dict) -> None: ...

    def scale_lr(self, factor: float) -> None: ...  # now and for the rest of the schedule (PPO's guard)

    def snapshot(self, with_optimizer: bool = True) -> Any:
        """A handle to a copy of the weights (and optimizer state) that `restore` brings back."""

    def restore(self, snap: Any) -> None: ...
