"""CUDA paths checked on a CPU: device stand-ins (``meta``, a patched ``torch.cuda``), low ``ulimit -n``."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from acon import checkpoint as ckpt


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_resume_restores_rng_from_a_device_map_location(tmp_path):
    """A checkpoint loaded onto a device (``meta`` stands in for ``cuda:N``) restores its RNG states."""
    model = nn.Linear(3, 2)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = {"model": model.state_dict(), "rng": [ckpt.capture_rng()], "progress": {"step": 7}}
    expected = _draws()
    ckpt.atomic_save(state, tmp_path / "last.pt")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)

    loaded = ckpt.load_checkpoint(tmp_path / "last.pt", map_location="meta")
    assert loaded["model"]["weight"].device.type == "meta"  # the weights went where they were asked
    assert loaded["rng"][0]["torch"].device.type == "cpu"
    assert loaded["progress"] == {"step": 7}
    ckpt.restore_rng(loaded["rng"][0])
    assert _draws() == expected


def test_restore_rng_refuses_states_without_values_with_a_clear_error():
    state = ckpt.capture_rng()
    state["torch"] = state["torch"].to("meta")
    with pytest.raises(ckpt.CheckpointError, match="meta device"):
        ckpt.restore_rng(state)
