"""The order in which training windows are visited, by global batch.

Epoch e visits a permutation of the windows seeded by (seed, e); optimizer step k of the epoch
uses global batch k of it, and rank r of W workers takes the r-th contiguous 1/W of that batch.
So every optimizer step sees the same samples whatever the number of workers, and a position
is just (epoch, global batches consumed): a resume on any worker count lands on the same sample.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler


class GlobalBatchSampler(DistributedSampler):
    """A DistributedSampler (Ray's `prepare_data_loader` keeps it as it is) that deals out global
    batches, reshuffles each epoch (`set_epoch`) and can start mid-epoch (`set_position`)."""

    def __init__(self, dataset: Dataset, global_batch: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not divide over {world_size} workers")
        self.global_batch = global_batch
        self.per_rank = global_batch // world_size
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch  # the last partial batch is dropped, as the recipe's data loader

    def set_position(self, epoch: int, start_batch: int) -> None:
        """Visit epoch `epoch` from global batch `start_batch` on."""
        self.set_epoch(epoch)
        self.start_batch = start_batch

    def epoch_order(self) -> torch.Tensor:
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)  # DistributedSampler's own recipe
        return torch.randperm(n, generator=g)

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        b, p, r = self.global_batch, self.per_rank, self.rank
        for k in range(self.start_batch, self.batches_per_epoch):
            yield from order[k * b + r * p: k * b + (r + 1) * p].tolist()

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch) * self.per_rank
