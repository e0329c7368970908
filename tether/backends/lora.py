"""LoRA (PEFT) for the policy, the critic and the reward model; the reference is the policy with its
adapters disabled, so the base weights exist once.

    tether ppo --config configs/ppo_lora.yaml            # engine.lora.r=8 engine.lora.alpha=16
    tether sft model=DIR data.train=demos.jsonl engine.lora.r=8 engine.lora.target_modules=c_attn

Chosen by config in `make_engine` (tether.engine), so the algorithm files do not change:
- a *trained* model gets adapters (Hu et al. 2021: W + (alpha/r) B A, B = 0 at start, so step 0 is
  the base model exactly). A reward model's or critic's scalar `score` head stays fully trainable.
  Engines and loss code see the ordinary Hugging Face module with LoRA layers injected into it (not
  the PeftModel wrapper), so `backbone(model)`, `score_head(model)` and `generate` work unchanged.
- the reference of a LoRA policy (`tether.engine.make_reference`, when it would be loaded from the
  policy's own folder) is `policy.without_adapters()`: the policy's forward under `disable_adapter()`.
- checkpoints hold the whole module (base + adapters) so `--resume` restores exactly;
  `engine.save_model` writes the merged weights as a plain HF folder plus the adapter in `adapter/`.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable

import torch
from torch import nn

def _is_scalar(model: nn.Module) -> bool:
    return any(isinstance(getattr(model, n, None), nn.Linear) for n in ("score", "classifier"))


def apply_lora(model: nn.Module, cfg) -> nn.Module:
    """Inject LoRA layers into `model` (in place) and return it; the PeftModel is kept on the side
    (`model.__dict__['_tether_peft']`) for disable_adapter / merge / save."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        from tether.config import ConfigError

        raise ConfigError("config key 'engine.lora.r': LoRA needs PEFT: pip install 'tether[lora]'") from None
    lc = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
        target_modules=list(cfg.target_modules) or None,
    )
    peft_model = get_peft_model(model, lc)  # freezes every non-LoRA weight
    inner = peft_model.base_model.model
    assert inner is model
    if _is_scalar(model):
        from tether.models import score_head

        score_head(model).requires_grad_(True)  # a new head must learn; it is small
    model.__dict__["_tether_peft"] = peft_model  # not a submodule: no cycle in modules()
    return model


def peft_of(model: nn.Module):
    return model.__dict__.get("_tether_peft")


def make_lora_engine(cls, model: nn.Module, engine_cfg, optim_cfg=None, total_steps: int = 0, trainable: bool = True):
    """`cls` (the engine class of engine.backend) around `model` with LoRA adapters; a frozen model
    (a reward model, or a reference from another folder) gets none."""
    if not trainable or optim_cfg is None:
        return cls(model, engine_cfg, optim_cfg, total_steps=total_steps, trainable=trainable)
    apply_lora(model, engine_cfg.lora)
    return _with_lora(cls)(model, engine_cfg, optim_cfg, total_steps=total_steps, trainable=trainable)


class LoRA:
    """Mixed into an engine class: saves merge the adapters, and the reference is this model with them off."""

    def save_model(self, path, tokenizer=None, merged: bool = True) -> None:
        if not merged:
            return super().save_model(path, tokenizer, merged)
        from tether.checkpoint import save_model_folder

        adapter = peft_of(self.model)
        save_model_folder(merged_copy(adapter, self._gathered()), path, tokenizer, extra=lambda d: adapter.save_pretrained(str(d / "adapter")))

    def without_adapters(self) -> "AdapterDisabledEngine":
        return AdapterDisabledEngine(self)


@functools.cache
def _with_lora(cls):
    return type(f"LoRA{cls.__name__}", (LoRA, cls), {})


class AdapterDisabledEngine:
    """A frozen engine that is the LoRA policy with its adapters switched off: the base model."""

    def __init__(self, policy):
        self.policy = policy
        self.device = policy.device
        self.autocast_dtype = getattr(policy, "autocast_dtype", None)
        self.peft = peft_of(policy.model)

    def forward(self, batch, fn: Callable[[nn.Module, Any], Any], micro_batch_size: int | None = None) -> Any:
        with self.peft.disable_adapter():
            return self.policy.forward(batch, fn, micro_batch_size)

    def train_step(self, batch, loss_fn):
        raise RuntimeError("the reference (the LoRA policy with adapters disabled) is frozen")

    def global_sum(self, value: float) -> float:
        return self.policy.global_sum(value)

    def without_adapters(self) -> "AdapterDisabledEngine":
        return self

    def named_parameters(self):
        return iter(())  # owns no weights of its own

    def optimizer_state(self) -> None:
        return None

    def load_optimizer_state(self, state: dict) -> None:
        pass

    def snapshot(self, with_optimizer: bool = True) -> dict:
        return {}

    def restore(self, snap: dict) -> None:
        pass


def merged_copy(peft_model, state_dict: dict | None = None) -> nn.Module:
    """A plain HF model with W + (alpha/r) B A folded in (the training model is left untouched)."""
    clone = copy.deepcopy(peft_model)
    if state_dict is not None:  # FSDP: the gathered full weights of the LoRA-injected module
        clone.base_model.model.load_state_dict(state_dict)
    merged = clone.merge_and_unload()
    merged.__dict__.pop("_tether_peft", None)
    return merged


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain HF parameter names and merged weights: what a sampler (a rollout worker, vLLM) loads."""
    peft_model = peft_of(model)
    if peft_model is None:
        return {k: v.detach() for k, v in model.state_dict().items()}
    return {k: v.detach() for k, v in merged_copy(peft_model).state_dict().items()}
