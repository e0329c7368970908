"""Rank helpers: under torchrun the core shards its batches and writes files from rank 0 only; outside
it (no process group) each helper is the single-process identity."""

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


def barrier(value=None):
    """Wait for every rank; returns `value`, so `if barrier(path.exists())` decides on every rank before any passes."""
    if _initialized() and world_size() > 1:
        torch.distributed.barrier()
    return value


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
