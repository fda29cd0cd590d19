"""Datasets and loaders from the ``data`` config group."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from acon.cpu_budget import resolve_workers
from acon.data.digits import prepare_digits
from acon.data.folder import ImageFolderDataset, collate_skipping_bad, find_classes
from acon.data.samplers import ExactShardSampler, ResumableTrainSampler, SeededDataset
from acon.data.subsets import select_classes
from acon.data.synthetic import SyntheticDataset
from acon.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from acon.errors import ConfigError
from acon.preempt import worker_ignores_stop_signals
from acon.release import optional

DATA_KINDS = ("digits", "folder", "synthetic")


def resolve_root(cfg: DictConfig, splits: tuple[str, ...] | None = None) -> Path:
    """The dataset root holding ``splits`` (default train/ and val/), checked before any expensive work."""
    if cfg.kind == "digits":
        return prepare_digits(cfg.root)
    if not cfg.root:
        raise ConfigError(f"data.root is not set for data={cfg.name}; pass data.root=/path/to/imagenet")
    root = Path(cfg.root).expanduser()
    for split in splits or (cfg.train_split, cfg.val_split):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"data.root={str(root)!r}: missing folder {str(root / split)!r}")
    return root


def check_class_sets(
    train_dir: Path, val_dir: Path, num_classes: int, class_subset: str | None = None
) -> list[str]:
    """The class list, after checking that train/ and val/ agree and match ``num_classes``; with
    ``class_subset`` (``data.class_subset``), the subset's classes, each present in train/ and val/."""
    train, val = find_classes(train_dir), find_classes(val_dir)
    if class_subset:
        train, val = (
            select_classes(train, class_subset, train_dir),
            select_classes(val, class_subset, val_dir),
        )
        if len(train) != num_classes:
            raise ConfigError(
                f"data.class_subset={class_subset!r} has {len(train)} classes but data.num_classes={num_classes}; "
                f"set data.num_classes={len(train)} (data=imagenet100 sets both)"
            )
    if train != val:
        only_t, only_v = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise ConfigError(
            f"class folders differ between {train_dir} and {val_dir}: "
            f"only in train: {only_t[:10]}{'…' if len(only_t) > 10 else ''}; "
            f"only in val: {only_v[:10]}{'…' if len(only_v) > 10 else ''}"
        )
    if len(train) != num_classes:
        raise ConfigError(f"{train_dir} has {len(train)} class folders but data.num_classes={num_classes}")
    return train


def check_shard_subset(root: Path, class_subset: str) -> None:
    """Shards are written per class set: those at ``root`` must hold exactly the subset's classes."""
    from acon.data.shards import INFO_NAME, load_info

    held = list(load_info(root).get("classes", []))
    wanted = select_classes(held, class_subset, root / INFO_NAME)
    if held != wanted:
        raise ConfigError(
            f"data.class_subset={class_subset!r}: the shards at {root} hold {len(held)} classes, not only the "
            f"subset's {len(wanted)}; write subset shards with scripts/prepare_fast_imagenet.py "
            f"--class-subset {class_subset}"
        )


def index_options(cfg: DictConfig) -> dict:
    """The file-index cache settings of the data group (on unless ``data.index_cache=false``)."""
    return dict(index_cache=bool(cfg.get("index_cache", True)), index_cache_dir=cfg.get("index_cache_dir"))


def build_datasets(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for ``cfg`` (the data group)."""
    if cfg.kind not in DATA_KINDS:
        raise ValueError(f"data.kind={cfg.kind!r} is not one of {DATA_KINDS}")
    if cfg.kind == "synthetic":
        make = lambda n: SyntheticDataset(n, cfg.num_classes, cfg.img_size)  # noqa: E731
        return make(cfg.train_samples), make(cfg.val_samples)
    root = resolve_root(cfg)
    classes = check_class_sets(
        root / cfg.train_split, root / cfg.val_split, cfg.num_classes, cfg.get("class_subset")
    )
    kw = dict(classes=classes, bad_image_policy=cfg.bad_image_policy, **index_options(cfg))
    train = ImageFolderDataset(root / cfg.train_split, instantiate(cfg.train_transform), **kw)
    val = ImageFolderDataset(root / cfg.val_split, instantiate(cfg.val_transform), **kw)
    if train.empty_classes:
        raise ConfigError(
            f"empty class folders in {train.root}: "
            + ", ".join(str(train.root / c) for c in train.empty_classes)
        )
    if val.empty_classes:
        warnings.warn(f"empty class folders in {val.root}: {val.empty_classes}", stacklevel=2)
    return train, val


def build_val_dataset(cfg: DictConfig) -> Dataset:
    """The validation dataset alone, for evaluation: needs only ``<root>/<val_split>`` (no train/ folder).

    Classes are val/'s folders in sorted order, the order training takes them in (train/ and val/ must
    hold the same class folders for training).
    """
    if cfg.kind not in DATA_KINDS:
        raise ValueError(f"data.kind={cfg.kind!r} is not one of {DATA_KINDS}")
    if cfg.kind == "synthetic":
        return SyntheticDataset(cfg.val_samples, cfg.num_classes, cfg.img_size)
    val_dir = resolve_root(cfg, (cfg.val_split,)) / cfg.val_split
    classes = find_classes(val_dir)
    if cfg.get("class_subset"):
        classes = select_classes(classes, cfg.class_subset, val_dir)
    if len(classes) != cfg.num_classes:
        raise ConfigError(
            f"{val_dir} has {len(classes)} class folders but data.num_classes={cfg.num_classes}"
        )
    val = ImageFolderDataset(
        val_dir, instantiate(cfg.val_transform), classes=classes, bad_image_policy=cfg.bad_image_policy
    )
    if val.empty_classes:
        warnings.warn(f"empty class folders in {val.root}: {val.empty_classes}", stacklevel=2)
    return val


def _loader_kwargs(cfg: DictConfig) -> dict:
    workers = resolve_workers(cfg)
    kw = {"num_workers": workers, "pin_memory": bool(cfg.pin_memory) and torch.cuda.is_available()}
    if workers > 0:
        kw.update(persistent_workers=bool(cfg.persistent_workers), prefetch_factor=int(cfg.prefetch_factor))
        kw.update(worker_init_fn=worker_ignores_stop_signals)
    return kw


def build_train_loader(
    dataset: Dataset,
    cfg: DictConfig,
    global_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    collate_fn=collate_skipping_bad,
    sampler: ResumableTrainSampler | None = None,
) -> DataLoader:
    """A resumable training loader: per-rank batch = global batch / world size, tail dropped.
    ``collate_fn`` returns (inputs, targets, skipped bad images); ``sampler`` replaces the default
    ``ResumableTrainSampler`` (e.g. one grouping images by aspect ratio)."""
    if sampler is None:
        sampler = ResumableTrainSampler(len(dataset), global_batch, rank, world_size, seed)
    return DataLoader(
        SeededDataset(dataset),
        batch_size=sampler.per_rank_batch,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed + rank),
        **_loader_kwargs(cfg),
    )


def build_eval_loader(
    dataset: Dataset,
    cfg: DictConfig,
    batch_size: int,
    rank: int,
    world_size: int,
    collate_fn=collate_skipping_bad,
) -> DataLoader:
    """An evaluation loader in which every sample is seen exactly once across ranks."""
    sampler = ExactShardSampler(len(dataset), rank, world_size)
    kw = _loader_kwargs(cfg)
    kw["persistent_workers"] = False if kw["num_workers"] else None
    kw = {k: v for k, v in kw.items() if v is not None}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, **kw)


def _transform_args(cfg: DictConfig) -> dict:
    """The augmentation settings of the reference transforms, for the fast/GPU pipelines."""
    t, v = cfg.train_transform, cfg.val_transform
    mean = tuple(optional(t, "mean", IMAGENET_MEAN))
    std = tuple(optional(t, "std", IMAGENET_STD))
    return dict(
        train=dict(
            color_jitter=float(t.color_jitter), scale=tuple(t.scale), hflip=bool(t.hflip), mean=mean, std=std
        ),
        val=dict(resize=int(v.resize), mean=mean, std=std),
    )


def build_pipeline_loaders(
    cfg: DictConfig,
    global_batch: int,
    eval_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device,
    channels_last: bool = False,
) -> tuple:
    """(train loader, val loader, number of training samples) for ``data.pipeline`` other than reference.

    Loaders yield (images on ``device``, targets, n_bad), channels-last batches if ``channels_last``
    (``trainer.channels_last``); augmentation finishes on the device.
    """
    from acon.data.pipelines import DeviceLoader, build_loader, build_train_pipeline, build_val_pipeline

    name = cfg.pipeline
    shards = name.startswith("shards")
    root = Path(cfg.root).expanduser() if shards else resolve_root(cfg)
    subset = cfg.get("class_subset")
    if shards:
        classes = None
        if subset:
            check_shard_subset(root, subset)
    else:
        classes = check_class_sets(root / cfg.train_split, root / cfg.val_split, cfg.num_classes, subset)
    args = _transform_args(cfg)
    common = dict(
        img_size=int(cfg.img_size),
        classes=classes,
        bad_image_policy=cfg.bad_image_policy,
        **index_options(cfg),
        device=device,
        preprocess=cfg.preprocess,
        rank=rank,
        world_size=world_size,
        channels_last=channels_last,
    )
    train_root = root if shards else root / cfg.train_split
    val_root = root if shards else root / cfg.val_split
    tp = build_train_pipeline(name, train_root, split=cfg.train_split, seed=seed, **args["train"], **common)
    vp = build_val_pipeline(name, val_root, split=cfg.val_split, **args["val"], **common)
    kw = dict(
        num_workers=resolve_workers(cfg),
        persistent_workers=bool(cfg.persistent_workers),
        prefetch_factor=int(cfg.prefetch_factor),
    )
    train = DeviceLoader(
        build_loader(tp, global_batch, rank=rank, world_size=world_size, seed=seed, **kw),
        tp.device_transform,
        device,
    )
    val = DeviceLoader(
        build_loader(vp, eval_batch * world_size, rank=rank, world_size=world_size, train=False, **kw),
        vp.device_transform,
        device,
    )
    n_train = len(tp.dataset) * (world_size if shards else 1)
    return train, val, n_train
