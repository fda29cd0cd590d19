"""Import-level smoke test of the public API."""

import torch

import acon
from acon import AconA, AconB, AconC, MetaAconC, Swish, create_activation


def test_public_api_forward_shapes():
    x = torch.randn(2, 4, 3, 3)
    for act in (AconC(4), MetaAconC(4, r=2), Swish(4), AconA(4), AconB(4), create_activation("relu", 4)):
        assert act(x).shape == x.shape


def test_every_exported_name_exists():
    for name in acon.__all__:
        assert getattr(acon, name) is not None, name
    for name in ("AconC", "MetaAconC", "Swish", "AconA", "AconB", "create_activation", "param_groups"):
        assert name in acon.__all__


def test_repr_names_channels():
    assert "8" in repr(AconC(8)) and "r=4" in repr(MetaAconC(8, r=4)) and "8" in repr(Swish(8))
