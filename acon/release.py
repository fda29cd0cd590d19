"""Letting go of a run's objects the moment their owner does, not whenever Python's cycle collector runs.

An error raised and caught on the way (an optional config key read with ``node.get(key, default)``, which
raises inside OmegaConf; a model that ``torch.fx`` cannot trace; a refused checkpoint write) keeps its
traceback's frames in a reference cycle, and through them the callers' frames with their locals: a
finished ``train()``'s model and loaders stayed alive until the cycle collector ran. Persistent DataLoader
workers suffer most: the collector shuts them down out of order (it finalises the iterator's queues first),
so each worker waits out a 5 s join and a terminate that it ignores (the workers ignore stop signals:
:mod:`acon.preempt`), and stays.

:func:`optional` reads a key without the exception, :func:`release_frames` clears a caught error's frames,
:func:`without_frames` also drops them before an error is raised on, and :func:`end_workers` shuts
persistent workers down at once.
"""

from __future__ import annotations

import gc
import traceback

from omegaconf import DictConfig
from torch.utils.data import DataLoader


def optional(node: DictConfig, key: str, default=None):
    """``node[key]``, or ``default`` where the node has no such key (struct nodes included), without an
    exception inside OmegaConf."""
    return node[key] if key in node.keys() else default


def release_frames(err: BaseException) -> None:
    """Clear the finished frames of ``err``'s traceback and of the errors chained to it, so that neither
    they nor their callers' frames (and locals) outlive the handling of ``err``."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)  # frames still running are skipped
        err = err.__cause__ or err.__context__


def without_frames(err: BaseException) -> BaseException:
    """``err`` without its traceback and chained errors, its finished frames cleared first, and the cycle
    collector run: the frames holding an epoch's DataLoader iterator let it go by reference counting, so its
    workers shut down in order (left to the collector, which the error's frames can form cycles for, the
    shutdown would wait out a join and a terminate per worker) before ``err`` is raised on."""
    release_frames(err)
    err.__traceback__ = err.__context__ = err.__cause__ = None
    gc.collect()
    return err


def end_workers(*loaders) -> None:
    """Shut down the worker processes of persistent-worker DataLoaders now (wrappers with a ``loader``
    attribute, such as the input pipelines' device stage, are unwrapped); other loaders are left as they are."""
    for loader in loaders:
        while loader is not None and not isinstance(loader, DataLoader) and hasattr(loader, "loader"):
            loader = loader.loader
        iterator = getattr(loader, "_iterator", None) if isinstance(loader, DataLoader) else None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()  # what DataLoader's own exit handler calls for persistent workers
            loader._iterator = None


__all__ = ["end_workers", "optional", "release_frames", "without_frames"]
