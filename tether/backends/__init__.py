"""Optional scale-out backends: the two seams (Engine, Rollout) implemented on existing systems.

    ddp.py            DDPEngine, FSDPEngine (torch.distributed, launched with torchrun)
    lora.py           PEFT LoRA for policy / critic / reward model; reference = adapters disabled
    ray_ppo.py        Ray actors with the local objects' method names; PPO as a single controller
    reward_server.py  a reward model behind HTTP, and a client usable as a reward function
    vllm_rollout.py   generation in vLLM (CUDA only; unverified on CPU machines)

Nothing in the core imports these modules except through the backend tables (tether.engine,
tether.rollout). The rank helpers live in tether.ranks. This file keeps the FSDP2 full-state-dict
helpers, which import only torch.
"""

from __future__ import annotations

import torch


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def full_state_dict(model: torch.nn.Module) -> dict | None:
    """The full (unsharded) state dict of an FSDP2-sharded model, on every rank; None if not sharded.

    A collective: every rank must call it. Tied weights stay one tensor (so `save_pretrained`
    still de-duplicates them).
    """
    if not isinstance(model, torch.nn.Module):  # a stand-in for a model in another process
        return None
    sd = model.state_dict(keep_vars=True)  # Parameters themselves, so tied weights share an id
    if not any(_is_dtensor(v) for v in sd.values()):
        return None
    seen: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in sd.items():
        if id(v) not in seen:
            seen[id(v)] = (v.full_tensor() if _is_dtensor(v) else v).detach().cpu()
        out[k] = seen[id(v)]
    return out


def load_full_state_dict(model: torch.nn.Module, sd: dict, strict: bool = False):
    """Load a full state dict into a model that may be FSDP2-sharded. Returns (missing, unexpected)."""
    if not isinstance(model, torch.nn.Module) or not any(_is_dtensor(v) for v in model.state_dict().values()):
        return model.load_state_dict(sd, strict=strict)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    result = set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=strict))
    return result.missing_keys, result.unexpected_keys
