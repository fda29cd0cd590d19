"""Golden counts of the TFNet table's models (TFNet, MobileNetV2, MobileNetV1 0.25) and of the SE option."""

import functools

import pytest
import torch
import torchvision
from timm.layers import SEModule
from torch import nn

import models
from models.complexity import count_bn_params, count_conv_bias_params
from models.golden import LIGHT_ACTIVATIONS, LIGHT_EXACT, SE_EXACT, TFNET_TABLE, TFNET_TABLE_DIFFERS

LIGHT = [(n, a) for n in LIGHT_EXACT for a in LIGHT_ACTIVATIONS[models.get_entry(n).family]]
DEFAULT_ACT = {n: LIGHT_ACTIVATIONS[models.get_entry(n).family][0] for n in LIGHT_EXACT}


@functools.cache
def _meta_model(name: str, activation: str, **kw) -> nn.Module:
    with torch.device("meta"):
        return models.create_model(name, activation, **kw)


# Default run: every model with its default activation (MACs: TFNet and MobileNetV2 1.0), Meta-ACON on
# MobileNetV1 0.25; the rest under -m slow (a meta-device count costs ~0.5 s per model).
_PARAMS_DEFAULT = [(n, a) for n, a in LIGHT if a == DEFAULT_ACT[n]] + [("mobilenetv1_x0_25", "meta_acon")]
_MACS_DEFAULT = [n for n in LIGHT_EXACT if n.startswith("tfnet")] + ["mobilenetv2_x1_0"]


@pytest.mark.parametrize(
    "name,activation",
    [p if p in _PARAMS_DEFAULT else pytest.param(*p, marks=pytest.mark.slow) for p in LIGHT],
)
def test_exact_params(name, activation):
    m, golden = _meta_model(name, activation), LIGHT_EXACT[name][activation]
    assert (models.count_params(m), count_bn_params(m)) == (golden.params, golden.bn_params)
    assert count_conv_bias_params(m) == golden.conv_bias_params


@pytest.mark.parametrize(
    "name", [n if n in _MACS_DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in LIGHT_EXACT]
)
def test_exact_macs_default_activation(name):
    assert (
        models.count_flops(_meta_model(name, DEFAULT_ACT[name])) == LIGHT_EXACT[name][DEFAULT_ACT[name]].macs
    )


@pytest.mark.slow
@pytest.mark.parametrize("name,activation", [p for p in LIGHT if p[1] != DEFAULT_ACT[p[0]]])
def test_exact_macs_other_activations(name, activation):
    assert models.count_flops(_meta_model(name, activation)) == LIGHT_EXACT[name][activation].macs


@pytest.mark.parametrize("name", list(TFNET_TABLE))
def test_published_tfnet_table(name):
    """Published FLOPs / params match ours in the BN-folded convention, except the listed, explained rows."""
    row, golden = TFNET_TABLE[name], LIGHT_EXACT[name][DEFAULT_ACT[name]]
    got = {"flops": golden.paper_flops, "params": golden.paper_params}
    matches = {k: row[k].matches(v) for k, v in got.items()}
    assert {k for k, ok in matches.items() if not ok} == set(TFNET_TABLE_DIFFERS.get(name, ())), got


def test_tfnet_counts_are_the_default_acon_frelu_model():
    assert models.create_model("tfnet_x0_5").conv_last[2].__class__.__name__ == "AconFReLU"
    assert (
        models.count_params(_meta_model("tfnet_x0_5", None)) == LIGHT_EXACT["tfnet_x0_5"]["acon_frelu"].params
    )


@pytest.mark.parametrize("width", [0.17, pytest.param(1.4, marks=pytest.mark.slow)])
def test_mobilenetv2_counts_equal_torchvision(width):
    with torch.device("meta"):
        tv = torchvision.models.mobilenet_v2(width_mult=width)
    name = "mobilenetv2_x" + str(width).replace(".", "_")
    golden = LIGHT_EXACT[name]["relu"]
    assert (models.count_params(tv), models.count_flops(tv)) == (golden.params, golden.macs)


@pytest.mark.parametrize("name", list(SE_EXACT))
def test_se_exact_params(name):
    assert models.count_params(_meta_model(name, "relu", se=True)) == SE_EXACT[name][0]


@pytest.mark.parametrize(
    "name", [n if n == "resnet18" else pytest.param(n, marks=pytest.mark.slow) for n in SE_EXACT]
)
def test_se_exact_macs(name):
    assert models.count_flops(_meta_model(name, "relu", se=True)) == SE_EXACT[name][1]


def test_se_placement_and_reduction():
    r50 = _meta_model("resnet50", "relu", se=True)
    se = r50.layer2[0].se
    assert isinstance(se, SEModule) and (se.fc1.in_channels, se.fc1.out_channels) == (512, 32)
    assert isinstance(_meta_model("resnet50", "relu").layer2[0].se, nn.Identity)
    r8 = _meta_model("resnet18", "relu", se=True, se_reduction=8).layer3[1].se
    assert r8.fc1.out_channels == 256 // 8
    sn = _meta_model("shufflenetv2_x0_5", "relu", se=True)
    unit = sn.features[1].branch_main[-1]  # ShuffleNetV2+: the main branch ends with the SE module
    assert isinstance(unit, SEModule) and unit.fc1.out_channels == 24 // 4 and unit.fc1.bias is None
    assert isinstance(unit.bn, nn.BatchNorm2d) and sn.features[0].branch_proj[-1].__class__.__name__ == "ReLU"
    with pytest.raises(ValueError, match="se_reduction"):
        models.create_model("resnet18", se=True, se_reduction=0)


def test_se_changes_the_output_and_trains():
    torch.manual_seed(0)
    m = models.create_model("resnet18", "relu", num_classes=4, small_input=True, se=True)
    out = m(torch.randn(2, 3, 16, 16))
    out.sum().backward()
    assert m.layer1[0].se.fc1.weight.grad.abs().sum() > 0
