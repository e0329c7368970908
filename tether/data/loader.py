"""A seeded batch sampler whose position is part of the checkpoint, so a resumed run sees exactly
the batches the uninterrupted run would have seen."""

from __future__ import annotations

import torch


class BatchSampler:
    """Yields lists of indices into a dataset of `n` items, `batch_size` at a time, forever.

    `batch_size` is the global batch: with N data-parallel processes each rank gets its own
    contiguous batch_size/N slice of the same global batch, so every rank keeps the same position.

    Epoch e uses the permutation drawn from a generator seeded with (seed, e), so it depends only
    on the seed and the epoch, never on how many batches were drawn before a restart. The last
    incomplete batch of an epoch is dropped (and counted in `dropped_per_epoch`) so every step
    sees a full batch; the dropped items differ from epoch to epoch when shuffling.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        if n <= 0:
            raise ValueError("no training examples")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.batch_size = min(batch_size, n)
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation(0)

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    @property
    def dropped_per_epoch(self) -> int:
        return self.n - self.steps_per_epoch * self.batch_size

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self) -> list[int]:
        if self.pos + self.batch_size > self.n:
            self.epoch += 1
            self.pos = 0
            self._perm = self._permutation(self.epoch)
        idx = self._perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        # Under torchrun each rank takes its slice of the global batch (identity in one process).
        from tether.ranks import shard_indices

        return shard_indices(idx)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation(self.epoch)
