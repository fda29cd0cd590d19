"""Progressive resizing: the training input size as a function of the epoch, followed by running workers.

A budget recipe (``recipe.resolution``) trains at ``min_res`` until ``start_ramp``, at ``max_res`` from
``end_ramp`` on, and in between at the linear interpolation rounded to a multiple of ``round_to`` -- FFCV's
``get_resolution`` (ffcv-imagenet ``train_imagenet.py``). Evaluation runs at ``eval_res`` from a centre crop
of ``eval_crop_ratio`` of the short side.

The size lives in one shared-memory integer (:class:`SharedSize`) that the training transform reads for
every sample (``reference``, ``fast``, ``shards``: in the loader workers; ``gpu``, ``shards_gpu``: in the
batch stage on the device), so a new epoch's size needs no new workers. The trainer sets it from the epoch
before each epoch's iteration starts (:meth:`EpochResolution.set_epoch`); a resumed run sets it from the
restored epoch, so a stop in the middle of the ramp resumes at the same size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import transforms as T

from acon.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolutionSchedule:
    """FFCV's progressive-resizing rule: the training input size of every epoch (0-based)."""

    min_res: int
    max_res: int
    start_ramp: int
    end_ramp: int
    round_to: int = 32

    def size_at(self, epoch: int) -> int:
        """The square input size of ``epoch``: ``min_res`` up to ``start_ramp``, ``max_res`` from
        ``end_ramp``, else the interpolation rounded (half to even, as numpy) to a multiple of ``round_to``."""
        if epoch <= self.start_ramp:
            return self.min_res
        if epoch >= self.end_ramp:
            return self.max_res
        t = (epoch - self.start_ramp) / (self.end_ramp - self.start_ramp)
        return int(round((self.min_res + t * (self.max_res - self.min_res)) / self.round_to)) * self.round_to

    def sizes(self, epochs: int) -> list[int]:
        """The size of each of ``epochs`` epochs."""
        return [self.size_at(e) for e in range(epochs)]


def schedule_of(recipe: Any) -> ResolutionSchedule | None:
    """The recipe's schedule (None without ``recipe.resolution``), checked: a clear error names the key."""
    res = recipe.get("resolution") if recipe is not None else None
    if not res:
        return None
    s = ResolutionSchedule(
        int(res.min_res), int(res.max_res), int(res.start_ramp), int(res.end_ramp), int(res.round_to)
    )
    if not 0 < s.min_res <= s.max_res:
        raise ConfigError(
            f"recipe.resolution: min_res={s.min_res} and max_res={s.max_res} must be 0 < min_res <= max_res"
        )
    if not 0 <= s.start_ramp <= s.end_ramp:
        raise ConfigError(
            f"recipe.resolution: start_ramp={s.start_ramp} and end_ramp={s.end_ramp} must be "
            "0 <= start_ramp <= end_ramp (epochs)"
        )
    if int(res.eval_res) <= s.max_res:
        raise ConfigError(
            f"recipe.resolution.eval_res={res.eval_res} must be above the last training size max_res="
            f"{s.max_res} (train low, test high)"
        )
    return s


def eval_sizes(recipe: Any) -> tuple[int, int] | None:
    """(centre crop, short-side resize) of evaluation under ``recipe.resolution``, else None.

    FFCV crops the centre square of ``eval_crop_ratio`` × the short side and resizes it to ``eval_res``; here
    the short side goes to ``eval_res / eval_crop_ratio`` and the centre ``eval_res`` is cropped (the same
    pixels up to the rounding of the resize)."""
    res = recipe.get("resolution") if recipe is not None else None
    if not res:
        return None
    crop = int(res.eval_res)
    return crop, int(round(crop / float(res.eval_crop_ratio)))


class SharedSize:
    """One integer in shared memory: the main process writes it, loader workers read it."""

    def __init__(self, value: int) -> None:
        self.tensor = torch.tensor([int(value)], dtype=torch.int64).share_memory_()

    @property
    def value(self) -> int:
        """The current size."""
        return int(self.tensor[0])

    def set(self, value: int) -> None:
        """Make ``value`` the size from the next sample on."""
        self.tensor[0] = int(value)


class FollowSize:
    """Wraps a transform whose ``size`` attribute sets its output size; sets it from ``shared`` per call.

    ``pair``: torchvision's ``RandomResizedCrop`` keeps ``size`` as (height, width)."""

    def __init__(self, inner: Any, shared: SharedSize, pair: bool = False) -> None:
        self.inner, self.shared, self.pair = inner, shared, pair

    def __call__(self, *args, **kwargs):
        v = self.shared.value
        self.inner.size = (v, v) if self.pair else v
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str):
        inner = self.__dict__.get("inner")
        if inner is None:  # during unpickling
            raise AttributeError(name)
        return getattr(inner, name)

    def __repr__(self) -> str:
        return f"FollowSize({self.inner!r})"


def _follow_transform(tf: Any, shared: SharedSize) -> tuple[Any, bool]:
    """``tf`` with its resizing step following ``shared``; whether one was found."""
    if isinstance(tf, T.Compose):
        found = False
        for i, op in enumerate(tf.transforms):
            if isinstance(op, T.RandomResizedCrop):
                tf.transforms[i], found = FollowSize(op, shared, pair=True), True
        return tf, found
    from acon.data.fast import FastTrainTransform

    if isinstance(tf, FastTrainTransform):
        return FollowSize(tf, shared), True
    return tf, False


def follow_size(train_loader: Any, shared: SharedSize) -> str:
    """Make the training loader's resizing step read ``shared`` (before its workers start); returns where:
    ``workers`` or ``device``. A loader with no resizing step to follow is a :class:`ConfigError`."""
    loader = getattr(train_loader, "loader", train_loader)
    dataset = getattr(loader, "dataset", None)
    inner = getattr(dataset, "dataset", dataset)  # SeededDataset wraps the folder dataset
    where = None
    if inner is not None and getattr(inner, "transform", None) is not None:
        inner.transform, found = _follow_transform(inner.transform, shared)
        where = "workers" if found else None
    device_tf = getattr(train_loader, "transform", None)
    if where is None and device_tf is not None and hasattr(device_tf, "size"):
        train_loader.transform, where = FollowSize(device_tf, shared), "device"
    if where is None:
        raise ConfigError(
            "recipe.resolution needs a training pipeline with a resizing crop (data.pipeline=reference, "
            f"fast, gpu, shards or shards_gpu on image data); this loader has none: {loader!r}"
        )
    return where


class EpochResolution:
    """The training size of each epoch, written to the :class:`SharedSize` the loader follows."""

    def __init__(self, schedule: ResolutionSchedule, shared: SharedSize) -> None:
        self.schedule, self.shared = schedule, shared
        self.current: int | None = None

    def set_epoch(self, epoch: int) -> int:
        """Set (and log on a change) the size of ``epoch``; returns it."""
        size = self.schedule.size_at(epoch)
        if size != self.current:
            log.info(f"training input size {size}x{size} px from epoch {epoch + 1}")
        self.shared.set(size)
        self.current = size
        return size


def budget_data(data: Any, recipe: Any) -> Any:
    """The data config with the recipe's evaluation size (crop ``eval_res``, resize ``eval_res /
    eval_crop_ratio``) and ``max_res`` as the training transform's size until the schedule sets it;
    ``data`` itself when the recipe has no ``resolution``."""
    sizes = eval_sizes(recipe)
    if sizes is None:
        return data
    from omegaconf import OmegaConf

    crop, resize = sizes
    out = OmegaConf.create(OmegaConf.to_container(data, resolve=True))
    out.img_size = crop
    if "val_transform" in out:
        out.val_transform.img_size, out.val_transform.resize = crop, resize
    if "train_transform" in out:
        out.train_transform.img_size = int(recipe.resolution.max_res)
    return out


def attach(task: Any, cfg: Any, train_loader: Any) -> None:
    """Give ``task`` an :class:`EpochResolution` that ``train_loader`` follows, when the recipe has one."""
    schedule = schedule_of(cfg.recipe)
    if schedule is None:
        return
    shared = SharedSize(schedule.size_at(0))
    where = follow_size(train_loader, shared)
    task.resolution = EpochResolution(schedule, shared)
    crop, resize = eval_sizes(cfg.recipe)
    log.info(
        f"progressive resizing (set in the {where} stage): {describe(schedule, cfg.recipe.get('epochs'))}; "
        f"evaluation at {crop} px (short side {resize}, centre crop)"
    )


def describe(schedule: ResolutionSchedule, epochs: int | None) -> str:
    """``160 px epochs 1-12, 192 px epochs 13-16`` (1-based), or the rule when the length is in steps."""
    if not epochs:
        return (
            f"{schedule.min_res} px to epoch {schedule.start_ramp + 1}, {schedule.max_res} px from epoch "
            f"{schedule.end_ramp + 1}, multiples of {schedule.round_to} in between"
        )
    spans: list[list[int]] = []  # [size, first epoch, last epoch]
    for e, size in enumerate(schedule.sizes(int(epochs)), start=1):
        if spans and spans[-1][0] == size:
            spans[-1][2] = e
        else:
            spans.append([size, e, e])
    return ", ".join(
        f"{s} px epoch{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''}" for s, a, b in spans
    )
