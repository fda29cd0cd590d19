"""One entry point for every input path: ``data.pipeline=reference|fast|gpu|shards|shards_gpu``.

Every path yields the same augmentation distribution as the reference (same seeded parameters per
sample) and normalised float batches on the training device once wrapped in :class:`DeviceLoader`::

    pipe = build_train_pipeline("fast", root / "train", img_size=224)
    loader = build_loader(pipe, global_batch=1024, num_workers=8, rank=r, world_size=w, seed=0)
    for images, targets, n_bad in DeviceLoader(loader, pipe.device_transform, device):
        ...
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from acon.data.fast import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FastTrainTransform,
    FastValTransform,
    collate_augment,
    read_bytes,
)
from acon.data.folder import ImageFolderDataset, collate_skipping_bad
from acon.data.gpu import DeviceAugment, DeviceLoader, EncodedTrainTransform
from acon.data.samplers import ExactShardSampler, ResumableTrainSampler, SeededDataset
from acon.data.shards import ShardDataset, bytes_tensor
from acon.data.transforms import train_transform, val_transform
from acon.preempt import worker_ignores_stop_signals

__all__ = [
    "PIPELINES",
    "DeviceLoader",
    "Pipeline",
    "build_loader",
    "build_train_pipeline",
    "build_val_pipeline",
]

PIPELINES = ("reference", "fast", "gpu", "shards", "shards_gpu")


@dataclass
class Pipeline:
    """A dataset, its collate function and the batch stage to run on the device (None: already final)."""

    name: str
    dataset: Dataset
    collate_fn: Callable
    device_transform: DeviceAugment | None

    @property
    def iterable(self) -> bool:
        """True for streaming (shard) datasets, which take no sampler."""
        return isinstance(self.dataset, torch.utils.data.IterableDataset)


def _check(name: str) -> None:
    if name not in PIPELINES:
        raise ValueError(f"data.pipeline={name!r} is not one of {PIPELINES}")


def build_train_pipeline(
    name: str,
    root: str | os.PathLike,
    img_size: int = 224,
    color_jitter: float = 0.4,
    scale: tuple = (0.08, 1.0),
    hflip: bool = True,
    mean: tuple = IMAGENET_MEAN,
    std: tuple = IMAGENET_STD,
    classes: list[str] | None = None,
    bad_image_policy: str = "raise",
    index_cache: bool = False,
    index_cache_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    out_dtype: torch.dtype = torch.float32,
    preprocess: str = "rgb_normalized",
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    channels_last: bool | None = None,
) -> Pipeline:
    """The training pipeline ``name``; ``root`` is a class folder (or a shard folder for shards*).

    ``channels_last``: the memory format of the batches (None: channels-last on CUDA only)."""
    _check(name)
    p = 0.5 if hflip else 0.0
    dev = DeviceAugment(
        img_size,
        mean,
        std,
        bool(color_jitter),
        device,
        out_dtype=out_dtype,
        preprocess=preprocess,
        channels_last=channels_last,
    )
    folder = dict(
        classes=classes,
        bad_image_policy=bad_image_policy,
        index_cache=index_cache,
        index_cache_dir=index_cache_dir,
    )
    shard = dict(split=split, rank=rank, world_size=world_size, seed=seed)
    if name == "reference":
        tf = train_transform(img_size, color_jitter, tuple(scale), hflip, preprocess, mean, std)
        return Pipeline(name, ImageFolderDataset(root, tf, **folder), collate_skipping_bad, None)
    if name in ("fast", "shards"):  # workers decode and crop; the batch stage jitters and normalises
        tf = FastTrainTransform(img_size, scale, color_jitter=color_jitter, hflip=p)
    else:  # gpu, shards_gpu: workers only read bytes and draw the parameters
        tf = EncodedTrainTransform(scale, color_jitter=color_jitter, hflip=p)
    if name.startswith("shards"):
        ds = ShardDataset(root, transform=tf, loader=bytes_tensor, **shard)
    else:
        ds = ImageFolderDataset(root, tf, loader=read_bytes, **folder)
    return Pipeline(name, ds, collate_augment, dev)


def build_val_pipeline(
    name: str,
    root: str | os.PathLike,
    img_size: int = 224,
    resize: int = 256,
    mean: tuple = IMAGENET_MEAN,
    std: tuple = IMAGENET_STD,
    classes: list[str] | None = None,
    bad_image_policy: str = "raise",
    index_cache: bool = False,
    index_cache_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    out_dtype: torch.dtype = torch.float32,
    preprocess: str = "rgb_normalized",
    split: str = "val",
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool | None = None,
) -> Pipeline:
    """Validation pipeline: the reference Resize+CenterCrop pixels, normalised on the device except for
    ``reference``; shard paths read each of the rank's shards once (no padding)."""
    _check(name)
    folder = dict(
        classes=classes,
        bad_image_policy=bad_image_policy,
        index_cache=index_cache,
        index_cache_dir=index_cache_dir,
    )
    if name == "reference":
        tf = val_transform(img_size, resize, preprocess, mean, std)
        ds = ImageFolderDataset(root, tf, **folder)
        return Pipeline(name, ds, collate_skipping_bad, None)
    tf = FastValTransform(img_size, resize, preprocess)
    dev = DeviceAugment(
        img_size,
        mean,
        std,
        False,
        device,
        out_dtype=out_dtype,
        preprocess=preprocess,
        channels_last=channels_last,
    )
    if name.startswith("shards"):
        ds = ShardDataset(
            root, split, tf, bytes_tensor, shuffle=False, rank=rank, world_size=world_size, pad=False
        )
    else:
        ds = ImageFolderDataset(root, tf, **folder)
    return Pipeline(name, ds, collate_augment, dev)


def build_loader(
    pipe: Pipeline,
    global_batch: int,
    num_workers: int = 4,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    train: bool = True,
    pin_memory: bool | None = None,
    persistent_workers: bool = False,
    prefetch_factor: int = 4,
) -> DataLoader:
    """A DataLoader for ``pipe``: the suite's resumable seeded sampler for folders, streaming for shards."""
    per_rank = global_batch // world_size
    kw = dict(
        num_workers=num_workers,
        collate_fn=pipe.collate_fn,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )
    if num_workers > 0:
        kw.update(persistent_workers=persistent_workers and train, prefetch_factor=prefetch_factor)
        kw.update(worker_init_fn=worker_ignores_stop_signals)  # the trainer turns them into a checkpoint
    if pipe.iterable:  # whole batches per worker: exactly len // per_rank batches on every rank
        pipe.dataset.batch_size = per_rank
        if train and len(pipe.dataset) < per_rank:
            raise ValueError(
                f"{pipe.dataset.root}: {len(pipe.dataset)} training samples per rank, fewer than one "
                f"batch of {per_rank} (global batch {global_batch} over {world_size} ranks)"
            )
        return DataLoader(pipe.dataset, batch_size=per_rank, drop_last=train, **kw)
    if not train:
        sampler = ExactShardSampler(len(pipe.dataset), rank, world_size)
        return DataLoader(pipe.dataset, batch_size=per_rank, sampler=sampler, **kw)
    sampler = ResumableTrainSampler(len(pipe.dataset), global_batch, rank, world_size, seed)
    return DataLoader(
        SeededDataset(pipe.dataset),
        batch_size=sampler.per_rank_batch,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed + rank),
        **kw,
    )
