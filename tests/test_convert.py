"""acon.convert_activations on models no one here wrote: torchvision and timm classifiers."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import acon
from acon import AconB, AconC, MetaAconC, convert_activations
from acon.convert import RELU_MATCH_BETA

RELU_BOUND = 0.2785 / RELU_MATCH_BETA  # the docstring's bound on |ACON-C(x) - ReLU(x)|


def acon_names(model: nn.Module, cls=AconC) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


def randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, as in a trained model."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def resnet18_pair(one_thread):
    torch.manual_seed(0)
    original = randomise_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    converted = convert_activations(original, "acon_c", example_input=x, init="match").eval()
    return original, converted, x


def test_resnet18_every_call_site_gets_its_own_module(resnet18_pair):
    original, converted, x = resnet18_pair
    names = acon_names(converted)
    assert len(names) == 17  # stem + 2 call sites of the shared self.relu in each of 8 blocks
    assert {"relu", "layer1.0.relu", "layer1.0.relu_1", "layer4.1.relu_1"} <= set(names)
    assert converted.get_submodule("layer4.1.relu_1").channels == 512
    assert isinstance(original.layer1[0].relu, nn.ReLU)  # the original model is left as it was


def test_resnet18_match_stays_within_the_stated_bound_and_names_are_stable(resnet18_pair):
    original, converted, x = resnet18_pair
    with torch.no_grad():
        assert (converted(x) - original(x)).abs().max() < 1e-3
    again = convert_activations(original, "acon_c", example_input=x)
    again.load_state_dict(converted.state_dict())  # same keys in a second conversion: resume works
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), converted(x))


def test_relu_match_error_bound_holds_elementwise():
    x = torch.linspace(-0.01, 0.01, 20001).view(1, 1, -1)
    act = acon.convert.match_init(AconC(1, impl="reference"), "relu")
    with torch.no_grad():
        err = (act(x) - F.relu(x)).abs().max().item()
    assert 0.9 * RELU_BOUND < err <= RELU_BOUND


def test_converted_model_trains_channels_last_and_uses_the_fused_op(resnet18_pair, monkeypatch):
    _, converted, x = resnet18_pair
    calls = []  # the fused op, by either entry: the C++ kernels' own (CPU) or the general acon.fused.acon_c
    real, real_native = acon.fused.acon_c, acon.fused.ops.NativeAconC.apply
    monkeypatch.setattr(acon.fused, "acon_c", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(acon.fused.ops.NativeAconC, "apply", lambda *a: calls.append(1) or real_native(*a))
    converted.train()
    out = converted(x.contiguous(memory_format=torch.channels_last))
    out.sum().backward()
    assert len(calls) == 17
    assert all(converted.get_submodule(n).p1.grad is not None for n in acon_names(converted))
    converted.eval().zero_grad()
    with torch.no_grad():
        torch.testing.assert_close(
            converted(x.contiguous(memory_format=torch.channels_last)), converted(x), rtol=1e-5, atol=1e-5
        )


@pytest.mark.slow
def test_resnet50_meta_acon_every_site(one_thread):
    model = torchvision.models.resnet50(num_classes=10)
    converted = convert_activations(model, "meta_acon", example_input=torch.randn(2, 3, 32, 32))
    assert len(acon_names(converted, MetaAconC)) == 1 + 16 * 3
    converted(torch.randn(2, 3, 32, 32)).sum().backward()


def test_efficientnet_b0_silu_match_gives_equal_logits(one_thread):
    torch.manual_seed(0)
    model = randomise_bn(timm.create_model("efficientnet_b0", num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    converted = convert_activations(model, "acon_c", example_input=x, init="match").eval()
    assert converted is model  # every SiLU module is called once: converted in place
    assert isinstance(model.blocks[1][0].se.act1, AconC)  # squeeze-excite's SiLU too
    assert len(acon_names(model)) == 49
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_densenet121_functional_relu_is_converted(one_thread):
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.densenet121(num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    converted = convert_activations(model, "acon_c", example_input=x, init="match").eval()
    names = acon_names(converted)
    assert len(names) == 121 and "relu" in names  # DenseNet.forward's F.relu(features) at the top level
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() < 1e-3


class FunctionalNet(nn.Module):
    def __init__(self, dynamic: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.dynamic = dynamic

    def forward(self, x):
        x = self.conv(x)
        if self.dynamic and x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return torch.relu(F.leaky_relu(x, 0.2)).relu()


def test_functional_calls_and_leaky_relu_match():
    model = FunctionalNet().eval()
    x = torch.randn(2, 3, 8, 8)
    converted = convert_activations(
        model, "acon_b", example_input=x, targets=["relu", "leaky_relu"], init="match"
    )
    assert sorted(acon_names(converted, AconB)) == ["leaky_relu", "relu", "relu_1"]
    assert torch.allclose(converted.get_submodule("leaky_relu").p, torch.tensor(0.2))
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() < 2 * RELU_BOUND


def test_untraceable_model_names_the_call_sites():
    with pytest.raises(ValueError, match=r"could not be reached: <model>: relu\(\)"):
        convert_activations(FunctionalNet(dynamic=True), "acon_c", example_input=torch.randn(1, 3, 8, 8))


def test_prelu_match_and_meta_acon_limits():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.PReLU(4), nn.Conv2d(4, 4, 1), nn.SiLU()).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    x = torch.randn(2, 3, 5, 5)
    ref = model(x)
    converted = convert_activations(model, "acon_c", example_input=x, targets=["prelu", "silu"], init="match")
    assert torch.allclose(converted[1].p2.flatten(), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    with torch.no_grad():
        assert (converted(x) - ref).abs().max() < 2 * RELU_BOUND
    silu = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SiLU()).eval()
    meta = convert_activations(silu, "meta_acon", example_input=x, init="match").eval()
    with torch.no_grad():
        torch.testing.assert_close(meta(x), F.silu(meta[0](x)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Meta-ACON's β lies in"):
        convert_activations(nn.Sequential(nn.ReLU()), "meta_acon", example_input=x, init="match")


def test_mobilenet_v2_relu6_on_request_and_bad_inputs_are_named(one_thread):
    model = torchvision.models.mobilenet_v2(num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="no relu/silu activation"):
        convert_activations(model, "acon_c", example_input=x)
    converted = convert_activations(model, "acon_c", example_input=x, targets=["relu6"])
    assert len(acon_names(converted)) == 35
    with pytest.raises(ValueError, match="no ACON form reproduces relu6"):
        convert_activations(
            torchvision.models.mobilenet_v2(), "acon_c", example_input=x, targets=["relu6"], init="match"
        )
    with pytest.raises(ValueError, match=r"unsupported target\(s\) \['tanh'\]"):
        convert_activations(model, "acon_c", example_input=x, targets=["tanh"])
    with pytest.raises(ValueError, match=r"example_input of shape \(1, 1, 32, 32\) failed"):
        convert_activations(torchvision.models.resnet18(), "acon_c", example_input=torch.randn(1, 1, 32, 32))
