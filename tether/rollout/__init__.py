"""Rollouts: the sampling seam. `HFRollout` (a decoding loop over a Hugging Face model with a static KV cache) is the default;
a vLLM rollout (tether.backends.vllm_rollout) implements the same protocol."""

import importlib

from tether.rollout.base import Rollout, SamplingConfig

BACKENDS = {"hf": "tether.rollout.hf:HFRollout", "vllm": "tether.backends.vllm_rollout:VLLMRollout"}


def rollout_class(name: str):
    if name not in BACKENDS:
        from tether.config import ConfigError

        raise ConfigError(f"config key 'rollout.backend': unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return _placed(getattr(importlib.import_module(module), cls))


def _placed(cls):
    """`cls(model, ...)`, except that a model living in another process (a Ray actor's stand-in,
    tether.backends.ray_ppo.RemoteModel) builds the rollout as a worker next to it."""

    def make(model, *args, **kwargs):
        remote = getattr(model, "remote_rollout", None)
        return remote(cls, *args, **kwargs) if remote is not None else cls(model, *args, **kwargs)

    make.cls = cls
    return make


__all__ = ["Rollout", "SamplingConfig", "rollout_class", "BACKENDS"]
