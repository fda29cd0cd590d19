"""Model zoo: construction, forward/backward for every model x activation, options, features, timm."""

import pytest
import torch
from torch import nn

import models
from acon import AconC, MetaAconC, ReLU, Swish

ACTS = ("relu", "swish", "acon_c", "meta_acon")
NAMES = models.list_models()
EXPECTED_NAMES = [
    "shufflenetv2_x0_5",
    "shufflenetv2_x1_0",
    "shufflenetv2_x1_5",
    "shufflenetv2_x2_0",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "tfnet_x0_5",
    "tfnet_x1_0",
    "tfnet_x1_5",
    "tfnet_x2_0",
    "mobilenetv2_x0_17",
    "mobilenetv2_x0_6",
    "mobilenetv2_x1_0",
    "mobilenetv2_x1_4",
    "mobilenetv1_x0_25",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_list_models():
    assert NAMES == EXPECTED_NAMES


# resnet101/152 use resnet50's blocks, TFNet and MobileNet widths share their blocks; the default run keeps
# one activation each (the smallest width of those families), the rest is slow.
_BIG_DEFAULT = {("resnet101", "relu"), ("resnet152", "meta_acon"), ("mobilenetv1_x0_25", "acon_c")}
_BIG_DEFAULT |= {(n, a) for n in ("tfnet_x0_5", "mobilenetv2_x0_17") for a in ACTS}
_SHARED = ("resnet101", "resnet152", "tfnet", "mobilenet")
FWD_BWD = [
    pytest.param(
        n,
        a,
        marks=[pytest.mark.slow] if n.startswith(_SHARED) and (n, a) not in _BIG_DEFAULT else [],
    )
    for n in NAMES
    for a in ACTS
]


@pytest.mark.parametrize("name,activation", FWD_BWD)
def test_forward_backward(name, activation):
    torch.manual_seed(0)
    model = models.create_model(name, activation, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    acon_sites = models.activation_sites(model)
    assert (len(acon_sites) > 0) == (activation != "relu")
    assert all(
        p.grad.abs().sum() > 0 for m in acon_sites.values() for n, p in m.named_parameters() if "p1" in n
    )


@pytest.mark.parametrize("name", ["shufflenetv2_x0_5", "resnet18", "resnet50"])
def test_small_input(name):
    torch.manual_seed(0)
    model = models.create_model(name, "acon_c", num_classes=7, small_input=True).eval()
    assert isinstance(model.maxpool, nn.Identity)
    x = torch.randn(1, 3, 16, 16)
    assert model(x).shape == (1, 7)
    assert model.forward_features(x).shape[-1] == 2  # stride 8 instead of 32


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="resnet50.*shufflenetv2_x0_5|shufflenetv2_x0_5.*resnet50"):
        models.create_model("resnet51")


def test_unknown_kwarg_is_named():
    with pytest.raises(TypeError, match="act_placment"):
        models.create_model("resnet50", act_placment="all")
    with pytest.raises(TypeError, match="act_placement"):  # a ResNet option is not a ShuffleNet option
        models.create_model("shufflenetv2_x0_5", act_placement="all")


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"variant": "v2"}, "variant"),
        ({"act_placement": "some"}, "act_placement"),
        ({"activation": "gleu"}, "unknown activation 'gleu'; valid names: .*gelu"),  # a mistyped name
    ],
)
def test_bad_option_values(kw, match):
    with pytest.raises(ValueError, match=match):
        models.create_model("resnet18", **kw)


def test_activation_as_class_or_partial():
    m = models.create_model("resnet18", AconC, num_classes=3)
    assert isinstance(m.layer1[0].acon1, AconC)
    m = models.create_model("resnet18", "acon_c", act_kwargs={"impl": "reference"})
    assert m.layer1[0].acon1.impl == "reference"


def test_resnet_placement_and_variant_layout():
    m = models.create_model("resnet50", "acon_c")
    block = m.layer2[0]
    assert isinstance(block.acon, AconC) and isinstance(block.act1, ReLU) and isinstance(block.act3, ReLU)
    assert isinstance(m.act1, ReLU)
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1) and block.conv1.bias is not None
    tv = models.create_model("resnet50", "acon_c", variant="torchvision").layer2[0]
    assert tv.conv1.stride == (1, 1) and tv.conv2.stride == (2, 2) and tv.conv1.bias is None
    m = models.create_model("resnet50", "swish", act_placement="all")
    assert all(isinstance(a, Swish) for a in (m.act1, m.layer1[0].act1, m.layer1[0].act3, m.layer1[0].acon))


def test_shufflenet_layout_and_dropout():
    m = models.create_model("shufflenetv2_x2_0", "meta_acon")
    assert m.dropout.p == 0.2 and models.create_model("shufflenetv2_x1_0").dropout.p == 0.0
    assert isinstance(m.first_conv[2], MetaAconC) and isinstance(m.conv_last[2], MetaAconC)
    assert isinstance(m.features[0].branch_proj[4], MetaAconC) and m.features[1].branch_proj is None
    assert m.features[0].branch_main[3].groups == m.features[0].branch_main[3].in_channels
    megvii = models.create_model("shufflenetv2_x1_0", variant="megvii")
    assert megvii.classifier[0].bias is None and megvii.first_conv[0].bias is None


def test_shufflenet_block_splits_even_odd_channels():
    """A stride-1 unit passes the even channels through and transforms the odd ones."""
    block = models.create_model("shufflenetv2_x0_5").features[1].eval()
    x = torch.randn(1, 48, 5, 5)
    y = block(x)
    assert torch.equal(y[:, :24], x[:, 0::2])
    assert torch.allclose(y[:, 24:], block.branch_main(x[:, 1::2]))


def test_shufflenet_init_matches_authors():
    torch.manual_seed(0)
    m = models.create_model("shufflenetv2_x1_5", "meta_acon")
    assert abs(m.first_conv[0].weight.std().item() - 0.01) < 1e-3
    pw = m.features[5].branch_main[0].weight  # 1x1 conv, 176 input channels
    assert abs(pw.std().item() - 1 / 176) < 1e-3
    dw = m.features[5].branch_main[3].weight  # depthwise: weight.shape[1] == 1 -> std 1
    assert abs(dw.std().item() - 1.0) < 0.1
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert all(torch.all(bn.bias == 1e-4) and torch.all(bn.weight == 1) for bn in bns)
    assert all(torch.all(c.bias == 0) for c in m.modules() if isinstance(c, nn.Conv2d))
    assert abs(m.classifier[0].weight.std().item() - 0.01) < 1e-3


def test_resnet_init_is_kaiming_fan_out():
    torch.manual_seed(0)
    m = models.create_model("resnet50", "acon_c")
    w = m.layer3[0].conv2.weight  # fan_out = 256 * 9
    assert abs(w.std().item() - (2 / (256 * 9)) ** 0.5) < 2e-3
    assert torch.all(m.layer1[0].bn1.bias == 0)
    z = models.create_model("resnet50", zero_init_residual=True)
    assert torch.all(z.layer1[0].bn3.weight == 0)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_variant_equals_torchvision(name):
    """With ReLU, variant='torchvision' loads torchvision's weights key for key and gives its logits."""
    import torchvision

    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)().eval()
    ours = models.create_model(name, variant="torchvision").eval()
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(ours(x), tv(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name,small,reductions",
    [
        ("resnet50", False, [2, 4, 8, 16, 32]),
        ("resnet18", True, [1, 1, 2, 4, 8]),
        ("shufflenetv2_x1_0", False, [2, 8, 16, 32, 32]),
        ("shufflenetv2_x0_5", True, [1, 2, 4, 8, 8]),
    ],
)
def test_features_only_shapes(name, small, reductions):
    m = models.create_model(name, "acon_c", features_only=True, small_input=small).eval()
    size = 16 if small else 64
    feats = m(torch.randn(1, 3, size, size))
    assert m.feature_info.reduction() == reductions
    assert [f.shape[1] for f in feats] == m.feature_info.channels()
    assert [size // f.shape[-1] for f in feats] == reductions


def test_features_only_prunes_unused_modules():
    m = models.create_model("resnet50", features_only=True, out_indices=(1, 2))
    assert m.fc is None and m.layer3 is None and m.layer4 is None
    assert len(m(torch.randn(1, 3, 64, 64))) == 2
    s = models.create_model("shufflenetv2_x0_5", features_only=True, out_indices=(0, 2))
    assert s.classifier is None and s.conv_last is None and len(s.features) == 12
    assert [f.shape[1] for f in s(torch.randn(1, 3, 64, 64))] == [24, 96]
    full = models.create_model("resnet50").state_dict()
    assert all(k in full for k in m.state_dict())  # feature models keep the classification key names


@pytest.mark.parametrize("out_indices", [(5,), (2, 1), (), (1, 1)])
def test_bad_out_indices(out_indices):
    with pytest.raises(ValueError, match="out_indices"):
        models.create_model("resnet18", features_only=True, out_indices=out_indices)


def test_num_classes_zero_returns_pooled_features():
    m = models.create_model("shufflenetv2_x0_5", num_classes=0).eval()
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 1024)


def test_timm_registration():
    import timm

    import models.timm_models as tm

    # Every family follows timm's model protocol and is registered (models.timm_models.FAMILIES).
    expected = {f"acon_{n}" for n in NAMES}
    assert "acon_resnet50" in timm.list_models("acon_*") and set(tm.TIMM_NAMES) == expected
    assert set(tm.FAMILIES) == {models.get_entry(n).family for n in NAMES}
    m = timm.create_model("acon_resnet50", activation="acon_c", num_classes=5)
    assert isinstance(m, models.resnet.ResNet) and isinstance(m.layer1[0].acon, AconC)
    f = timm.create_model("acon_shufflenetv2_x1_0", features_only=True, out_indices=(1, 2, 3))
    assert f.feature_info.channels() == [116, 232, 464]
    theirs = timm.create_model("resnet50")
    assert type(theirs).__module__ == "timm.models.resnet"
    assert models.count_params(theirs) == 25_557_032
    with pytest.raises(ValueError, match="no hosted weights"):
        timm.create_model("acon_resnet18", pretrained=True)
