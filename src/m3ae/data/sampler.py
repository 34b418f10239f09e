"""Deterministic, resumable order over an indexed dataset, split across ranks.

Micro-batch m of rank r holds global positions [(m * world + r) * B, ... + B) of an endless stream
that walks a fresh seeded permutation each epoch. The position is a pure function of m, so
resuming at micro-batch m reproduces exactly the samples (and masks) never stopping would have seen.
"""
from __future__ import annotations

from typing import Iterator

import torch


class IndexedBatchSampler(torch.utils.data.Sampler):
    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, start: int = 0,
                 stop: int | None = None, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.stop = stop
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 7_777_777 + epoch)
                self._perm = torch.randperm(self.num_samples, generator=g)
            else:
                self._perm = torch.arange(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def batch_indices(self, micro_batch: int) -> list[int]:
        first = (micro_batch * self.world_size + self.rank) * self.batch_size
        out = []
        for pos in range(first, first + self.batch_size):
            epoch, within = divmod(pos, self.num_samples)
            out.append(int(self._permutation(epoch)[within]))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        m = self.start
        while self.stop is None or m < self.stop:
            yield [(m, i) for i in self.batch_indices(m)]
            m += 1

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("endless sampler has no length")
        return max(self.stop - self.start, 0)
