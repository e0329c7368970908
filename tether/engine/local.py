"""One process, CPU or one GPU: the default engine."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import math
import sys
from typing import Any, Callable, Iterator

import torch
from torch import nn

from tether.models import resolve_autocast, resolve_device
from tether.packing import enable_packing
from tether.types import Batch


def keep_freed_memory() -> None:
    """glibc serves blocks over 32 MB with their own mmap and trims its heap, so each step's large tensors
    would be new pages that the kernel zero-fills on first touch; keep freed memory in the process instead,
    as the jemalloc / tcmalloc that PyTorch's CPU tuning guide recommends do (benchmarks/README)."""
    if sys.platform.startswith("linux") and hasattr(libc := ctypes.CDLL(None), "mallopt"):
        libc.mallopt(-4, 0), libc.mallopt(-1, 2**31 - 1), libc.mallopt(-2, 64 << 20)  # M_MMAP_MAX 0, M_TRIM_THRESHOLD, M_TOP_PAD


def make_optimizer(params: list[nn.Parameter], cfg) -> torch.optim.Optimizer:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # biases and norms are not decayed
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    # The fused kernel (CPU and CUDA since torch 2.4) updates every parameter in one pass instead of
    # ~10 elementwise ops per parameter tensor; same maths.
    if all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"]):
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(groups, **kw)


def make_schedule(optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm, total = cfg.warmup_steps, max(total_steps, 1)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if cfg.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def merge_metrics(parts: list[tuple[int, dict[str, torch.Tensor]]], total: int) -> dict[str, float]:
    """`loss/*` metrics are partial sums under the global normaliser: add them. Others: size-weighted mean."""
    out: dict[str, float] = {}
    for n, metrics in parts:
        for k, v in metrics.items():
            v = float(v)
            out[k] = out.get(k, 0.0) + (v if k.startswith("loss/") else v * n / total)
    return out


class LocalEngine:
    def __init__(self, model: nn.Module, cfg, optim_cfg=None, total_steps: int = 0, trainable: bool = True):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.model = model.to(self.device)
        if (cfg.padding_free == "on" or (cfg.padding_free == "auto" and self.device.type == "cpu")) and not (trainable and cfg.gradient_checkpointing):
            # padding-free, prefix-shared passes; the recomputation of gradient checkpointing runs outside them
            enable_packing(model)
        self.autocast_dtype = resolve_autocast(cfg.precision, self.device)
        self.trainable = trainable and optim_cfg is not None
        self.optim_cfg = optim_cfg
        self.optimizer = None
        self.scheduler = None
        if self.trainable:
            if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            params = [p for p in model.parameters() if p.requires_grad]
            self.optimizer = make_optimizer(params, optim_cfg)
            self.scheduler = make_schedule(self.optimizer, optim_cfg, total_steps)
        else:
            model.requires_grad_(False)
            model.eval()

    # -- helpers -----------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def micro_batches(self, batch: Batch) -> list[Batch]:
        return batch.split(self.cfg.micro_batch_size)

    def global_sum(self, value: float) -> float:
        return float(value)

    def rollout(self, cls, tokenizer):
        return cls(self.model, tokenizer, self.device, self.autocast_dtype)

    def without_adapters(self) -> None:  # tether.backends.lora's mixin has adapters
        return None

    # -- the protocol --------------------------------------------------------------------------
    def train_step(self, batch: Batch, loss_fn: Callable):
        assert self.optimizer is not None, "train_step on a frozen engine"
        self.model.train()
        parts, outs = [], []
        for mb in self.micro_batches(batch):
            mb = mb.to(self.device)
            with self.autocast():
                loss, metrics, *out = loss_fn(self.model, mb)
            loss.backward()
            parts.append((len(mb), metrics))
            outs += out
        return with_outputs(self._step(merge_metrics(parts, len(batch))), outs)

    def _step(self, metrics: dict[str, float]) -> dict[str, float]:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = self._clip_grad_norm(params, self.optim_cfg.grad_clip)
        metrics["optim/grad_norm"] = float(grad_norm)
        metrics["optim/lr"] = self.optimizer.param_groups[0]["lr"]  # what this step uses
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            metrics["optim/skipped"] = 0.0
        else:  # a non-finite gradient never reaches the weights
            metrics["optim/skipped"] = 1.0
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def _clip_grad_norm(self, params: list[nn.Parameter], clip: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))

    def _apply(self, fn: Callable[[nn.Module, Any], Any], mb: Any) -> Any:
        """fn(model, mb); a sharded engine routes it through its wrapper's hooks instead."""
        return fn(self.model, mb)

    @torch.no_grad()
    def forward(self, batch: Batch, fn: Callable[[nn.Module, Any], Any], micro_batch_size: int | None = None) -> Any:
        was_training = self.model.training
        self.model.eval()
        outs = []
        mbs = self.cfg.micro_batch_size if micro_batch_size is None else micro_batch_size
        for mb in batch.split(mbs):
            with self.autocast():
                outs.append(self._apply(fn, mb.to(self.device)))
        self.model.train(was_training)
        return _concat(outs)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.model.named_parameters()

    def _gathered(self) -> dict | None:  # the full weights where the module holds a shard (FSDP)
        return None

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        check_keys(self.model, *self.model.load_state_dict(state_dict, strict=False))

    def save_model(self, path, tokenizer=None, merged: bool = True) -> None:
        from tether.checkpoint import save_model_folder

        save_model_folder(self.model, path, tokenizer, self._gathered())

    def optimizer_state(self) -> dict | None:
        if self.optimizer is None:
            return None
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])

    def scale_lr(self, factor: float) -> None:  # now and for the rest of the schedule
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        for g in self.optimizer.param_groups:
            g["lr"] *= factor

    def snapshot(self, with_optimizer: bool = True) -> dict:
        """A copy of the weights (and optimizer state: 2x the weights under AdamW; keep_best needs none) for a
        rollback. This process's own tensors: the gathered `optimizer_state()` would, before the first step,
        give AdamW a step of its own (torch.distributed.checkpoint initialises an empty state that way)."""
        keep = with_optimizer and self.optimizer is not None
        return {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optim": copy.deepcopy((self.optimizer.state_dict(), self.scheduler.state_dict())) if keep else None,
        }

    def restore(self, snap: dict) -> None:
        self.model.load_state_dict(snap["model"])
        if snap["optim"] is not None:
            self.optimizer.load_state_dict(snap["optim"][0])
            self.scheduler.load_state_dict(snap["optim"][1])


def check_keys(model: nn.Module, missing: list[str], unexpected: list[str]) -> None:
    """Tied weights (lm_head = wte) are stored once; any other missing or unexpected key is an error."""
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise RuntimeError(f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def with_outputs(metrics: dict[str, float], outs: list) -> Any:
    """train_step's result: the metrics, or (metrics, outputs) when the loss_fn returned per-row outputs."""
    return (metrics, _concat([o.detach().cpu() for o in outs])) if outs else metrics


def _concat(outs: list[Any]) -> Any:
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs, 0) if first.dim() > 0 else torch.stack(outs)
    if isinstance(first, tuple):
        return tuple(_concat([o[i] for o in outs]) if first[i] is not None else None for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([o[k] for o in outs]) for k in first}
    return outs
