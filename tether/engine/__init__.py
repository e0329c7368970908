"""Training engines: where devices, precision, micro-batching, gradient accumulation, data-parallel
reduction, the optimizer and its schedule live. Algorithms only see the `Engine` protocol.

Backends are chosen in one place (`make_engine`) from a table of dotted paths, imported lazily, so
the core never imports torch.distributed wrappers, DeepSpeed or Ray unless asked.
"""

from __future__ import annotations

import importlib

from tether.engine.base import Engine, LossFn

BACKENDS = {
    "local": "tether.engine.local:LocalEngine",
    "ddp": "tether.backends.ddp:DDPEngine",
    "fsdp": "tether.backends.ddp:FSDPEngine",
    # Each engine becomes a Ray actor (a LocalEngine inside) behind a proxy with the same methods.
    "ray": "tether.backends.ray_ppo:remote_engine",
}


def engine_class(backend: str):
    if backend not in BACKENDS:
        from tether.config import ConfigError

        raise ConfigError(f"config key 'engine.backend': unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    module, name = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), name)


def make_engine(model, engine_cfg, optim_cfg=None, total_steps: int = 0, trainable: bool = True) -> Engine:
    """An engine for `model`. With `engine.lora.r > 0` trained models get LoRA adapters
    (tether.backends.lora); on Ray the actor that holds the model adds them."""
    lora = getattr(engine_cfg, "lora", None)
    if lora is not None and lora.r > 0 and engine_cfg.backend != "ray":
        from tether.backends.lora import make_lora_engine

        return make_lora_engine(engine_class(engine_cfg.backend), model, engine_cfg, optim_cfg, total_steps=total_steps, trainable=trainable)
    return engine_class(engine_cfg.backend)(model, engine_cfg, optim_cfg, total_steps=total_steps, trainable=trainable)


def make_reference(policy: Engine, engine_cfg, folder, policy_folder) -> Engine:
    """The frozen reference: the policy with its LoRA adapters off when `folder` is its starting point
    (`policy_folder`) and lora.shared_reference is on (one copy of the base weights); else `folder` frozen."""
    if str(folder) == str(policy_folder) and engine_cfg.lora.shared_reference:
        ref = policy.without_adapters()
        if ref is not None:
            return ref
    from tether.models import load_causal_lm

    return make_engine(load_causal_lm(folder), engine_cfg, None, trainable=False)  # frozen: eval mode, no dropout


__all__ = ["Engine", "LossFn", "make_engine", "make_reference", "engine_class", "BACKENDS"]
