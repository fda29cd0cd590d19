"""Samplers that make training resumable mid-epoch and evaluation exact-once under DDP."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler


class ResumableTrainSampler(Sampler):
    """Shuffles with a generator seeded by (seed, epoch), shards by rank and yields (index, sample_seed).

    Each rank gets the same number of samples: the tail that does not fill a global batch is dropped,
    as the paper's per-iteration recipe does. ``set_position(epoch, batches_done)`` skips the batches
    an interrupted run already consumed. The per-sample seed makes augmentation a function of
    (seed, epoch, index), independent of worker count and of resumption.
    """

    def __init__(
        self,
        size: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if size < global_batch:
            from acon.errors import ConfigError

            raise ConfigError(
                f"the training set has {size} samples, fewer than one global batch of {global_batch} "
                f"(recipe.batch_size): set recipe.batch_size to at most {size}, or add images"
            )
        self.size, self.rank, self.world_size = size, rank, world_size
        self.global_batch, self.seed, self.shuffle = global_batch, seed, shuffle
        self.batches_per_epoch = size // global_batch
        self.per_rank_batch = global_batch // world_size
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, batches_done: int = 0) -> None:
        """Start the next iteration at ``epoch`` after ``batches_done`` of its batches."""
        self.epoch, self.start_batch = epoch, batches_done

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.per_rank_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
        order = order[: self.batches_per_epoch * self.global_batch]
        seeds = torch.randint(2**62, (self.size,), generator=g)
        mine = order[self.rank :: self.world_size][self.start_batch * self.per_rank_batch :]
        for idx in mine.tolist():
            yield idx, int(seeds[idx])


class ExactShardSampler(Sampler):
    """Rank r takes indices r, r+W, r+2W, …: every sample exactly once, no padding or duplicates."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, size, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


class SeededDataset(Dataset):
    """Wraps a dataset so that keys (index, seed) seed torch's RNG before loading that sample.

    Only the CPU generator is seeded: the transforms draw from it alone, so samples are the same as with
    ``torch.manual_seed``, which also seeds (or queues seeding for) every CUDA generator at ~100x the cost.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        if torch.utils.data.get_worker_info() is None:  # main process: keep the training RNG untouched
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                return self.dataset[index]
        torch.default_generator.manual_seed(seed)  # CPU RNG only: ~100x cheaper than torch.manual_seed
        return self.dataset[index]
