"""Data-parallel (DDP) and sharded (FSDP2) engines on torch.distributed, launched with torchrun.

    torchrun --standalone --nproc_per_node=2 -m tether.cli sft model=DIR data.train=demos.jsonl engine.backend=ddp
    torchrun --standalone --nproc_per_node=2 -m tether.cli dpo --config configs/dpo.yaml engine.backend=fsdp

How the algorithm files stay unchanged:
- Batches: `BatchSampler` gives each rank its contiguous slice of every global batch
  (tether.ranks.shard_indices), so world_size x local batch = `batch_size`.
- Normalisers: a stage sums its normaliser with `engine.global_sum` (all-reduce) and its loss_fn
  divides by it, so each rank's loss is its *share* of the global loss. DDP and FSDP average
  gradients over ranks; multiplying the loss by world_size before backward turns that average
  into the sum, which is the single-process gradient exactly (up to float summation order).
- The loss code sees the plain Hugging Face model: `loss_fn(model, mb)` is run *inside* the
  wrapper's forward (`_Apply`), so DDP's reducer and FSDP's all-gather hooks fire even when the
  loss calls `model.generate`-free helpers such as `backbone(model)` or `score_head(model)`.
- Files: the tracker, checkpoints and final folders are written by rank 0 only (tether.ranks.is_main),
  after the collective that gathers FSDP shards; other ranks wait at a barrier.

Process group: gloo on CPU, nccl on CUDA (`LOCAL_RANK` picks the GPU). It is destroyed at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from tether.ranks import world_size
from tether.engine.local import LocalEngine, merge_metrics, with_outputs
from tether.types import Batch


def init_distributed(device_name: str = "auto") -> torch.device:
    """Join the torchrun process group (once) and return this rank's device."""
    if "RANK" not in os.environ and not dist.is_initialized():
        from tether.config import ConfigError

        raise ConfigError(
            "config key 'engine.backend': ddp/fsdp run under torchrun, e.g. "
            "`torchrun --standalone --nproc_per_node=2 -m tether.cli <stage> ... engine.backend=ddp`"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        atexit.register(_destroy)
    return torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class _Apply(nn.Module):
    """forward(fn, mb) = fn(model, mb): routes any loss code through the wrapper's hooks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model

    def forward(self, fn: Callable[[nn.Module, Any], Any], mb: Any) -> Any:
        return fn(self.module, mb)


def all_reduce_metrics(metrics: dict[str, float], n_local: int) -> dict[str, float]:
    """Merge per-rank metrics as one process would: `loss/*` are shares of the global loss (sum);
    the rest are size-weighted means over every rank's examples."""
    keys = sorted(metrics)
    n_total = float(n_local)
    vals = [metrics[k] if k.startswith("loss/") else metrics[k] * n_local for k in keys]
    t = torch.tensor(vals + [n_total], dtype=torch.float64)
    dist.all_reduce(t)
    n_total = float(t[-1])
    return {k: float(v) if k.startswith("loss/") else float(v) / max(n_total, 1.0) for k, v in zip(keys, t[:-1].tolist())}


class DDPEngine(LocalEngine):
    """Every rank holds the whole model; gradients are all-reduced by DistributedDataParallel."""

    def __init__(self, model: nn.Module, cfg, optim_cfg=None, total_steps: int = 0, trainable: bool = True):
        device = init_distributed(cfg.device)
        model = model.to(device)
        super().__init__(model, _with_device(cfg, device), optim_cfg, total_steps=total_steps, trainable=trainable)
        self.wrapper = self._wrap() if self.trainable else None

    def _wrap(self) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(_Apply(self.model), device_ids=ids, broadcast_buffers=False)

    def _no_sync(self):
        return self.wrapper.no_sync()

    def global_sum(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item())

    def train_step(self, batch: Batch, loss_fn: Callable) -> dict[str, float]:
        assert self.optimizer is not None, "train_step on a frozen engine"
        self.model.train()
        mbs = self.micro_batches(batch)
        W = world_size()
        parts, outs = [], []
        for i, mb in enumerate(mbs):
            mb = mb.to(self.device)
            # gradients are reduced once per step, on the last micro-batch
            sync = contextlib.nullcontext() if i == len(mbs) - 1 else self._no_sync()
            with sync:
                with self.autocast():
                    loss, metrics, *out = self.wrapper(loss_fn, mb)
                (loss * W).backward()  # DDP/FSDP average over ranks; the loss is already a global share
            parts.append((len(mb), metrics))
            outs += out
        metrics = all_reduce_metrics(merge_metrics(parts, len(batch)), len(batch))
        return with_outputs(self._step(metrics), outs)


class FSDPEngine(DDPEngine):
    """Parameters, gradients and optimizer state sharded over ranks with FSDP2 (`fully_shard`).

    Each transformer block (the model's `_no_split_modules`) is its own FSDP unit; embeddings,
    final norm and heads belong to the root unit. Every rank must run the same sequence of
    forward passes: the rollout decodes in lock-step (`rollout`), evaluation is run on the same
    items on every rank (as the algorithm files already do).
    """

    def __init__(self, model: nn.Module, cfg, optim_cfg=None, total_steps: int = 0, trainable: bool = True):
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        device = init_distributed(cfg.device)
        model = model.to(device)
        if trainable and optim_cfg is not None and cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        wrapper = _Apply(model)
        for m in model.modules():
            if type(m).__name__ in blocks:
                fully_shard(m)
        fully_shard(wrapper)
        LocalEngine.__init__(self, model, _with_device(cfg, device, checkpointing=False), optim_cfg, total_steps=total_steps, trainable=trainable)
        self.wrapper = wrapper

    def rollout(self, cls, tokenizer):
        """The sampler decodes inside the root unit (FSDP gathers it; blocks gather themselves) and in
        lock-step: every rank makes the same forward calls, until every rank's rows are finished."""
        return cls(self.model, tokenizer, self.device, self.autocast_dtype, lockstep=self)

    def run(self, fn: Callable[[], Any]) -> Any:
        return self.wrapper(lambda model, _: fn(), None)

    def all_done(self, flag: bool) -> bool:
        t = torch.tensor([0.0 if flag else 1.0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item()) == 0.0

    def _no_sync(self):
        @contextlib.contextmanager
        def ctx():
            self.wrapper.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.wrapper.set_requires_gradient_sync(True)

        return ctx()

    def _clip_grad_norm(self, params: list[nn.Parameter], clip: float) -> torch.Tensor:
        norm = super()._clip_grad_norm(params, clip)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2

    def _apply(self, fn: Callable[[nn.Module, Any], Any], mb: Any) -> Any:
        return self.wrapper(fn, mb)  # all-gather hooks fire even in no-grad passes

    def _gathered(self) -> dict:
        return full_state_dict(self.model)  # a collective

    def load_state_dict(self, state_dict: dict) -> None:
        from tether.engine.local import check_keys

        check_keys(self.model, *load_full_state_dict(self.model, state_dict, strict=False))

    def optimizer_state(self) -> dict | None:
        if self.optimizer is None:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True))
        return {"optimizer": full, "scheduler": self.scheduler.state_dict(), "fsdp_full": True}

    def load_optimizer_state(self, state: dict) -> None:
        if self.optimizer is None:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def full_state_dict(model: torch.nn.Module) -> dict:
    """The full (unsharded) state dict of an FSDP2-sharded model, on every rank.

    A collective: every rank must call it. Tied weights stay one tensor (so `save_pretrained`
    still de-duplicates them).
    """
    sd = model.state_dict(keep_vars=True)  # Parameters themselves, so tied weights share an id
    seen: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in sd.items():
        if id(v) not in seen:
            seen[id(v)] = (v.full_tensor() if _is_dtensor(v) else v).detach().cpu()
        out[k] = seen[id(v)]
    return out


def load_full_state_dict(model: torch.nn.Module, sd: dict, strict: bool = False):
    """Load a full state dict into an FSDP2-sharded model. Returns (missing, unexpected)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    result = set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=strict))
    return result.missing_keys, result.unexpected_keys


def _with_device(cfg, device: torch.device, checkpointing: bool | None = None):
    import dataclasses

    kw = {"device": str(device)}
    if checkpointing is not None:
        kw["gradient_checkpointing"] = checkpointing and cfg.gradient_checkpointing
    return dataclasses.replace(cfg, **kw)
