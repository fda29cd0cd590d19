"""Import-level smoke test of the public API."""

import torch

from acon import AconA, AconB, AconC, MetaAconC, Swish, create_activation


def test_public_api_forward_shapes():
    x = torch.randn(2, 4, 3, 3)
    for act in (AconC(4), MetaAconC(4, r=2), Swish(4), AconA(4), AconB(4), create_activation("relu", 4)):
        assert act(x).shape == x.shape
