"""create_activation: the one place a name becomes an activation module."""

from __future__ import annotations

import functools

import pytest
import torch
from timm.layers import get_act_layer
from torch import nn

from acon import (
    ACTIVATIONS,
    AconA,
    AconB,
    AconC,
    AconFReLU,
    FReLU,
    MetaAconC,
    ReLU,
    Swish,
    create_activation,
    resolve_activation,
)

EXPECTED = {
    "relu": ReLU,
    "swish": Swish,
    "acon_a": AconA,
    "acon_b": AconB,
    "acon_c": AconC,
    "meta_acon": MetaAconC,
    "acon_frelu": AconFReLU,
    # beyond the paper: timm's modules (prelu per channel) and FReLU
    **{n: get_act_layer(n) for n in ("gelu", "mish", "hard_swish", "silu", "celu", "prelu")},
    "frelu": FReLU,
}


def test_registry_has_exactly_the_issue_names():
    assert set(ACTIVATIONS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builds_every_name_for_the_channel_count(name):
    act = create_activation(name, 12)
    assert type(act) is EXPECTED[name]
    for p in act.parameters():
        if p.dim() == 4 and p.shape[0] == 1:  # per-channel ACON parameters
            assert p.shape == (1, 12, 1, 1)
    x = torch.randn(2, 12, 3, 3)
    assert act(x).shape == x.shape


def test_swish_is_learnable_like_acon_a():
    assert [n for n, _ in create_activation("swish", 4).named_parameters()] == ["beta"]


def test_names_are_case_and_dash_insensitive():
    assert type(create_activation("ACON-C", 4)) is AconC
    assert type(create_activation("Meta-ACON", 32)) is MetaAconC


def test_kwargs_are_passed_through():
    act = create_activation("meta_acon", 256, r=8, impl="reference")
    assert act.fc1.out_channels == max(8, 256 // 8) == 32 and act.impl == "reference"
    assert create_activation("relu", 4, inplace=True).inplace
    assert isinstance(create_activation("swish", 4, learnable_beta=False).beta, torch.Tensor)


def test_partial_is_passed_through():
    spec = functools.partial(MetaAconC, r=8)
    act = create_activation(spec, 256)
    assert type(act) is MetaAconC and act.r == 8 and act.fc1.out_channels == 32
    assert resolve_activation(spec) is spec
    default = create_activation("meta_acon", 256)
    assert default.fc1.out_channels == 16
    # a partial of a channel-less module is called without channels
    slope = create_activation(functools.partial(nn.LeakyReLU, negative_slope=0.2), 64)
    assert slope.negative_slope == 0.2


def test_accepts_classes_with_and_without_channels():
    assert type(create_activation(AconC, 5)) is AconC and create_activation(AconC, 5).p1.shape[1] == 5
    assert type(create_activation(nn.SiLU, 5)) is nn.SiLU
    assert type(create_activation(nn.ReLU, 5, inplace=True)) is nn.ReLU


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="acon_d") as info:
        create_activation("acon_d", 8)
    for name in EXPECTED:
        assert name in str(info.value)


@pytest.mark.parametrize("bad", [3, None, AconC(4)])
def test_non_constructors_are_rejected(bad):
    with pytest.raises(TypeError, match="activation must be"):
        create_activation(bad, 4)
