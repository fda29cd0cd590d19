"""acon.release: a run's objects go when their owner drops them, without waiting for the cycle collector."""

from __future__ import annotations

import os
import time
import weakref

import torch
from omegaconf import OmegaConf
from test_fault_checkpoints import descendants

from acon.release import end_workers, optional, release_frames


class Held:
    """Stands for a model or a loader held in a local."""


def test_optional_reads_a_struct_node_and_keeps_no_frame_alive(no_cycle_collector):
    node = OmegaConf.create({"mean": [0.5], "none": None})
    OmegaConf.set_struct(node, True)

    def builder():
        held = Held()
        assert optional(node, "std", (0.25,)) == (0.25,) and list(optional(node, "mean")) == [0.5]
        assert optional(node, "none", 1) is None  # a key set to null is there: its value, not the default
        return weakref.ref(held)

    assert builder()() is None


def _raise_with_a_cycle():
    try:
        raise ValueError("inner")
    except ValueError as inner:
        kept = inner  # outlives the except block: this frame and the error's traceback form a cycle
    raise RuntimeError("chained") from kept


def test_release_frames_frees_the_callers_locals(no_cycle_collector):
    def builder(release: bool):
        held = Held()
        try:
            _raise_with_a_cycle()
        except RuntimeError as err:
            if release:
                release_frames(err)
        return weakref.ref(held)

    assert builder(release=False)() is not None  # the premise: without it the caller's frame outlives it
    assert builder(release=True)() is None


class _Wrapper:
    def __init__(self, loader) -> None:
        self.loader, self.me = loader, self  # a reference cycle, as a caught error's frames can make


def test_end_workers_ends_persistent_workers_held_in_a_cycle(no_cycle_collector):
    loader = torch.utils.data.DataLoader(range(8), batch_size=4, num_workers=2, persistent_workers=True)
    wrapper = _Wrapper(loader)
    before = set(descendants(os.getpid()))
    assert len(list(wrapper.loader)) == 2
    workers = set(descendants(os.getpid())) - before
    assert len(workers) == 2
    t0 = time.monotonic()
    end_workers(wrapper, None)
    assert time.monotonic() - t0 < 4  # no 5 s join timeouts
    assert loader._iterator is None and not set(descendants(os.getpid())) & workers
    end_workers(wrapper)  # twice: nothing left to do
