"""Rollouts: the sampling seam. `HFRollout` (a decoding loop over a Hugging Face model with a static KV cache) is the default;
a vLLM rollout (tether.backends.vllm_rollout) implements the same protocol. A rollout is built from an engine
(`make_rollout`), which decides where it runs."""

import importlib

from tether.rollout.base import Rollout, SamplingConfig

BACKENDS = {"hf": "tether.rollout.hf:HFRollout", "vllm": "tether.backends.vllm_rollout:VLLMRollout"}


def rollout_class(name: str):
    if name not in BACKENDS:
        from tether.config import ConfigError

        raise ConfigError(f"config key 'rollout.backend': unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_rollout(name: str, policy, tokenizer) -> Rollout:
    """A `name` sampler of the policy engine's model, placed by the engine (`Engine.rollout`)."""
    return policy.rollout(rollout_class(name), tokenizer)


__all__ = ["Rollout", "SamplingConfig", "rollout_class", "make_rollout", "BACKENDS"]
