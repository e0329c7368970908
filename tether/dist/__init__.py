"""Optional scale-out backends: the two seams (Engine, Rollout) implemented on existing systems.

    ddp.py            DDPEngine, FSDPEngine (torch.distributed, launched with torchrun)
    lora.py           PEFT LoRA for policy / critic / reward model; reference = adapters disabled
    ray_ppo.py        Ray actors with the local objects' method names; PPO as a single controller
    reward_server.py  a reward model behind HTTP, and a client usable as a reward function
    vllm_rollout.py   generation in vLLM (CUDA only; unverified on CPU machines)

This file imports only torch: the rank helpers below are used by the core (sampler, tracker,
checkpoints) so that a run under torchrun shards its batches and writes files from rank 0 only.
Outside torchrun (no process group) every helper is the single-process identity.
"""

from __future__ import annotations

import torch


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if _initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if _initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _initialized() and world_size() > 1:
        torch.distributed.barrier()


def shard_indices(indices: list[int], what: str = "batch_size") -> list[int]:
    """This rank's contiguous slice of a global batch of indices (the whole list in one process).

    world_size x local batch = global batch, so `batch_size` means the same thing at any scale.
    """
    w = world_size()
    if w == 1:
        return indices
    if len(indices) % w:
        from tether.config import ConfigError

        raise ConfigError(f"config key '{what}': a global batch of {len(indices)} does not split over {w} data-parallel processes")
    k = len(indices) // w
    r = rank()
    return indices[r * k : (r + 1) * k]


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
