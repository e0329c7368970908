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
    "ddp": "tether.dist.ddp:DDPEngine",
    "fsdp": "tether.dist.ddp:FSDPEngine",
    "ray": "tether.engine.local:LocalEngine",  # Ray places whole engines as actors (tether.dist.ray_ppo)
}


def engine_class(backend: str):
    if backend not in BACKENDS:
        from tether.config import ConfigError

        raise ConfigError(f"config key 'engine.backend': unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    module, name = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), name)


def make_engine(model, engine_cfg, optim_cfg=None, total_steps: int = 0, trainable: bool = True) -> Engine:
    return engine_class(engine_cfg.backend)(model, engine_cfg, optim_cfg, total_steps=total_steps, trainable=trainable)


__all__ = ["Engine", "LossFn", "make_engine", "engine_class", "BACKENDS"]
