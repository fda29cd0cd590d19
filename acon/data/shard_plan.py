"""Which samples of a shard split each rank and each loader worker reads (pure planning, no I/O).

The shards of an epoch, permuted with (seed, epoch), are read as one sequence of samples. Rank ``r`` of
``W`` takes a contiguous range of it: for training ``ceil(N / W)`` samples from ``r * ceil(N / W)``,
wrapping around to the start as ``DistributedSampler`` pads, of which it uses ``per_rank // batch`` whole
batches (the trainer's ``n_train // global_batch``); for evaluation ``[r * N // W, (r + 1) * N // W)``,
every sample exactly once. Ranks therefore share shards when there are fewer shards than ranks.

Within a rank the batches are dealt to the DataLoader's workers in the order the DataLoader collects
them (round robin): batch ``k`` of the epoch is the ``k // nw``-th batch of worker role ``k % nw``, and
each role reads one contiguous run of whole batches. A run resumed after ``d`` batches gives worker
``w`` the role ``(w + d) % nw`` and lets each role skip the batches it had already delivered, so the
resumed loader yields exactly batches ``d, d + 1, ...`` of the uninterrupted epoch, whatever ``nw``.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

import torch

__all__ = ["WorkerPlan", "batch_quotas", "epoch_order", "rank_range", "segments", "worker_plan"]

Segment = tuple[int, int, int]  # (shard index, first sample within the shard, number of samples)


@dataclass(frozen=True)
class WorkerPlan:
    """What one loader worker reads: ``segments`` in order, of which the first ``skip`` samples were
    already delivered before a resume (read, not decoded); ``role`` seeds its randomness."""

    segments: list[Segment]
    skip: int
    role: int

    @property
    def count(self) -> int:
        """Samples in the worker's stream, the skipped ones included."""
        return sum(n for _, _, n in self.segments)


def epoch_order(n_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The shard order of ``epoch``: a permutation seeded by (seed, epoch), the same on every rank."""
    if not shuffle:
        return list(range(n_shards))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_shards, generator=g).tolist()


def rank_range(total: int, rank: int, world_size: int, pad: bool = True) -> tuple[int, int]:
    """(first sample, number of samples) of ``rank`` in the epoch's sample sequence of ``total``."""
    if pad:
        per_rank = math.ceil(total / world_size)
        return rank * per_rank, per_rank
    first = rank * total // world_size
    return first, (rank + 1) * total // world_size - first


def segments(order: list[int], lengths: list[int], start: int, count: int) -> list[Segment]:
    """The samples ``[start, start + count)`` of the shards concatenated in ``order``, wrapping around."""
    total = sum(lengths)
    if count <= 0 or total == 0:
        return []
    ends = list(itertools.accumulate(lengths[s] for s in order))
    pos, left, out = start % total, count, []
    i = bisect.bisect_right(ends, pos)
    while left > 0:
        sid, begin = order[i], ends[i] - lengths[order[i]]
        take = min(ends[i] - pos, left)
        if take > 0:
            out.append((sid, pos - begin, take))
        left, pos, i = left - take, pos + take, i + 1
        if i == len(order):
            i, pos = 0, 0
    return out


def batch_quotas(n_batches: int, num_workers: int) -> list[int]:
    """Batches per worker role when the DataLoader collects ``n_batches`` round robin."""
    return [n_batches // num_workers + (1 if w < n_batches % num_workers else 0) for w in range(num_workers)]


def worker_plan(
    lengths: list[int],
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    pad: bool = True,
    batches_done: int = 0,
) -> WorkerPlan:
    """The plan of loader ``worker`` on ``rank``; ``pad`` (training): whole batches only, resumable."""
    start, count = rank_range(sum(lengths), rank, world_size, pad)
    n_batches = count // batch_size if pad else math.ceil(count / batch_size)
    batches_done = min(batches_done, n_batches) if pad else 0
    role = (worker + batches_done) % num_workers
    quotas = batch_quotas(n_batches, num_workers)
    first = sum(quotas[:role]) * batch_size
    mine = max(0, min(quotas[role] * batch_size, count - first))
    done = max(0, math.ceil((batches_done - role) / num_workers))
    order = epoch_order(len(lengths), seed, epoch, shuffle)
    return WorkerPlan(segments(order, lengths, start + first, mine), done * batch_size, role)
