"""Aspect-ratio grouping (torchvision's ``GroupedBatchSampler``) that resumes mid-epoch exactly.

torchvision's detection reference batches images of similar aspect ratio (``--aspect-ratio-group-factor
3``): fewer padded pixels per batch. :class:`GroupedTrainSampler` arranges each rank's share of an epoch so
that consecutive ``per_rank_batch`` indices share a group; the loader batches them as usual. The order is a
function of (seed, epoch, rank, world size) only, so ``set_position`` skips consumed batches exactly.

Difference from torchvision: the samples left over in partly filled groups at the end of an epoch form the
last batches in their shuffled order (mixed groups) instead of being topped up with repeated samples of
one group, so every sample is seen once per epoch and every rank has the same number of batches.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from acon.data.samplers import ResumableTrainSampler


def aspect_ratio_groups(aspect_ratios: Sequence[float], factor: int) -> list[int]:
    """torchvision's ``create_aspect_ratio_groups``: bins at ``2 ** linspace(-1, 1, 2 * factor + 1)`` of
    width / height; returns each image's bin (0 .. 2 * factor + 1)."""
    bins = (2 ** torch.linspace(-1, 1, 2 * factor + 1)).tolist()
    return [bisect.bisect_right(bins, float(r)) for r in aspect_ratios]


def group_batches(indices: Sequence[int], groups: Sequence[int], batch: int) -> list[list[int]]:
    """``indices`` cut into batches of ``batch``: a batch is emitted as soon as one group has ``batch``
    members (torchvision's order); the rest follow in their given order, mixed."""
    buffers: dict[int, list[int]] = {}
    batches = []
    for idx in indices:
        buf = buffers.setdefault(groups[idx], [])
        buf.append(idx)
        if len(buf) == batch:
            batches.append(buf.copy())
            buf.clear()
    left = sorted((i for buf in buffers.values() for i in buf), key={v: k for k, v in enumerate(indices)}.get)
    batches += [left[k : k + batch] for k in range(0, len(left) - batch + 1, batch)]
    return batches


class GroupedTrainSampler(ResumableTrainSampler):
    """:class:`ResumableTrainSampler` whose per-rank order batches images of one aspect-ratio group."""

    def __init__(
        self, group_ids: Sequence[int], global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0
    ) -> None:
        super().__init__(len(group_ids), global_batch, rank, world_size, seed)
        self.group_ids = list(group_ids)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
        order = order[: self.batches_per_epoch * self.global_batch]
        seeds = torch.randint(2**62, (self.size,), generator=g)
        mine = order[self.rank :: self.world_size].tolist()
        batches = group_batches(mine, self.group_ids, self.per_rank_batch)
        for batch in batches[self.start_batch :]:
            for idx in batch:
                yield idx, int(seeds[idx])
